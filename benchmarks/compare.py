"""Compare a pytest-benchmark JSON with the stored baseline, in units of the reference matmul.

    python benchmarks/compare.py NEW.json [BASELINE.json] [--tolerance 1.5]

Raw medians move with the machine (another CPU, a busy one), so each benchmark's median is divided by
the median of `test_reference_matmul` from the same run, and that ratio is compared with the same
ratio in the baseline. A benchmark fails when its ratio grew by more than the tolerance (default
`divla_eval.regression.SPEED_TOLERANCE`, measured from repeated runs: docs/regression.md). A benchmark
of the new run without a stored entry fails (MISSING), and all fail (STALE) when the baseline has no
reference: `nox -s bench_baseline` stores a new baseline. Exit codes: 0 pass, 1 regression or stale
baseline, 2 bad input (a missing or damaged file, a new run without the reference).

The rule lives in divla_eval/regression.py, shared with `divla-eval regression` and `nox -s regression`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from divla_eval.regression import bench_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_main())
