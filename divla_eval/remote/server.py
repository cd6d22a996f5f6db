"""`divla-eval serve`: any policy behind openpi's websocket protocol, batching concurrent requests.

What it adds to openpi's reference server (which it stays wire-compatible with):
- Inference runs in one worker thread, off the event loop. The reference server calls `infer` inside
  its loop, so a call over ~40 s kills the connection by keepalive timeout and one slow client stalls
  every other one; here pings, health checks and other clients' messages go on while a model runs.
- Every connection is a session with its own copy of the policy's per-episode state (noise generator,
  observation history, reasoning cache) around shared weights (`fork_policy`), so several evaluation
  workers can share one server without seeing each other's episodes.
- Requests that arrive together are stacked into one forward pass when the policy can (`infer_batch`):
  at most `max_batch` of them, waiting at most `max_wait_ms` for the batch to fill.
- Our clients send an episode marker with the run's seed (`divla/episode`); the session is then reset
  with it, so remote sampling is seeded per episode exactly as in-process. A foreign client sends no
  marker: its session is reset (seed 0) on its first message and whenever the prompt changes.
- `GET /healthz` answers `OK`; an API key (`Authorization: Api-Key KEY`, the header openpi's client
  sends) is checked when set, and required for a non-loopback address; messages are capped in size.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import http
import ipaddress
import logging
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from divla_eval.errors import DivlaEvalError
from divla_eval.policy import BatchedPolicy, ForkablePolicy, PrivilegedPolicy
from divla_eval.remote import wire

log = logging.getLogger("divla_eval.serve")

DEFAULT_MAX_MESSAGE_MB = 64


def fork_policy(policy):
    """A session's copy of `policy`: its own per-episode state, the same model weights.

    A policy may define `fork()` itself (a `ForkablePolicy`); otherwise the object is deep-copied with
    every torch module it holds shared (put in deepcopy's memo), so a session costs its small state,
    not a second model."""
    if isinstance(policy, ForkablePolicy):
        return policy.fork()
    memo: dict[int, Any] = {}
    for value in vars(policy).values():
        if hasattr(value, "state_dict") and hasattr(value, "parameters"):  # a torch.nn.Module
            memo[id(value)] = value
    return copy.deepcopy(policy, memo)


def describe_policy(policy, name: str, options: dict | None = None) -> dict:
    """The metadata frame: what a client needs to run the policy, and what identifies it."""
    from importlib import metadata as importlib_metadata

    meta = policy.metadata
    cfg = getattr(getattr(policy, "model", None), "cfg", None)
    action_dim = getattr(cfg, "action_dim", None) or getattr(policy, "action_dim", None)
    chunk = getattr(cfg, "chunk", None) or getattr(policy, "chunk", None)
    embodiment = getattr(cfg, "embodiment", None)
    if embodiment is None and isinstance(getattr(cfg, "embodiments", None), dict):
        embodiment = next(iter(cfg.embodiments), None)
    try:
        version = importlib_metadata.version("divla-eval")
    except importlib_metadata.PackageNotFoundError:
        version = None
    return {
        "policy": name,
        "options": dict(options or {}),
        "action_dim": action_dim,
        "chunk": chunk,
        "execute_steps": meta.execute_steps,
        "cameras": list(meta.cameras),
        "image_size": getattr(cfg, "image_size", None),  # the resolution the model was trained at
        "obs_horizon": meta.obs_horizon,
        "reasoning": meta.reasoning,
        "embodiment": embodiment,
        "checkpoint_hash": meta.checkpoint_hash,
        "divla_eval_version": version,
        "seeded": True,  # sessions honour the divla/episode marker
        "image_keys": dict(wire.IMAGE_KEYS),
    }


@dataclass
class _Job:
    """One request: the session it belongs to, what to do before inferring, and where the answer goes."""

    session: Any
    obs: Any
    reset: tuple[str, int] | None
    history: list
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Collects requests from every connection and runs them in one inference thread, stacked into
    one forward pass (`infer_batch`) when the policy has one and several are waiting."""

    def __init__(self, max_batch: int = 1, max_wait_ms: float = 0.0):
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self._queue: asyncio.Queue[_Job] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="divla-infer")
        self.batches: list[int] = []
        """Size of every batch run so far (what the tests and `serve`'s log read)."""

    async def submit(self, job: _Job):
        if self._queue is None:
            self._queue = asyncio.Queue()
        await self._queue.put(job)
        return await job.future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
        while True:
            jobs = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            self.batches.append(len(jobs))
            results = await loop.run_in_executor(self._executor, _run_jobs, jobs)
            for job, (ok, value) in zip(jobs, results):
                if job.future.done():  # its client went away
                    continue
                if ok:
                    job.future.set_result(value)
                else:
                    job.future.set_exception(value)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _run_jobs(jobs: list[_Job]) -> list[tuple[bool, Any]]:
    """In the inference thread: reset and history first, then one batched call or one call per job.
    A batch that fails is rerun one job at a time, so an error is charged to the request that caused it."""
    results: list[tuple[bool, Any] | None] = [None] * len(jobs)
    ready = []
    for i, job in enumerate(jobs):
        try:
            if job.reset is not None:
                job.session.reset(*job.reset)
            for h in job.history:
                job.session.observe(h)
            ready.append(i)
        except Exception as exc:
            results[i] = (False, _InferenceFailure(traceback.format_exc(), exc))
    session = jobs[0].session
    batch_infer = type(session).infer_batch if isinstance(session, BatchedPolicy) else None
    timing = {"batch_size": len(ready)}
    if batch_infer is not None and len(ready) > 1:
        t0 = time.perf_counter()
        try:
            chunks = batch_infer([jobs[i].session for i in ready], [jobs[i].obs for i in ready])
            ms = (time.perf_counter() - t0) * 1000
            for i, chunk in zip(ready, chunks):
                results[i] = (True, (chunk, {**timing, "infer_ms": ms, "queue_ms": _queued_ms(jobs[i], t0)}))
            return results  # type: ignore[return-value]
        except Exception:
            log.warning("batched inference failed; running the %d requests one by one", len(ready))
    for i in ready:
        job = jobs[i]
        t0 = time.perf_counter()
        try:
            chunk = job.session.infer(job.obs)
            ms = (time.perf_counter() - t0) * 1000
            results[i] = (True, (chunk, {"batch_size": 1, "infer_ms": ms, "queue_ms": _queued_ms(job, t0)}))
        except Exception as exc:
            results[i] = (False, _InferenceFailure(traceback.format_exc(), exc))
    return results  # type: ignore[return-value]


