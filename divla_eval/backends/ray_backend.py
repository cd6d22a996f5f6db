"""The Ray backend: one actor per simulator, built once, reused for many episodes (docs/ray.md).

Each actor (`EpisodeActor`, one CPU, or a GPU fraction for a model on CUDA) builds one worker (its env
and its policy: `runner.EpisodeWorker`, or `collect`'s expert) and runs the episodes it is handed one at
a time. The driver hands every actor one episode, waits for whichever finishes first
(`ray.wait(num_returns=1)`), yields its result to the caller, which writes the record (only the
driver writes the run's files), and hands that actor the next episode. So results stream back in
completion order, and an actor that dies loses only the episode it was running.

An actor that dies while running an episode (`RayActorError`: a policy calling `os._exit`, a
segfault, the OOM killer, a node going away) is killed and replaced by a fresh one, which retries that
episode once; if the retry dies too, the episode is recorded as an error with the reason
(`on_crash`). An actor that dies while being built stops the run, as a dead local worker process
does: nothing could run. An exception that a worker raises on purpose (a user error found while
building the policy, a `fatal` one such as a remote policy's server being gone) reaches the caller
as itself and stops the run with its one line, as with the local backend.

Actors get the driver's torch-thread, device and rendering settings (`DIVLA_EVAL_*`, `MUJOCO_GL`,
`PYOPENGL_PLATFORM`) and the directories of its `sys.path` that exist on their node (what spawned
local workers inherit too), before anything of divla-eval is unpickled in them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from divla_eval.backends import Backend
from divla_eval.errors import DivlaEvalError

RETRIES = 1
"""How many times an episode whose actor died is rerun on a fresh actor before it is recorded as an error."""
CONNECT_TIMEOUT_S = 5.0
"""How long to wait for a TCP connection to the cluster's address before saying it cannot be reached
(`ray.init` itself retries an unreachable address for minutes)."""
CLOSE_TIMEOUT_S = 30.0
"""How long finished actors get to close their simulators and policies before they are killed."""
ENV_NAMES = ("MUJOCO_GL", "PYOPENGL_PLATFORM")
ENV_PREFIX = "DIVLA_EVAL_"


class EpisodeActor:
    """One simulator and one policy in a Ray worker process (made a Ray actor by `RayBackend`)."""

    def __init__(self, env: dict[str, str], sys_path: list[str]):
        os.environ.update(env)  # before the worker is unpickled: MUJOCO_GL is read when mujoco loads
        for path in sys_path:
            if path and path not in sys.path and os.path.isdir(path):
                sys.path.append(path)
        self.worker: Any = None
        self.error: BaseException | None = None

    def build(self, payload: bytes) -> dict:
        """Build the worker from cloudpickled `(factory, args)`. An exception is kept and raised again
        with the first episode (so the driver gets the reason, as from a local worker process)."""
        import pickle

        try:
            factory, args = pickle.loads(payload)
            self.worker = factory(*args)
        except Exception as exc:
            self.error = _portable(exc)
        return {"pid": os.getpid(), "node": _node_ip()}

    def run(self, item) -> tuple[str, Any]:
        if self.error is not None:
            return "raise", self.error
        try:
            return "ok", self.worker.run(item)
        except Exception as exc:  # a worker's own exceptions (fatal ones) stop the run, as locally
            return "raise", _portable(exc)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None


def _node_ip() -> str | None:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return None


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (to reach the driver), else a DivlaEvalError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        error = DivlaEvalError(f"{type(exc).__name__}: {exc}")
        if getattr(exc, "fatal", False):
            error.fatal = True  # type: ignore[attr-defined]
        return error


def actor_died_reason(exc: BaseException) -> str:
    """One line from a RayActorError: its class, first line, and the worker's exit type and detail."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = f"{type(exc).__name__}: {lines[0] if lines else 'the actor died'}"
    exit_type = re.search(r"Worker exit type: (\S+)", text)
    detail = re.search(r"Worker exit detail: (.*?)(?: Some common causes|$)", text, re.S)
    if exit_type:
        reason += f" (exit type {exit_type.group(1)}"
        if detail:
            reason += f": {' '.join(detail.group(1).split())[:300]}"
        reason += ")"
    return reason


def check_reachable(address: str) -> None:
    """One line, quickly, when nothing listens at `address` (HOST:PORT or ray://HOST:PORT): `ray.init`
    would retry it for minutes. `auto` and `local` are left to Ray."""
    text = address.strip()
    if text in ("auto", "local"):
        return
    host_port = text.split("://", 1)[1] if "://" in text else text
    host, sep, port = host_port.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise DivlaEvalError(
            f"--ray-address {address!r} is not HOST:PORT (the head's GCS address, e.g. 10.0.0.5:6379), "
            "'auto' or ray://HOST:PORT"
        )
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise DivlaEvalError(
            f"cannot reach a Ray cluster at {address}: {why} (start one there with `ray start --head`; "
            "see docs/ray.md)"
        ) from None


