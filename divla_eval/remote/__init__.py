"""Policies over the wire, in openpi's websocket protocol (see docs/remote.md).

`divla-eval serve` puts any registered policy behind a websocket server (`server.PolicyServer`) that
openpi's own client can talk to, and `--policy remote --policy-option url=ws://HOST:PORT` evaluates any
server that speaks the protocol, ours or openpi's (`client.RemotePolicy`). `wire` holds what both ends
agree on: the msgpack encoding of arrays and the observation keys.
"""
