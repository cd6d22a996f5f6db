"""Run episodes through one worker object per process, serially or in a spawned process pool.

Shared by evaluation (`runner`) and demonstration collection (`data.collect`). Each process builds its
own worker (one simulator, one renderer: DESIGN.md), and results come back to the caller, which alone
writes files. Results do not depend on the number of workers because every episode's seeds come from
its name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from divla_eval.errors import DivlaEvalError

_worker: Any = None


def _init(factory: Callable, args: tuple) -> None:
    global _worker
    _worker = factory(*args)


def _call(item):
    return item, _worker.run(item)


def run_unordered(
    factory: Callable, args: tuple, items: Iterable, workers: int, what: str
) -> Iterator[tuple]:
    """Yield (item, factory(*args).run(item)) as items finish; in completion order when workers > 1.

    `factory` must be picklable (a module-level class); the object it makes needs `run` and `close`.
    `what` names the results in the message shown when a worker process dies.
    """
    items = list(items)
    if not items:
        return
    if workers == 1:
        worker = factory(*args)
        try:
            for item in items:
                yield item, worker.run(item)
        finally:
            worker.close()
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(items)),
        mp_context=multiprocessing.get_context("spawn"),  # no forked GL or MuJoCo state
        initializer=_init,
        initargs=(factory, args),
    )
    try:
        futures = [pool.submit(_call, item) for item in items]
        for future in as_completed(futures):
            yield future.result()
    except BrokenProcessPool as exc:
        raise DivlaEvalError(
            f"a worker process died ({exc}); finished {what} are saved, rerun the same command to resume"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