class _Slot:
    """One actor and the reference to its build call."""

    def __init__(self, actor_cls, env: dict, sys_path: list[str], payload):
        self.actor = actor_cls.remote(env, sys_path)
        self.build = self.actor.build.remote(payload)

    def died_building(self) -> bool:
        import ray

        ready, _ = ray.wait([self.build], timeout=5.0)
        if not ready:
            return True
        try:
            ray.get(self.build)
        except Exception:
            return True
        return False

    def kill(self) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)


class RayBackend(Backend):
    """Episodes on Ray actors: on a local cluster (started on first use, with at least as many CPUs as
    actors) or on the cluster at `address`. A connection made before (`ray.init` by the caller) is used
    as it is. The connection stays open for the next run of the process (Ray closes it at exit)."""

    name = "ray"

    def __init__(self, address: str | None = None, gpus_per_actor: float | str | None = None):
        self.address = address
        self.gpus_per_actor = gpus_per_actor
        """GPU fraction each actor reserves; "auto": the cluster's GPUs shared by the actors (at most
        one each), for a model that runs inside the actor on CUDA; None: no GPU."""
        self._joined: str | None = None  # how this process came to be connected

    # --- the cluster -----------------------------------------------------------------------------------
    def connect(self, workers: int = 1) -> None:
        import ray

        if self.address is not None:
            check_reachable(self.address)  # also when connected already: a wrong address is one line
        if not ray.is_initialized():
            self._joined = self._init(ray, workers)
        elif self._joined is None:
            ours = _JOINED.get("gcs") is not None and _JOINED.get("gcs") == _gcs_address()
            self._joined = _JOINED["how"] if ours else "an existing connection (ray.init by the caller)"
        self.check(workers)

    def _init(self, ray, workers: int) -> str:
        # no address: a new cluster of this process's own ("local"; Ray's None would join a cluster that
        # `ray start` left on this machine, whatever its size: ask for that one with --ray-address auto)
        address = self.address or os.environ.get("RAY_ADDRESS") or "local"
        if self.address is None and address != "local":
            check_reachable(address)
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if address == "local":
            # this machine's simulators: the local backend's cap (4 per core, ~600 MB each), and every
            # actor gets its CPU, as every local worker process does
            from divla_eval.runner import check_parallelism

            check_parallelism(workers)
            kwargs["num_cpus"] = max(os.cpu_count() or 1, workers)
        else:
            _token_auth_if_token()
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if on_main else None
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:
            where = f"the Ray cluster at {address}" if address != "local" else "a local Ray cluster"
            raise DivlaEvalError(f"cannot join {where}: {_join_error(exc)}") from None
        finally:
            # ray.init makes SIGTERM exit the process at once; keep the CLI's handler, which stops a
            # run as Ctrl-C does (what finished is kept and the command says so)
            if on_main and previous is not None:
                signal.signal(signal.SIGTERM, previous)
        _JOINED.update(how=address, gcs=_gcs_address())
        return address

    def check(self, workers: int) -> None:
        import ray

        if workers < 1:
            raise DivlaEvalError(f"--workers must be a positive integer, got {workers}")
        resources = ray.cluster_resources()
        cpus = resources.get("CPU", 0)
        if workers > cpus:
            raise DivlaEvalError(
                f"--workers {workers} Ray actors need {workers} CPUs (one each) and the Ray cluster "
                f"({self._joined}) has {cpus:g}: use --workers {int(cpus) or 1} or add nodes"
            )
        if self.gpus_per_actor:
            gpus = resources.get("GPU", 0)
            if not gpus:
                raise DivlaEvalError(
                    f"the policy runs on CUDA in each Ray actor, and the Ray cluster ({self._joined}) has "
                    "no GPU: use --device cpu, or add GPU nodes"
                )
            if self.gpus_per_actor == "auto":
                self.gpus_per_actor = math.floor(min(1.0, gpus / workers) * 10_000) / 10_000
            if workers * self.gpus_per_actor > gpus + 1e-9:
                raise DivlaEvalError(
                    f"{workers} Ray actors of {self.gpus_per_actor:g} GPU each need "
                    f"{workers * self.gpus_per_actor:g} GPUs and the Ray cluster has {gpus:g}"
                )

    def info(self) -> dict:
        import ray

        info: dict[str, Any] = {"backend": "ray", "ray_address": self._joined, "ray_version": ray.__version__}
        info["ray_gcs_address"] = _gcs_address()
        with contextlib.suppress(Exception):
            info["ray_nodes"] = sum(1 for n in ray.nodes() if n.get("Alive"))
            info["ray_cpus"] = ray.cluster_resources().get("CPU", 0)
        info["actor_resources"] = {"CPU": 1, **({"GPU": self.gpus_per_actor} if self.gpus_per_actor else {})}
        return info

    # --- running -----------------------------------------------------------------------------------------
    def run_unordered(
        self,
        factory: Callable,
        args: tuple,
        items: Iterable,
        workers: int,
        what: str,
        on_crash: Callable[[Any, str], Any] | None = None,
    ) -> Iterator[tuple]:
        items = list(items)
        if not items:
            return
        self.connect(workers)  # a no-op once connected
        import cloudpickle
        import ray
        from ray.exceptions import RayActorError

        options: dict[str, Any] = {"num_cpus": 1, "max_restarts": 0, "max_task_retries": 0}
        if self.gpus_per_actor:
            options["num_gpus"] = self.gpus_per_actor
        actor_cls = ray.remote(EpisodeActor).options(**options)
        try:
            payload = ray.put(cloudpickle.dumps((factory, args)))
        except Exception as exc:
            raise DivlaEvalError(
                f"the run cannot be sent to Ray actors ({type(exc).__name__}: {exc}); use --backend local"
            ) from None
        env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX) or k in ENV_NAMES}
        sys_path = list(sys.path)

        def new_slot() -> _Slot:
            return _Slot(actor_cls, env, sys_path, payload)

        pending: deque[tuple[int, Any]] = deque(enumerate(items))
        tries: dict[int, int] = {}
        slots: list[_Slot] = []
        inflight: dict[Any, tuple[int, int, Any]] = {}  # ref -> (slot, item index, item)

        def submit(slot: int) -> None:
            if pending:
                index, item = pending.popleft()
                inflight[slots[slot].actor.run.remote(item)] = (slot, index, item)

        finished = False
        try:
            for _ in range(min(workers, len(items))):
                slots.append(new_slot())
            for slot in range(len(slots)):
                submit(slot)
            while inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                slot, index, item = inflight.pop(ready[0])
                try:
                    tag, value = ray.get(ready[0])
                except RayActorError as exc:
                    reason = actor_died_reason(exc)
                    if slots[slot].died_building():
                        raise DivlaEvalError(
                            f"a Ray actor died while building its simulator and policy ({reason}); "
                            f"finished {what} are saved, rerun the same command to resume"
                        ) from None
                    slots[slot].kill()
                    slots[slot] = new_slot()
                    tries[index] = tries.get(index, 0) + 1
                    if tries[index] <= RETRIES:
                        pending.appendleft((index, item))  # on the fresh actor, next
                    elif on_crash is None:
                        raise DivlaEvalError(
                            f"a Ray actor died {tries[index]} times running one of the {what} ({reason}); "
                            f"finished {what} are saved, rerun the same command to resume"
                        ) from None
                    else:
                        why = f"its Ray actor died, on {tries[index]} tries (a fresh actor each): {reason}"
                        yield item, on_crash(item, why)
                    submit(slot)
                    continue
                if tag == "raise":
                    raise value
                yield item, value
                submit(slot)
            finished = True
        finally:
            if finished:  # let each actor close its simulator and policy (a remote policy's connection)
                with contextlib.suppress(Exception):
                    ray.get([s.actor.close.remote() for s in slots], timeout=CLOSE_TIMEOUT_S)
            for s in slots:
                s.kill()


