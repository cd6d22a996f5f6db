"""How far a benchmark's machine-free median moves between runs on one machine: the speed gate's noise.

    python benchmarks/spread.py RUN1.json RUN2.json ... [--margin 1.25]

Each file is one `pytest benchmarks --benchmark-json=...` run. For every benchmark, its median in units
of the same run's reference matmul median (the speed gate's unit), then the largest growth that any
ordered pair of runs shows (max / min over the runs): a gate with a tolerance below that would have
failed one of these unchanged runs against another. The suggested tolerance is the largest of them
times --margin (a handful of runs does not show the tails). docs/regression.md has the measurement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from divla_eval.regression import REFERENCE, read_bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="pytest-benchmark JSON files of unchanged code")
    ap.add_argument("--margin", type=float, default=1.25, help="factor over the largest spread seen")
    ap.add_argument(
        "--run-unit", action="store_true", help="also show each ratio against the run's reference benchmark"
    )
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        ap.error("need at least two runs")
    runs = [read_bench(p) for p in args.runs]
    if any(REFERENCE not in r.medians for r in runs):
        ap.error(f"every run needs {REFERENCE}")
    names = sorted(set.intersection(*(set(r.medians) for r in runs)) - {REFERENCE})
    print(f"{len(runs)} runs; median / median of its reference call (the gate's unit), max/min over the runs")
    print(f"{'benchmark':48s} {'min':>9s} {'max':>9s} {'max/min':>8s}")
    worst = 1.0
    ref_ms = [r.medians[REFERENCE] * 1e3 for r in runs]
    raw = f"{REFERENCE} (ms, raw)"
    print(f"{raw:48s} {min(ref_ms):9.3f} {max(ref_ms):9.3f} {max(ref_ms) / min(ref_ms):7.2f}x")
    for name in names:
        ratios = [r.ratio(name)[0] for r in runs]
        spread = max(ratios) / min(ratios)
        worst = max(worst, spread)
        print(f"{name:48s} {min(ratios):9.3f} {max(ratios):9.3f} {spread:7.2f}x")
        if args.run_unit and all(name in r.references for r in runs):  # the same runs, the run's unit
            old = [r.medians[name] / r.medians[REFERENCE] for r in runs]
            print(
                f"{'  (unit: the run`s ' + REFERENCE + ')':48s} {min(old):9.3f} {max(old):9.3f} "
                f"{max(old) / min(old):7.2f}x"
            )
    suggested = worst * args.margin
    print(f"largest spread {worst:.2f}x; suggested tolerance {suggested:.2f}x (margin {args.margin:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
