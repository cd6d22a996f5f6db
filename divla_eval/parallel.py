"""Run episodes through one worker object per process, serially or in a spawned process pool.

Shared by evaluation (`runner`) and demonstration collection (`data.collect`), as the `local` backend
of `divla_eval.backends` (whose `ray` backend runs the same workers on Ray actors). Each process builds
its own worker (one simulator, one renderer: DESIGN.md), and results come back to the caller, which
alone writes files. Results do not depend on the number of workers because every episode's seeds come from
its name.

Worker processes are spawned, so each one re-runs the main script without its
`if __name__ == "__main__":` block (see `check_spawn_safe`, which refuses the cases that cannot work
before any worker starts).

Workers die with their parent (`die_with_parent`): a `run` killed with SIGKILL (an OOM killer, a batch
scheduler's hard stop, `kill -9`) cannot shut its pool down, and its workers (~600 MB each, blocked on
a queue whose write end they hold themselves) used to run on for good.
"""

from __future__ import annotations

import ast
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from divla_eval.errors import DivlaEvalError

_worker: Any = None
_init_error: Exception | None = None


PARENT_POLL_S = 0.5
"""How often a worker's watcher thread checks that its parent is alive (where prctl is missing)."""


def die_with_parent(parent_pid: int) -> None:
    """End this process when `parent_pid` (the process that spawned it) dies, however it dies.

    On Linux the kernel does it: prctl(PR_SET_PDEATHSIG, SIGKILL) delivers SIGKILL when the parent
    goes (strictly, when the parent's thread that spawned us does: `run_unordered` submits from the
    thread that consumes the results, which lives as long as the pool). A daemon thread that watches
    the parent pid is the portable fallback (macOS has no prctl) and covers the race where the parent
    died before the prctl call. A worker holds nothing to save: the parent alone writes files."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # already orphaned: adopted by init or a subreaper
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="divla-eval-parent-watch", daemon=True).start()


def _init(factory: Callable, args: tuple, parent_pid: int | None = None) -> None:
    global _worker, _init_error
    if parent_pid is not None:
        die_with_parent(parent_pid)
    try:
        _worker = factory(*args)
    except Exception as exc:
        # Raised again with the first item, so the caller gets the reason (a user error such as an
        # unknown policy, a bad checkpoint) instead of the pool's bare "a process died".
        _init_error = exc


def _call(item):
    if _init_error is not None:
        raise _init_error
    return item, _worker.run(item)


GUARD_HELP = (
    'put the code that starts the run under `if __name__ == "__main__":` (each worker process re-runs '
    "the main script without that block), or use workers=1"
)


def check_spawn_safe() -> None:
    """Refuse, before any process starts, a parallel run that spawned workers cannot join.

    A spawned worker re-runs the main script (as `__mp_main__`) to find what the parent pickled. A
    script that starts the run at its top level, unguarded, would start it again in every worker:
    measured, the workers died and the run ended in "a worker process died" (and with the runner's
    lock, in a second error about the run directory being in use). A script read from stdin
    (`python -`) names `<stdin>` as its file, which the workers cannot re-read: they die the same
    way. `python -c` and notebooks re-run nothing, so they pass (objects defined there must then
    travel by value, as the runner sends policy objects)."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise DivlaEvalError(
            f"a worker process, re-running the main script, tried to start a run: {GUARD_HELP}"
        )
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    path = getattr(main, "__file__", None)
    if spec_name is not None:  # `python -m`: the module is re-run unless it is a package's __main__
        if spec_name == "__main__" or spec_name.endswith(".__main__"):
            return
    elif path is None:
        return
    elif not os.path.isfile(path):
        raise DivlaEvalError(
            f"worker processes re-run the main script from its file, and there is none ({path!r}: a script "
            "read from stdin?): save the script to a file and run that, or use workers=1"
        )
    if path is not None and _called_unguarded(main, path):
        raise DivlaEvalError(f"{path} starts a parallel run at its top level: {GUARD_HELP}")


def _called_unguarded(main, path: str) -> bool:
    """Is this call made by the main script's top-level code outside `if __name__ == "__main__":`?
    (False when that cannot be told: no source, or not called from the script's top level.)"""
    line = None
    frame = sys._getframe(1)
    while frame is not None:  # the outermost top-level frame of the main script
        if frame.f_code.co_name == "<module>" and frame.f_globals is vars(main):
            line = frame.f_lineno
        frame = frame.f_back
    if line is None:
        return False
    try:
        tree = ast.parse(Path(path).read_text(), path)
    except (OSError, SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test) and node.body:
            if node.body[0].lineno <= line <= (node.body[-1].end_lineno or node.body[-1].lineno):
                return False
    return True


def _is_main_test(test: ast.expr) -> bool:
    """`__name__ == "__main__"`, either way round."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    values = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and values == ["__main__"]


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
    if workers > 1:
        check_spawn_safe()
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
        initargs=(factory, args, os.getpid()),
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