def _queued_ms(job: _Job, started: float) -> float:
    return (started - job.queued) * 1000


class _InferenceFailure(Exception):
    """An exception of the policy, with the traceback text the client is sent."""

    def __init__(self, text: str, cause: BaseException):
        super().__init__(text)
        self.text = text
        self.cause = cause


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine ("" and 0.0.0.0 mean every interface)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PolicyServer:
    """Serves one loaded policy to any number of connections (see the module docstring).

    `start()` runs it in a background thread (tests, benchmarks); `serve_forever()` in the caller's.
    """

    def __init__(
        self,
        policy,
        name: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        options: dict | None = None,
        api_key: str | None = None,
        max_batch: int = 1,
        max_wait_ms: float = 0.0,
        max_message_mb: float = DEFAULT_MAX_MESSAGE_MB,
    ):
        if policy.metadata.privileged or isinstance(policy, PrivilegedPolicy):
            raise DivlaEvalError(
                f"policy {name!r} is privileged (it reads the simulator's state), so it cannot be served; "
                "serve a learned policy or random"
            )
        if not is_loopback(host) and not api_key:
            raise DivlaEvalError(
                f"binding {host} exposes the policy beyond this machine: set an API key "
                "(--api-key KEY or DIVLA_EVAL_API_KEY) that clients send as 'Authorization: Api-Key KEY'"
            )
        if max_batch < 1 or max_wait_ms < 0 or max_message_mb <= 0:
            raise DivlaEvalError("--max-batch must be >= 1, --max-wait-ms >= 0 and --max-message-mb > 0")
        self.policy, self.name, self.host, self.port = policy, name, host, port
        self.api_key = api_key
        self.max_message_bytes = int(max_message_mb * 1024 * 1024)
        self.metadata = describe_policy(policy, name, options)
        self.metadata["max_batch"] = max_batch
        self.batcher = Batcher(max_batch, max_wait_ms)
        self._default_embodiment = self.metadata.get("embodiment") or "panda"
        self._server = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.connections = 0

    # --- running -------------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        asyncio.run(self._main())

    def start(self) -> PolicyServer:
        """Serve in a daemon thread; returns once the port is bound (`self.port` is the real one)."""
        self._thread = threading.Thread(target=self.serve_forever, name="divla-serve", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the policy server did not start within 30 s")
        return self

    def stop(self) -> None:
        """Close the server and its connections and wait for its thread; calling it twice is harmless."""
        if self._loop is not None and self._server is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._server.close)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.batcher.close()

    def wait(self) -> None:
        """Block until the server thread ends (Ctrl-C, mapped from SIGTERM by the CLI, ends the wait)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    async def _main(self) -> None:
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        batch_task = asyncio.create_task(self.batcher.run())
        try:
            async with serve(
                self._handle,
                self.host,
                self.port,
                compression=None,
                max_size=self.max_message_bytes,
                process_request=self._process_request,
            ) as server:
                self._server = server
                self.port = server.sockets[0].getsockname()[1]
                self._ready.set()
                await server.wait_closed()
        finally:
            batch_task.cancel()

    # --- HTTP: health check and API key ----------------------------------------------------------------
    def _process_request(self, connection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.api_key:
            given = request.headers.get("Authorization", "")
            expected = f"Api-Key {self.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
        return None

    # --- one connection = one session --------------------------------------------------------------------
    async def _handle(self, websocket) -> None:
        import websockets

        self.connections += 1
        session = fork_policy(self.policy)
        prompt: str | None = None
        await websocket.send(wire.packb(self.metadata))
        previous_total = None
        while True:
            try:
                message = await websocket.recv()
            except websockets.ConnectionClosed:
                return
            start = time.perf_counter()
            try:
                if isinstance(message, str):
                    raise wire.WireError("expected a binary msgpack frame, got text")
                msg = wire.unpackb(message)
                obs = wire.observation_from_wire(msg, self._default_embodiment)
                episode = msg.get(wire.EPISODE_KEY)
                if episode is not None:
                    reset = (str(episode["instruction"]), int(episode["seed"]))
                elif prompt is None or obs.instruction != prompt:
                    reset = (obs.instruction, 0)  # a foreign client: no episode boundaries, no seed
                else:
                    reset = None
                prompt = obs.instruction
                history = [
                    wire.observation_from_wire(h, self._default_embodiment)
                    for h in msg.get(wire.HISTORY_KEY, [])
                ]
                job = _Job(session, obs, reset, history, asyncio.get_running_loop().create_future())
                chunk, timing = await self.batcher.submit(job)
                reply = {
                    "actions": np.asarray(chunk.actions),
                    "reasoning": chunk.reasoning,
                    "server_timing": dict(timing),
                }
                if previous_total is not None:
                    reply["server_timing"]["prev_total_ms"] = previous_total
                await websocket.send(wire.packb(reply))
                previous_total = (time.perf_counter() - start) * 1000
            except websockets.ConnectionClosed:
                return
            except Exception as exc:
                text = exc.text if isinstance(exc, _InferenceFailure) else traceback.format_exc()
                log.warning(
                    "inference error for %s: %s", websocket.remote_address, text.strip().splitlines()[-1]
                )
                try:
                    await websocket.send(text)
                    await websocket.close(
                        code=1011, reason="Internal server error. Traceback in previous frame."
                    )
                except websockets.ConnectionClosed:
                    pass
                return