_JOINED: dict[str, str | None] = {}
"""How this process joined Ray ("how": the address, or "local") and the GCS address it got, for the
manifests of later runs on the same connection."""


def _token_auth_if_token() -> None:
    """Send this machine's Ray token when joining a cluster. Ray 2.60 clusters use token
    authentication by default, and a driver joining one by address sends no token unless
    RAY_AUTH_MODE=token is set (measured: "Authentication token is missing or incorrect", after ~20 s
    of retries), although a local cluster turns it on by itself when a token exists. Do what the
    local start does: token mode when RAY_AUTH_MODE is unset and a token is there (~/.ray/auth_token,
    RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except Exception:  # another Ray version: leave it to Ray
        pass


def _join_error(exc: BaseException) -> str:
    """One line for a failed `ray.init`: its first line, and what to do when the cause is the token."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    chain, cause = [], exc
    while cause is not None and len(chain) < 10:
        chain.append(f"{type(cause).__name__} {cause}")
        cause = cause.__cause__ or cause.__context__
    if any("AuthToken" in text or "Authentication" in text for text in chain):
        first += (
            " (the cluster wants its token: copy the head's ~/.ray/auth_token to this machine, or set "
            "RAY_AUTH_TOKEN; see docs/ray.md)"
        )
    return first


def _gcs_address() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().gcs_address
    except Exception:
        return None
