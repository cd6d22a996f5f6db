"""MuJoCo picks its GL backend at import: default to EGL before any test module imports mujoco.

`timed`: how every benchmark except the reference itself is timed, so that the speed gate
(benchmarks/compare.py) can put it in machine-free units even on a busy machine."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import statistics  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

BUDGET_S = 2.0
"""Seconds of rounds per benchmark (its calls and the interleaved reference calls together)."""
ROUNDS = (8, 1000)


@pytest.fixture
def timed(benchmark):
    """`timed(fn, *args)`: `benchmark.pedantic` with one call of the reference matmul
    (`divla_eval.regression.reference_call`) before every round, timed apart; the median of those goes
    into the benchmark's `extra_info` as its unit. Other jobs on the machine come and go within seconds,
    and they slow a 3 ms matmul and a 100 ms policy call differently: a reference timed at another
    moment (the run's test_reference_matmul) left medians 1.4-2.7x apart between unchanged runs here,
    one interleaved with the rounds less (docs/regression.md). Rounds: as many as fit in BUDGET_S."""
    from divla_eval.regression import INTERLEAVED, reference_call

    ref, label = reference_call()

    def run(fn, *args):
        for _ in range(3):  # warm-up: lazy allocations, caches
            fn(*args)
            ref()
        t0 = time.perf_counter()
        fn(*args)
        ref()
        rounds = int(min(ROUNDS[1], max(ROUNDS[0], BUDGET_S / (time.perf_counter() - t0))))
        seconds = []

        def reference():
            t = time.perf_counter()
            ref()
            seconds.append(time.perf_counter() - t)

        result = benchmark.pedantic(fn, args=args, setup=reference, rounds=rounds, warmup_rounds=1)
        benchmark.extra_info[INTERLEAVED] = statistics.median(seconds[1:])  # after the warm-up round
        benchmark.extra_info["reference"] = label
        return result

    return run
