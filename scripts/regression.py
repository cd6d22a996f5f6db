"""Success-rate regression check: rerun a fixed small episode grid and compare with stored rates.

    python scripts/regression.py                 # run the grid fresh, compare, exit 1 on a regression
    python scripts/regression.py --update        # run it and store the rates as the new baseline
    python scripts/regression.py --cells A --update   # store cell A anew, keep the others
    python scripts/regression.py --no-run        # compare the run directories already in --out

A cell regresses when its stored success rate lies above the upper end of the new run's Wilson 95%
interval: a drop that the new run's own sampling noise cannot explain. Small cells thus catch only
large drops, except at a stored 100%, where any failure fails (the upper bound of 9/10 is 98%): right
for the scripted expert, whose rollouts are deterministic for fixed seeds. DiVLA's cell has 40
episodes because at its ~10% rate 30 could not flag even 0/30 (Wilson upper bound 11.4%), while
0/40 (8.8%) is flagged. The grid stays small so that the check fits in a CI job on two cores.
Each cell is an ordinary `divla-eval run`, so its records (runs/regression/<cell>/) can be read
with `divla-eval report`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from divla_eval.metrics import wilson_interval  # noqa: E402


@dataclass(frozen=True)
class Cell:
    name: str
    args: str
    """`divla-eval run` arguments, without --episodes, --out and --workers."""
    episodes: int


CELLS = (
    Cell(
        "divla-bin_picking-unseen",
        "--task bin_picking --objects unseen --policy divla --checkpoint checkpoints/divla-bin_picking "
        "--seed 0",
        40,
    ),
    Cell("scripted-bin_picking-unseen", "--task bin_picking --objects unseen --policy scripted --seed 0", 10),
    # the learned baseline with the highest shipped rate (30/100 on the full cell): 30 episodes flag
    # a fall from the stored 14/30 to 8/30 or fewer (Wilson upper bound of 8/30: 44%)
    Cell(
        "diffusion_policy-multitask-flip_pot",
        "--task multitask --split flip_pot --policy diffusion_policy "
        "--checkpoint checkpoints/diffusion_policy-multitask --seed 0",
        30,
    ),
    Cell(
        "scripted-sorting-easy-seen",
        "--task sorting --difficulty easy --objects seen --policy scripted --seed 0",
        10,
    ),
)


@dataclass(frozen=True)
class Check:
    cell: str
    stored_rate: float | None
    successes: int
    episodes: int
    low: float
    high: float

    @property
    def ok(self) -> bool:
        # the Wilson bound of n/n comes out a rounding error below 1.0
        return self.stored_rate is None or self.stored_rate <= self.high + 1e-9

    def line(self) -> str:
        new = f"{self.successes}/{self.episodes} = {self.successes / max(1, self.episodes):.1%}"
        ci = f"95% CI {self.low:.1%}-{self.high:.1%}"
        if self.stored_rate is None:
            return f"NEW   {self.cell}: {new} ({ci}); not in the baseline"
        verdict = "ok  " if self.ok else "FAIL"
        return f"{verdict}  {self.cell}: {new} ({ci}); stored {self.stored_rate:.1%}"


def command(cell: Cell, out: Path, episodes: int, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "divla_eval.cli",
        "run",
        *shlex.split(cell.args),
        "--episodes",
        str(episodes),
        "--workers",
        str(workers),
        "--out",
        str(out),
        "--no-progress",
    ]


def run_cell(cell: Cell, out: Path, episodes: int, workers: int, resume: bool) -> None:
    """A fresh run by default: resuming would skip episodes and compare the old code's results."""
    if out.exists() and not resume:
        shutil.rmtree(out)
    # one torch thread per worker, as the reference results were made (and the thread count can
    # change floating-point sums, hence actions); the caller's setting wins
    env = {**os.environ, "DIVLA_EVAL_TORCH_THREADS": os.environ.get("DIVLA_EVAL_TORCH_THREADS", "1")}
    subprocess.run(command(cell, out, episodes, workers), check=True, cwd=ROOT, env=env)


def cell_counts(run_dir: Path) -> tuple[int, int]:
    """(successes, episodes) of a run directory; errors count as failures, as everywhere."""
    from divla_eval.records import EpisodeStore

    records = EpisodeStore(Path(run_dir) / "episodes.jsonl").load()
    return sum(r.success for r in records), len(records)


def compare(baseline: dict, counts: dict[str, tuple[int, int]]) -> list[Check]:
    """One Check per counted cell; `baseline["cells"][name]["rate"]` is the stored rate."""
    stored = baseline.get("cells", {})
    checks = []
    for name, (k, n) in counts.items():
        low, high = wilson_interval(k, n)
        rate = stored[name]["rate"] if name in stored else None
        checks.append(Check(name, rate, k, n, low, high))
    return checks


def baseline_from(counts: dict[str, tuple[int, int]], commands: dict[str, str]) -> dict:
    cells = {}
    for name, (k, n) in counts.items():
        low, high = wilson_interval(k, n)
        cells[name] = {
            "successes": k,
            "episodes": n,
            "rate": k / n if n else 0.0,
            "ci95": [round(low, 4), round(high, 4)],
            "command": commands.get(name, ""),
        }
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rule": "fail when a stored rate is above the new run's Wilson 95% upper bound",
        "cells": cells,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, default=ROOT / "results" / "regression_baseline.json")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "regression", help="run directories")
    ap.add_argument("--cells", default=None, help="comma-separated cell names (default: all)")
    ap.add_argument("--episodes", type=int, default=None, help="override every cell's count (smoke test)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="keep finished episodes in --out")
    ap.add_argument("--no-run", action="store_true", help="only compare the run directories in --out")
    ap.add_argument("--update", action="store_true", help="write the results as the new baseline")
    args = ap.parse_args(argv)

    cells = {c.name: c for c in CELLS}
    if args.cells:
        unknown = sorted(set(args.cells.split(",")) - set(cells))
        if unknown:
            ap.error(f"unknown cell(s) {unknown}; valid: {', '.join(cells)}")
        cells = {n: cells[n] for n in args.cells.split(",")}
    counts, commands = {}, {}
    for name, cell in cells.items():
        out = args.out / name
        episodes = args.episodes or cell.episodes
        shown = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
        commands[name] = "divla-eval " + shlex.join(command(cell, shown, episodes, args.workers)[3:])
        if not args.no_run:
            print(f"== {name}: {commands[name]}", flush=True)
            run_cell(cell, out, episodes, args.workers, args.resume)
        if not (out / "episodes.jsonl").is_file():
            print(f"missing: {out / 'episodes.jsonl'} (run without --no-run first)", file=sys.stderr)
            return 2
        counts[name] = cell_counts(out)

    baseline = json.loads(args.baseline.read_text()) if args.baseline.is_file() else {}
    if args.update:
        # cells left out of this run (--cells) keep their stored values
        new = baseline_from(counts, commands)
        new["cells"] = {**baseline.get("cells", {}), **new["cells"]}
        args.baseline.parent.mkdir(parents=True, exist_ok=True)
        args.baseline.write_text(json.dumps(new, indent=2) + "\n")
        print(f"wrote {args.baseline}")
        return 0
    if not baseline:
        print(f"no baseline at {args.baseline}: nothing to compare (store one with --update)")
    checks = compare(baseline, counts)
    for c in checks:
        print(c.line())
    failed = [c for c in checks if not c.ok]
    if failed:
        print(f"regression: {len(failed)} cell(s) below their stored rate beyond the 95% interval")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
