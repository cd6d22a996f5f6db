"""Where episodes run: local processes (the default) or Ray actors; the records are the same either way.

A backend takes a worker factory (a class such as `runner.EpisodeWorker` or `data.collect._Collector`:
built once per simulator, `run(item)` per episode, `close()` at the end) and a list of items, and
yields `(item, result)` as items finish. It never writes the run's files: the caller (the runner's
`_run_locked`, `collect`) is the one writer of `episodes.jsonl`, the manifest and the HDF5 file, so
resume, fsync and the disk-full handling are the same for every backend. Results do not depend on the
backend or on the number of simulators, because every episode's seeds come from its name.

- `local`: `divla_eval.parallel.run_unordered` (in this process with one worker, else a spawned
  process pool). A worker process that dies stops the run (finished episodes are kept).
- `ray`: one Ray actor per simulator (`divla_eval.backends.ray_backend`), on a local cluster or the
  one at `address`; an actor that dies has its episode retried once on a fresh actor, then recorded as
  an error with the reason. Needs `pip install 'divla-eval[ray]'`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from divla_eval.errors import DivlaEvalError

BACKENDS = ("local", "ray")
"""The valid `--backend` names; the first is the default."""

RAY_INSTALL_HINT = "pip install 'divla-eval[ray]'"


class Backend:
    """Runs items through one worker object per simulator; see the module docstring."""

    name = "base"

    def connect(self, workers: int = 1) -> None:
        """Reach whatever runs the episodes (a cluster) and check that it can run `workers` simulators,
        or say in one line why not. Called before the run directory is touched, so an unreachable
        cluster leaves nothing behind."""

    def info(self) -> dict:
        """What the manifest's `sessions` entry records about this backend."""
        return {"backend": self.name}

    def run_unordered(
        self,
        factory: Callable,
        args: tuple,
        items: Iterable,
        workers: int,
        what: str,
        on_crash: Callable[[Any, str], Any] | None = None,
    ) -> Iterator[tuple]:
        """Yield `(item, factory(*args).run(item))` as items finish (in completion order when
        workers > 1). `what` names the results in messages ("episodes", "demos"). `on_crash(item,
        reason)`: the result to yield for an item whose simulator process died twice running it (a
        backend that can retry, Ray's; the local pool stops the run instead)."""
        raise NotImplementedError


class LocalBackend(Backend):
    """Episodes in this process (one worker) or in spawned local processes (`divla_eval.parallel`)."""

    name = "local"

    def connect(self, workers: int = 1) -> None:
        from divla_eval.runner import check_parallelism

        check_parallelism(workers)  # at most 4 simulator processes per core

    def run_unordered(self, factory, args, items, workers, what, on_crash=None):
        from divla_eval.parallel import run_unordered

        return run_unordered(factory, args, items, workers, what)


def check_backend_name(name: str) -> str:
    """`name` if it is a backend, else one line naming the valid ones."""
    if name not in BACKENDS:
        raise DivlaEvalError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    return name


def get_backend(
    name: str | Backend | None = "local",
    address: str | None = None,
    gpus_per_actor: float | str | None = None,
) -> Backend:
    """The backend called `name` (or `name` itself when it is one already; None is local).

    `address`: the Ray cluster to join (`HOST:PORT` of its head, `auto`, or `ray://HOST:PORT`); None
    starts a local cluster, or joins the one `RAY_ADDRESS` names. `gpus_per_actor`: the GPU fraction
    each Ray actor reserves, for a policy that runs its model in the actor on CUDA ("auto": the
    cluster's GPUs shared by the actors, at most one each). Unknown names,
    an address without `ray`, or `ray` not installed: one line."""
    if isinstance(name, Backend):
        return name
    name = check_backend_name(name or "local")
    if name == "local":
        if address is not None:
            raise DivlaEvalError("--ray-address needs --backend ray")
        return LocalBackend()
    try:
        import ray  # noqa: F401
    except ImportError:
        raise DivlaEvalError(f"--backend ray needs Ray, which is not installed: {RAY_INSTALL_HINT}") from None
    from divla_eval.backends.ray_backend import RayBackend

    return RayBackend(address=address, gpus_per_actor=gpus_per_actor)


def crashed_episode(spec, reason: str):
    """The outcome of an episode whose simulator process died under it, twice (a Ray actor: a policy
    calling `os._exit`, a segfault, the OOM killer, a lost node): an `error`, counted as a failure,
    with the reason and what the episode's spec alone gives (its perturbations' parameters)."""
    from divla_eval.envs.perturbations import for_episode, params_of
    from divla_eval.episode import EpisodeOutcome

    perturbations = params_of(for_episode(spec))  # a pure function of the spec (validated before the run)
    return EpisodeOutcome(failure_mode="error", perturbations=perturbations, status="error", error=reason)


__all__ = ["BACKENDS", "Backend", "LocalBackend", "check_backend_name", "crashed_episode", "get_backend"]
