"""`--policy vla_eval_remote`: evaluate a policy behind a vla-eval model server (allenai's harness).

vla-eval's model-server protocol is not openpi's (see ../shared/PROTOCOLS.md): every frame is a
msgpack'd `{"type", "payload", "seq", "timestamp"}` (vla-eval's own `pack_message`/`unpack_message`
are used here, so images travel as it encodes them); the client says `hello` first, then per episode
`episode_start`, one `observation` per step answered by an `action` with the same `seq`, and
`episode_end`. A server built with a chunk size answers one action per observation from its buffer, so
this policy executes one action per call (`execute_steps` 1) whatever the server returns.

The observation is vla-eval's convention: `images` (camera -> HxWx3 uint8), `task_description`, `state`
(divla-eval's proprio). Errors are handled as for `--policy remote`: a server's `error` frame fails that
episode, a server that cannot be reached stops the run (finished episodes are kept; rerun to resume).
vla-eval is an optional extra (`pip install 'divla-eval[vla-eval]'`).
"""

from __future__ import annotations

import time

import numpy as np

from divla_eval.errors import DivlaEvalError
from divla_eval.policy import ActionChunk, Observation, PolicyMetadata
from divla_eval.remote.client import RemoteInferenceError, RemoteServerGone, RemoteTimeout, open_websocket

CAMERAS = ("front", "wrist")


def _protocol():
    try:
        from vla_eval.protocol import messages
    except ImportError:
        raise DivlaEvalError(
            "policy 'vla_eval_remote' needs vla-eval: pip install 'divla-eval[vla-eval]'"
        ) from None
    return messages


class VlaEvalRemotePolicy:
    """Registered as `vla_eval_remote`; built by `from_options(url=...)`. See the module docstring."""

    requires_options = ("url",)
    uses_device = False  # the model runs on the server (`divla_eval.policy.computes_on_device`)
    INFERENCE_OPTIONS: dict[str, type] = {"url": str, "connect_timeout": float, "timeout": float}
    """`--policy-option`: the server's ws:// URL; seconds to wait for it to accept a connection (it may
    still be loading its model) and for each reply."""

    def __init__(
        self, url: str, action_dim: int | None = None, connect_timeout: float = 30.0, timeout: float = 60.0
    ):
        check_options({"url": url, "connect_timeout": connect_timeout, "timeout": timeout})
        self.url, self.action_dim = url, action_dim
        self.connect_timeout, self.timeout = float(connect_timeout), float(timeout)
        self._conn = None
        self._seq = 0
        self._instruction = ""
        self._in_episode = False
        self.server = self._connect()
        self.metadata = PolicyMetadata(
            name="vla_eval_remote", cameras=CAMERAS, execute_steps=1, info={"url": url, "server": self.server}
        )

    @classmethod
    def from_options(cls, action_dim: int | None = None, **options) -> VlaEvalRemotePolicy:
        return cls(action_dim=action_dim, **options)

    @staticmethod
    def check_options(options: dict) -> None:
        check_options(options)

    @classmethod
    def describe(cls, url: str, connect_timeout: float = 30.0, **_) -> dict:
        """The manifest's `policy_info`: the server's hello payload, read once."""
        policy = cls(url, connect_timeout=connect_timeout)
        try:
            return dict(policy.metadata.info)
        finally:
            policy.close()

    # --- the wire --------------------------------------------------------------------------------------
    def _connect(self) -> dict:
        """Open the connection and exchange hellos; returns the server's hello payload."""
        messages = _protocol()
        self._conn = open_websocket(
            self.url,
            self.connect_timeout,
            server="vla-eval model server",
            hint="start it, or pass --policy-option connect_timeout=SECONDS to wait longer",
        )
        reply = self._request(messages.MessageType.HELLO, messages.make_hello_payload(benchmark="divla_eval"))
        return dict(reply.payload) if isinstance(reply.payload, dict) else {}

    def _send(self, kind, payload: dict) -> int:
        messages = _protocol()
        self._seq += 1
        self._conn.send(messages.pack_message(messages.Message(type=kind, payload=payload, seq=self._seq)))
        return self._seq

    def _request(self, kind, payload: dict):
        """Send one message and wait for the server's answer of the same seq (hello or action)."""
        from websockets.exceptions import ConnectionClosed

        messages = _protocol()
        seq = self._send(kind, payload)
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                raw = self._conn.recv(timeout=max(0.0, deadline - time.monotonic()))
                reply = messages.unpack_message(raw)
                if reply.type == messages.MessageType.ERROR:
                    raise RemoteInferenceError(
                        f"the vla-eval server at {self.url}: {reply.payload.get('error')}"
                    )
                if reply.seq == seq:
                    return reply
        except TimeoutError:
            self.close()
            raise RemoteTimeout(
                f"the vla-eval server at {self.url} did not answer within {self.timeout:g} s"
            ) from None
        except ConnectionClosed as exc:
            self.close()
            raise RemoteServerGone(
                f"the vla-eval server at {self.url} closed the connection ({exc}); finished episodes are "
                "kept: restart it and rerun to resume"
            ) from None

    def _end_episode(self) -> None:
        if self._in_episode and self._conn is not None:
            self._send(_protocol().MessageType.EPISODE_END, {})
        self._in_episode = False

    # --- the Policy protocol -------------------------------------------------------------------------
    def reset(self, instruction: str, seed: int) -> None:
        if self._conn is None:
            self.server = self._connect()
        self._end_episode()
        self._instruction = instruction
        task = {"name": "divla_eval", "task_description": instruction, "seed": int(seed)}
        self._send(_protocol().MessageType.EPISODE_START, {"task": task})
        self._in_episode = True

    def infer(self, obs: Observation) -> ActionChunk:
        if self._conn is None:  # the last episode's error closed it
            self.server = self._connect()
        payload = {
            "images": {c: obs.images[c] for c in self.metadata.cameras if c in obs.images},
            "task_description": obs.instruction,
            "state": np.asarray(obs.proprio, dtype=np.float32),
        }
        reply = self._request(_protocol().MessageType.OBSERVATION, payload)
        raw = reply.payload.get("actions") if isinstance(reply.payload, dict) else None
        actions = None if raw is None else np.asarray(raw, dtype=np.float32)
        if actions is not None and actions.ndim == 1:
            actions = actions[None]
        if actions is None or actions.ndim != 2 or (self.action_dim and actions.shape[1] != self.action_dim):
            raise RemoteInferenceError(
                f"the vla-eval server at {self.url} answered actions of shape "
                f"{None if actions is None else actions.shape}, expected [H, {self.action_dim}]"
            )
        return ActionChunk(actions=actions[:1])  # one action per observation (the protocol's rule)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._end_episode()
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def __del__(self):
        if hasattr(self, "_conn"):
            self.close()


def check_options(options: dict) -> None:
    """Refuse what cannot work before anything connects (the runner's validation calls this)."""
    url = options.get("url")
    if not url:
        raise DivlaEvalError(
            "policy 'vla_eval_remote' needs --policy-option url=ws://HOST:PORT (a vla-eval model server)"
        )
    if not str(url).startswith(("ws://", "wss://")):
        raise DivlaEvalError(f"policy option url={url!r}: expected ws://HOST:PORT or wss://HOST:PORT")
    for key in ("connect_timeout", "timeout"):
        if options.get(key) is not None and options[key] <= 0:
            raise DivlaEvalError(f"policy option {key}={options[key]}: expected seconds > 0")
