"""`--policy remote`: evaluate a policy served over openpi's websocket protocol (ours or openpi's).

The runner cannot tell it from an in-process policy: `reset` and `infer` keep the Policy protocol, and
its metadata (cameras, execute_steps, observation history, reasoning, checkpoint hash) comes from the
server's metadata frame. What the network adds is handled here:
- connecting retries until `connect_timeout` (a server still loading its model refuses connections);
- every reply is awaited at most `timeout` seconds;
- a server's inference error (a text frame, then close 1011) fails that episode with the server's
  message (`RemoteInferenceError`), and the next episode reconnects;
- a server that is gone (the connection drops, or it cannot be reached again) stops the whole run
  (`RemoteServerGone`, a DivlaEvalError: one line, exit 2), keeping the episodes already recorded, so
  that the rerun, once the server is back, resumes.
The API key is read from the environment (`DIVLA_EVAL_API_KEY`), never from `--policy-option`, whose
values are written into every record.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np

from divla_eval.errors import DivlaEvalError
from divla_eval.policy import ActionChunk, Observation, PolicyMetadata
from divla_eval.remote import wire

API_KEY_ENV = "DIVLA_EVAL_API_KEY"
WHOLE_CHUNK = 1_000_000
"""execute_steps when neither the user nor the server says: run every action of a chunk (what openpi's
ActionChunkBroker does with the server's horizon)."""


class RemoteServerGone(DivlaEvalError):
    """The policy server cannot be reached: the run stops (what finished is kept; rerun to resume)."""

    fatal = True


class RemoteInferenceError(RuntimeError):
    """The server failed one call and said why; that episode is an error, the run goes on."""


class RemoteTimeout(RuntimeError):
    """The server did not answer a call in time; that episode is an error, the run goes on."""


def open_websocket(
    url: str,
    connect_timeout: float,
    max_size: int | None = None,
    server: str = "policy server",
    hint: str = "",
):
    """A websocket connection to `url`, retrying refused connections (a server still loading its model)
    with back-off until `connect_timeout` has passed; sends `DIVLA_EVAL_API_KEY` when it is set. Every
    failure is one line: a bad URL, HTTP 401 or another status, or no server in time (`RemoteServerGone`,
    with `hint` saying how to start one). Shared by the openpi and the vla-eval clients."""
    from websockets.exceptions import InvalidStatus, InvalidURI
    from websockets.sync.client import connect

    key = os.environ.get(API_KEY_ENV)
    headers = {"Authorization": f"Api-Key {key}"} if key else None
    deadline = time.monotonic() + connect_timeout
    delay = 0.1
    while True:
        try:
            return connect(
                url,
                open_timeout=max(0.5, min(10.0, deadline - time.monotonic())),
                compression=None,
                max_size=max_size,
                additional_headers=headers,
            )
        except InvalidURI as exc:
            raise DivlaEvalError(f"policy option url={url!r} is not a websocket URL ({exc})") from None
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 401:
                raise DivlaEvalError(
                    f"the {server} at {url} refused the API key: set {API_KEY_ENV} to its key"
                ) from None
            raise DivlaEvalError(f"the {server} at {url} answered HTTP {status}") from None
        except (OSError, TimeoutError) as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RemoteServerGone(
                    f"cannot reach the {server} at {url} within {connect_timeout:g} s ({exc}); {hint}"
                ) from None
            time.sleep(min(delay, remaining))
            delay = min(2.0, delay * 2)


def _connect(url: str, connect_timeout: float, max_size: int | None = None):
    """(connection, metadata): openpi's server sends its metadata frame first."""
    conn = open_websocket(
        url,
        connect_timeout,
        max_size,
        hint="start it with `divla-eval serve ...` and rerun (finished episodes are kept)",
    )
    try:
        first = conn.recv(timeout=connect_timeout)
    except Exception as exc:
        conn.close()
        raise RemoteServerGone(f"the policy server at {url} sent no metadata frame ({exc})") from None
    if isinstance(first, str):
        conn.close()
        raise DivlaEvalError(f"the policy server at {url} sent text instead of its metadata: {first[:200]}")
    metadata = wire.unpackb(first)
    if not isinstance(metadata, dict):
        conn.close()
        raise DivlaEvalError(f"the policy server at {url} sent metadata that is not a map")
    return conn, metadata


def server_metadata(url: str, connect_timeout: float = 30.0) -> dict:
    """Connect once and read the metadata frame (what `run` checks and writes into the manifest)."""
    conn, metadata = _connect(url, connect_timeout)
    conn.close()
    return metadata


class RemotePolicy:
    """Registered as `remote`; see the module docstring. Built by `from_options(url=...)`."""

    requires_options = ("url",)
    uses_device = False  # the model runs on the server (`policy.computes_on_device`)
    INFERENCE_OPTIONS: dict[str, type] = {
        "url": str,
        "execute_steps": int,
        "connect_timeout": float,
        "timeout": float,
    }
    """`--policy-option`: the server's ws:// URL; actions run from each chunk (default: the server's
    execute_steps, else the whole chunk); seconds to wait for the server to accept a connection (it may
    still be loading) and for each reply."""

    def __init__(
        self,
        url: str,
        action_dim: int | None = None,
        execute_steps: int | None = None,
        connect_timeout: float = 30.0,
        timeout: float = 60.0,
    ):
        check_options(
            {
                "url": url,
                "execute_steps": execute_steps,
                "connect_timeout": connect_timeout,
                "timeout": timeout,
            }
        )
        self.url, self.action_dim = url, action_dim
        self.connect_timeout, self.timeout = float(connect_timeout), float(timeout)
        self._conn, self.server = _connect(url, self.connect_timeout)
        server_dim = self.server.get("action_dim")
        if action_dim is not None and server_dim is not None and int(server_dim) != int(action_dim):
            self.close()
            raise DivlaEvalError(
                f"the policy at {url} acts in {server_dim} dimensions, this task in {action_dim}"
            )
        steps = execute_steps or self.server.get("execute_steps") or WHOLE_CHUNK
        # a foreign server does not say which cameras it reads: send the two LIBERO-style images
        cameras = tuple(self.server["cameras"] if "cameras" in self.server else wire.IMAGE_KEYS)
        self.metadata = PolicyMetadata(
            name="remote",
            cameras=cameras,
            execute_steps=int(steps),
            checkpoint_hash=self.server.get("checkpoint_hash"),
            reasoning=bool(self.server.get("reasoning", False)),
            obs_horizon=int(self.server.get("obs_horizon") or 1),
            info=_info(url, self.server),
        )
        self._episode: dict | None = None
        self._history: list[Observation] = []

    @classmethod
    def from_options(cls, action_dim: int | None = None, **options) -> RemotePolicy:
        return cls(action_dim=action_dim, **options)

    @staticmethod
    def check_options(options: dict) -> None:
        check_options(options)

    @classmethod
    def describe(cls, url: str, connect_timeout: float = 30.0, **_) -> dict:
        """The manifest's `policy_info`: the server's metadata frame, read once (waiting for a server
        that is still starting)."""
        return _info(url, server_metadata(url, connect_timeout))

    # --- the Policy protocol ----------------------------------------------------------------------------
    def reset(self, instruction: str, seed: int) -> None:
        self._episode = {"seed": int(seed), "instruction": instruction}
        self._history = []
        if self._conn is None:  # the server closed the last one after an inference error
            self._conn, self.server = _connect(self.url, self.connect_timeout)

    def observe(self, obs: Observation) -> None:
        """A step between calls (obs_horizon > 1): sent with the next request."""
        self._history.append(replace(obs, images={c: np.array(v) for c, v in obs.images.items()}))

    def infer(self, obs: Observation) -> ActionChunk:
        from websockets.exceptions import ConnectionClosed, ConnectionClosedError

        if self._conn is None:
            self._conn, self.server = _connect(self.url, self.connect_timeout)
        message = wire.packb(wire.observation_to_wire(obs, self._episode, self._history))
        self._episode, self._history = None, []
        try:
            self._conn.send(message)
            reply = self._conn.recv(timeout=self.timeout)
        except TimeoutError:
            self.close()  # a late reply would answer the next request
            raise RemoteTimeout(
                f"the policy server at {self.url} did not answer within {self.timeout:g} s"
            ) from None
        except ConnectionClosedError as exc:
            self.close()
            if exc.rcvd is not None and exc.rcvd.code == 1009:  # every observation would be refused
                raise RemoteServerGone(
                    f"the policy server at {self.url} refused an observation of {len(message)} bytes as "
                    "too big: start it with a larger --max-message-mb"
                ) from None
            raise RemoteServerGone(
                f"the policy server at {self.url} closed the connection ({exc}); finished episodes are "
                "kept: restart the server and rerun to resume"
            ) from None
        except ConnectionClosed as exc:
            self.close()
            raise RemoteServerGone(f"the policy server at {self.url} went away ({exc})") from None
        if isinstance(reply, str):  # the server's traceback; it closes the connection with 1011 next
            self.close()
            raise RemoteInferenceError(f"Error in inference server:\n{reply}")
        out = wire.unpackb(reply)
        actions = np.array(out.get("actions")) if isinstance(out, dict) else None
        if actions is None or actions.ndim != 2 or (self.action_dim and actions.shape[1] != self.action_dim):
            shown = None if actions is None else actions.shape
            raise RemoteInferenceError(
                f"the policy server at {self.url} answered actions of shape {shown}, "
                f"expected [H, {self.action_dim}]"
            )
        self.last_server_timing = out.get("server_timing") or {}
        """The server's own account of the last call (infer_ms, queue_ms, batch_size): the rest of the
        call's time is the wire's (serialisation and network)."""
        reasoning = out.get("reasoning")
        return ActionChunk(actions=actions, reasoning=reasoning if isinstance(reasoning, str) else None)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def __del__(self):
        if hasattr(self, "_conn"):  # not when __init__ failed before connecting
            self.close()


def _info(url: str, server: dict) -> dict:
    """What the records say about where actions came from: the URL, the server's metadata, and whether
    sampling was seeded per episode (only servers that honour our episode marker are)."""
    return {"url": url, "server": server, "seeded": bool(server.get("seeded", False))}


def check_options(options: dict) -> None:
    """Refuse what cannot work before anything connects (the runner's validation calls this)."""
    url = options.get("url")
    if not url:
        raise DivlaEvalError(
            "policy 'remote' needs --policy-option url=ws://HOST:PORT "
            "(start a server with `divla-eval serve`)"
        )
    if not str(url).startswith(("ws://", "wss://")):
        raise DivlaEvalError(f"policy option url={url!r}: expected ws://HOST:PORT or wss://HOST:PORT")
    for key in ("execute_steps",):
        if options.get(key) is not None and options[key] < 1:
            raise DivlaEvalError(f"policy option {key}={options[key]}: expected a positive integer")
    for key in ("connect_timeout", "timeout"):
        if options.get(key) is not None and options[key] <= 0:
            raise DivlaEvalError(f"policy option {key}={options[key]}: expected seconds > 0")
