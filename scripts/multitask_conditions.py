"""One multitask model under the paper's visual conditions, as the README's tables give it.

    .venv/bin/python scripts/multitask_conditions.py results/divla/multitask [--suffix -7k]
        [--against results/divla/multitask-noinj [--against-suffix S]] [--first N]
    .venv/bin/python scripts/multitask_conditions.py divla-multitask --against openvla-multitask

Reads PREFIX-<sub-task>[-<condition>3]SUFFIX/episodes.jsonl, or, given an experiment's name
(`divla-eval experiment ls`), its cells' result directories; prints, per sub-task and condition,
successes with the mean per-episode reasoning accuracy (exact phrase; left out for a policy that
writes none); the pooled row with Wilson 95% intervals; per condition the pooled reasoning accuracy
and words per reasoning call; and each condition paired with the unperturbed episodes (same episode
index) with the exact McNemar p; with --against, each condition paired with another model's runs of
the same episodes. --first N keeps episodes 0..N-1 of every run, so that policies whose cells hold
different numbers of episodes (100 in distribution, 20 under a condition) are compared on the same ones.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from divla_eval.experiments import EXPERIMENTS, VISUAL_CONDITIONS, Cell, path
from divla_eval.metrics import mcnemar_exact, wilson_interval
from divla_eval.records import EpisodeStore
from divla_eval.tasks.multitask import SUBTASKS

CONDITIONS = ("", *(f"-{c.name}" for c in VISUAL_CONDITIONS))  # in distribution, then the paper's three


def _trace(record) -> list[dict]:
    trace = record.reasoning_trace
    return ast.literal_eval(trace) if isinstance(trace, str) else list(trace or [])


def _cell_dir(prefix: str, suffix: str, sub: str, cond: str) -> Path:
    """An experiment's result directory of the cell, or PREFIX-<sub-task><condition>SUFFIX."""
    if prefix in EXPERIMENTS:
        by_name = {f"-{c.name}": c for c in VISUAL_CONDITIONS}
        return Path(
            path(EXPERIMENTS.get(prefix), "result", Cell("multitask", sub, condition=by_name.get(cond)))
        )
    return Path(f"{prefix}-{sub}{cond}{suffix}")


def _load(prefix: str, suffix: str, first: int | None = None) -> dict:
    runs = {}
    for sub in SUBTASKS:
        for cond in CONDITIONS:
            file = _cell_dir(prefix, suffix, sub, cond) / "episodes.jsonl"
            if file.exists():
                records = EpisodeStore(file).load()
                runs[sub, cond] = {
                    r.episode_index: r for r in records if first is None or r.episode_index < first
                }
    return runs


def _reasoning(recs) -> float | None:
    """Mean exact reasoning accuracy, or None for a policy that writes no reasoning (not 0%)."""
    scored = [r.reasoning_accuracy for r in recs if r.reasoning_accuracy is not None]
    return sum(scored) / len(recs) if scored else None


def _paired(a_runs: dict, a_cond: str, b_runs: dict, b_cond: str) -> str:
    only_a = only_b = 0
    for sub in SUBTASKS:
        a, b = a_runs.get((sub, a_cond), {}), b_runs.get((sub, b_cond), {})
        for i in a.keys() & b.keys():
            only_a += a[i].success and not b[i].success
            only_b += b[i].success and not a[i].success
    return f"{only_a} / {only_b}, McNemar p = {mcnemar_exact(only_a, only_b):.2g}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("prefix", help="PREFIX of the run directories, or an experiment's name")
    parser.add_argument("--suffix", default="")
    parser.add_argument("--against", help="another model's prefix, paired condition by condition")
    parser.add_argument("--against-suffix", default="")
    parser.add_argument("--first", type=int, help="keep only episodes 0..N-1 of every run")
    args = parser.parse_args()
    if args.first is not None and args.first < 1:
        parser.error(f"--first must be a positive number of episodes, not {args.first}")
    for name in (args.prefix, args.against):
        exp = EXPERIMENTS.get(name) if name in EXPERIMENTS else None
        if exp is not None and ("eval" not in exp.stages or exp.task != "multitask"):
            parser.error(f"experiment {name} evaluates no multitask cells")
    runs = _load(args.prefix, args.suffix, args.first)
    if not runs:
        print(
            f"error: no run directories {args.prefix}-<sub-task>[-<condition>3]{args.suffix}", file=sys.stderr
        )
        return 2
    print("| sub-task | " + " | ".join(c.strip("-") or "in distribution" for c in CONDITIONS) + " |")
    print("|---" * (len(CONDITIONS) + 1) + "|")
    for sub in SUBTASKS:
        cells = []
        for cond in CONDITIONS:
            recs = list(runs.get((sub, cond), {}).values())
            if not recs:
                cells.append("-")
                continue
            acc = _reasoning(recs)
            cell = f"{sum(r.success for r in recs)}/{len(recs)}"
            cells.append(cell if acc is None else f"{cell} ({100 * acc:.1f}%)")
        print(f"| {sub} | " + " | ".join(cells) + " |")
    other = _load(args.against, args.against_suffix, args.first) if args.against else None
    pooled, notes = [], []
    for cond in CONDITIONS:
        recs = [r for sub in SUBTASKS for r in runs.get((sub, cond), {}).values()]
        if not recs:
            pooled.append("-")
            continue
        k, n = sum(r.success for r in recs), len(recs)
        lo, hi = wilson_interval(k, n)
        pooled.append(f"{k}/{n} = {100 * k / n:.1f}% ({100 * lo:.1f}-{100 * hi:.1f}%)")
        words = [len(e["text"].split()) for r in recs for e in _trace(r)]
        acc = _reasoning(recs)
        note = f"{cond.strip('-') or 'in distribution'}: "
        if acc is None:
            note += "no reasoning written"
        else:
            note += f"reasoning {100 * acc:.1f}% exact, {sum(words) / max(1, len(words)):.1f} words per call"
        if cond:
            note += f"; only unperturbed / only {cond.strip('-')}: {_paired(runs, '', runs, cond)}"
        if other is not None:
            note += f"; only this model / only {args.against}: {_paired(runs, cond, other, cond)}"
        notes.append(note)
    print("| all five | " + " | ".join(pooled) + " |")
    print()
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
