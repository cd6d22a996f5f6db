"""Regression gates: a change that makes a policy succeed less often, or infer more slowly, fails CI.

Three entry points share the two rules below (docs/regression.md shows the commands and a CI workflow):

- `divla-eval regression --policy P --baseline FILE [--update]`: any policy (a registered name or
  `module:factory`) on a small fixed grid of episodes plus its inference timing; a user's own CI.
- `nox -s regression` (`python -m divla_eval.regression`, `scripts/regression.py`): the shipped
  checkpoints and the scripted expert on the grid `CELLS`, against results/regression_baseline.json.
- `nox -s bench` (`benchmarks/compare.py`): the pytest-benchmark suite against results/bench_sim.json.

Success rule. Episodes have fixed seeds, so an unchanged policy replays the same episodes and scores the
same; a change to the policy (or to the simulator) that moves any float reshuffles which episodes
succeed, i.e. draws a new binomial sample. The gate therefore asks whether the new success count
k1/n1 is significantly below the stored k0/n0 with both counts treated as samples: a one-sided test at
level `ALPHA` = 5%, by the Newcombe hybrid score interval of the difference (Newcombe 1998, method 10):

    d = k1/n1 - k0/n0;  high = d + sqrt((u1 - k1/n1)^2 + (k0/n0 - l0)^2)

with (l, u) the Wilson intervals (`metrics.wilson_interval`) at z = 1.645. A cell fails when `high`
< 0, i.e. the 90% interval of the change lies wholly below zero. Improvements never fail. Because both
runs' noise is counted, a rerun of an unchanged policy whose rollouts were all perturbed fails with
probability about 5% (at most 6.0% for 10-40 episodes; `false_alarm` computes it exactly), and one
whose rollouts did not move cannot fail; `fails_at` gives the largest new count that fails, printed
beside every cell, so what a cell can detect is on the page.

Speed rule. A benchmark's median is divided by the median of the reference matmul (`reference_call`:
a 512x512 float32 matmul on one thread), timed between the benchmark's own rounds (benchmarks/conftest.py
`timed`; the run's `REFERENCE` benchmark for one without), so a slower or busier machine cancels; a
benchmark fails when that ratio grew by more than `SPEED_TOLERANCE` = 2.0, the spread measured between
unchanged runs on the development machine (docs/regression.md), in the run and in a confirming rerun
(`--confirm`). `divla-eval regression` takes the lowest of three blocks of timed calls instead. Faster
never fails.

Stale baselines fail: a benchmark or cell that was run but has no stored entry, a stored cell of another
task version or checkpoint, or a timing against another reference call. `--update` (`nox -s
bench_baseline` for the benchmarks) stores them anew.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from divla_eval.errors import CorruptFileError, DivlaEvalError
from divla_eval.options import positive_int

ROOT = Path(__file__).resolve().parent.parent
"""The checkout: the grid's checkpoints and results live there (the package is installed editable)."""

ALPHA = 0.05
"""One-sided level of the success test."""
Z = 1.6448536269514722
"""The standard normal quantile 1 - ALPHA: the Wilson intervals' z in the Newcombe interval."""
SPEED_TOLERANCE = 2.0
"""A benchmark fails when median / median(reference) grew by more than this factor. docs/regression.md:
six unchanged runs of the suite on the 2-core development machine (under other jobs) spread up to 2.21x
in these units; 4 of their 330 pairwise comparisons passed 2.0x, none twice, hence a confirming rerun."""
REFERENCE = "test_reference_matmul"
"""The benchmark every other benchmark's median is divided by (benchmarks/test_bench_policies.py)."""
REFERENCE_SIZE = 512
FORMAT = "divla-eval regression 1"
"""`format` of a file written by `divla-eval regression` (baseline or result)."""
FAILING = ("FAIL", "MISSING", "STALE")
"""Verdicts that fail a gate."""


# --- the rules -------------------------------------------------------------------------------------------
def rate_change_interval(k0: int, n0: int, k1: int, n1: int, z: float = Z) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) of k1/n1 - k0/n0, from the two Wilson intervals at
    `z`; at z = 1.645 a 90% interval, whose upper end is a one-sided 95% bound."""
    if n0 < 1 or n1 < 1:
        raise DivlaEvalError(f"a success rate needs at least one episode; got n={n0} and n={n1}")
    p0, p1 = k0 / n0, k1 / n1
    from divla_eval.metrics import wilson_interval  # metrics imports pandas: not at CLI start-up

    l0, u0 = wilson_interval(k0, n0, z)
    l1, u1 = wilson_interval(k1, n1, z)
    d = p1 - p0
    return d - math.hypot(p1 - l1, u0 - p0), d + math.hypot(u1 - p1, p0 - l0)


def success_dropped(k0: int, n0: int, k1: int, n1: int) -> bool:
    """The success rule: k1/n1 lies significantly (one-sided, `ALPHA`) below k0/n0."""
    return rate_change_interval(k0, n0, k1, n1)[1] < -1e-12  # Wilson bounds at 0/n, n/n round


def fails_at(k0: int, n0: int, n1: int) -> int | None:
    """The largest new count out of n1 that the success rule fails against a stored k0/n0 (None: none,
    n1 is too small to tell any drop from noise)."""
    failing = [k for k in range(n1 + 1) if success_dropped(k0, n0, k, n1)]
    return max(failing) if failing else None


def false_alarm(k0: int, n0: int, n1: int | None = None) -> float:
    """Probability that the success rule fails a rerun of an unchanged policy whose rollouts were all
    perturbed: both counts binomial at the true rate k0/n0 (exact sum over every pair of counts)."""
    n1 = n0 if n1 is None else n1
    p = k0 / n0

    def pmf(k: int, n: int) -> float:
        return math.comb(n, k) * p**k * (1 - p) ** (n - k)

    return sum(
        pmf(a, n0) * pmf(b, n1) for a in range(n0 + 1) for b in range(n1 + 1) if success_dropped(a, n0, b, n1)
    )


@dataclass(frozen=True)
class Row:
    """One line of a gate's table: what was compared, stored and new values, the change, the limit."""

    what: str
    stored: str
    new: str
    change: str
    limit: str
    verdict: str
    """ok | faster | not run (pass) or FAIL | MISSING | STALE (fail)."""

    @property
    def failed(self) -> bool:
        return self.verdict in FAILING


def _rate(k: int, n: int) -> str:
    return f"{k}/{n} = {k / n:.1%}"


def success_row(what: str, stored: tuple[int, int], new: tuple[int, int]) -> Row:
    (k0, n0), (k1, n1) = stored, new
    low, high = rate_change_interval(k0, n0, k1, n1)
    threshold = fails_at(k0, n0, n1)
    limit = f"fails at <= {threshold}/{n1}" if threshold is not None else f"no count of {n1} can fail"
    change = f"{(k1 / n1 - k0 / n0) * 100:+.1f} pts (90% CI {low * 100:+.1f}, {high * 100:+.1f})"
    return Row(what, _rate(k0, n0), _rate(k1, n1), change, limit, "FAIL" if high < -1e-12 else "ok")


def speed_row(what: str, stored: float, new: float, tolerance: float) -> Row:
    growth = new / stored
    verdict = "FAIL" if growth > tolerance else ("faster" if growth < 1 / tolerance else "ok")
    return Row(what, f"{stored:.3f}", f"{new:.3f}", f"{growth:.2f}x", f"fails above {tolerance:g}x", verdict)


def format_table(rows: list[Row]) -> str:
    header = Row("what", "stored", "new", "change", "limit", "verdict")
    cols = ("what", "stored", "new", "change", "limit", "verdict")
    width = {c: max(len(getattr(r, c)) for r in [header, *rows]) for c in cols}
    lines = []
    for r in [header, *rows]:
        lines.append("  ".join(getattr(r, c).ljust(width[c]) for c in cols).rstrip())
    return "\n".join(lines)


def print_verdict(header: str, rows: list[Row], notes: list[str], failure: str) -> int:
    """Print a comparison (its header, table and notes) and its verdict: exit code 1 when a row failed,
    with `failure` formatted with the count and the names of the failed rows."""
    print(header)
    print(format_table(rows))
    for note in notes:
        print(note)
    failed = [r.what for r in rows if r.failed]
    if failed:
        print(failure.format(n=len(failed), names=", ".join(failed)))
        return 1
    return 0


def flipped(stored: str | None, new: str | None) -> str | None:
    """Which episodes changed outcome between two outcome strings ("1" success, "0" failure, by
    episode index), e.g. "success -> failure at episodes 3, 7; failure -> success at 12"."""
    if not stored or not new:
        return None
    lost = [i for i, (a, b) in enumerate(zip(stored, new)) if a == "1" and b == "0"]
    won = [i for i, (a, b) in enumerate(zip(stored, new)) if a == "0" and b == "1"]
    parts = []
    if lost:
        parts.append("success -> failure at episode(s) " + ", ".join(map(str, lost)))
    if won:
        parts.append("failure -> success at episode(s) " + ", ".join(map(str, won)))
    return "; ".join(parts) if parts else None


# --- speed: benchmark files --------------------------------------------------------------------------
def reference_call():
    """A zero-argument call whose time stands for the machine's speed: `torch.mm` of two seeded
    512x512 float32 matrices on one torch thread (numpy's matmul where torch is not installed, with a
    label saying so). Returns (call, label); the label is stored, and timings against another label
    are not compared."""
    try:
        import torch
    except ImportError:
        import numpy as np

        rng = np.random.default_rng(0)
        a = rng.standard_normal((REFERENCE_SIZE, REFERENCE_SIZE), dtype=np.float32)
        b = rng.standard_normal((REFERENCE_SIZE, REFERENCE_SIZE), dtype=np.float32)
        return (lambda: a @ b), f"numpy matmul {REFERENCE_SIZE}x{REFERENCE_SIZE} float32"
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(REFERENCE_SIZE, REFERENCE_SIZE, generator=g)
    b = torch.randn(REFERENCE_SIZE, REFERENCE_SIZE, generator=g)
    return (lambda: torch.mm(a, b)), f"torch.mm {REFERENCE_SIZE}x{REFERENCE_SIZE} float32, 1 thread"


def benchmarked_policies() -> list[str]:
    """The registered policies whose inference call benchmarks/test_bench_policies.py times: the learned
    ones (they need a checkpoint). One that cannot be imported is listed: its benchmark fails."""
    from divla_eval.policy import POLICIES

    def learned(name: str) -> bool:
        try:
            return bool(getattr(POLICIES.get(name), "requires_checkpoint", False))
        except ImportError:
            return True

    return [n for n in POLICIES.names() if learned(n)]


def time_calls(call, calls: int, warmup: int = 5) -> list[float]:
    """Seconds of each of `calls` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


INTERLEAVED = "reference_median"
"""`extra_info` key of a benchmark timed with one reference call before each of its rounds
(benchmarks/conftest.py `timed`): that reference's median, the benchmark's own unit."""


@dataclass(frozen=True)
class BenchRun:
    """A pytest-benchmark JSON file: each benchmark's median seconds, and the median of the reference
    call interleaved with its rounds where it has one."""

    medians: dict[str, float]
    references: dict[str, float]
    fullnames: dict[str, str] = dataclasses.field(default_factory=dict)
    """name -> pytest node id (`benchmarks/test_bench_sim.py::test_env_step_no_render`), to rerun one."""

    def unit(self, name: str) -> tuple[float, str] | None:
        """(seconds of the unit, its kind) of a benchmark: its interleaved reference, else the run's
        `REFERENCE` benchmark; None without either."""
        if name in self.references:
            return self.references[name], "interleaved"
        if REFERENCE in self.medians:
            return self.medians[REFERENCE], "run"
        return None

    def ratio(self, name: str) -> tuple[float, str] | None:
        unit = self.unit(name)
        return None if unit is None else (self.medians[name] / unit[0], unit[1])


def _positive(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def read_bench(path: Path) -> BenchRun:
    """A pytest-benchmark JSON file; one that is not one is a one-line CorruptFileError."""
    from divla_eval.schema import read_json

    data = read_json(Path(path))
    benchmarks = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(benchmarks, list):
        raise CorruptFileError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' list)")
    medians, references, fullnames = {}, {}, {}
    for b in benchmarks:
        name = b.get("name") if isinstance(b, dict) else None
        stats = b.get("stats") if isinstance(b, dict) else None
        median = _positive(stats.get("median")) if isinstance(stats, dict) else None
        if not isinstance(name, str) or median is None:
            raise CorruptFileError(
                f"{path}: a benchmark without a name and a positive stats.median: {b!r:.80}"
            )
        medians[name] = median
        if isinstance(b.get("fullname"), str):
            fullnames[name] = b["fullname"]
        extra = b.get("extra_info")
        if isinstance(extra, dict) and INTERLEAVED in extra:
            reference = _positive(extra[INTERLEAVED])
            if reference is None:
                raise CorruptFileError(f"{path}: benchmark {name!r} has {INTERLEAVED} {extra[INTERLEAVED]!r}")
            references[name] = reference
    return BenchRun(medians, references, fullnames)


def bench_medians(path: Path) -> dict[str, float]:
    """name -> median seconds of a pytest-benchmark JSON file."""
    return read_bench(path).medians


def compare_benchmarks(new: BenchRun, stored: BenchRun, tolerance: float = SPEED_TOLERANCE) -> list[Row]:
    """One row per benchmark of the new run: its median in units of the reference call's median (the
    one interleaved with its rounds, else the run's `REFERENCE`), against the stored ratio. A benchmark
    without a stored entry fails (MISSING); one whose stored ratio has no unit, or another kind of unit,
    fails (STALE); a stored benchmark that was not run is listed and passes (a `-k` selection)."""
    if tolerance <= 1:
        raise DivlaEvalError(f"the tolerance is a growth factor above 1; got {tolerance}")
    rows = []
    if REFERENCE in new.medians:
        raw_new = new.medians[REFERENCE]
        raw_old = stored.medians.get(REFERENCE)
        rows.append(
            Row(
                f"{REFERENCE} (ms, raw)",
                "-" if raw_old is None else f"{raw_old * 1e3:.3f}",
                f"{raw_new * 1e3:.3f}",
                "" if raw_old is None else f"{raw_new / raw_old:.2f}x",
                "the unit; not judged",
                "ok",
            )
        )
    for name in sorted(set(new.medians) | set(stored.medians)):
        if name == REFERENCE:
            continue
        if name not in new.medians:
            old = stored.ratio(name)
            rows.append(Row(name, "-" if old is None else f"{old[0]:.3f}", "-", "", "", "not run"))
            continue
        now = new.ratio(name)
        if now is None:
            raise DivlaEvalError(
                f"{name} of the new run has no reference call to put it in machine-free units"
            )
        old = stored.ratio(name) if name in stored.medians else None
        if name not in stored.medians:
            rows.append(Row(name, "-", f"{now[0]:.3f}", "", "not in the baseline", "MISSING"))
        elif old is None or old[1] != now[1]:
            why = "baseline has no unit" if old is None else f"baseline's unit: {old[1]}, new: {now[1]}"
            rows.append(Row(name, "-", f"{now[0]:.3f}", "", why, "STALE"))
        else:
            rows.append(speed_row(name, old[0], now[0], tolerance))
    return rows


def rerun_benchmarks(node_ids: list[str]) -> BenchRun:
    """Run some benchmarks again (pytest-benchmark, in a new process) and read their JSON."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="divla-bench-confirm-") as tmp:
        out = Path(tmp) / "rerun.json"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            *node_ids,
            "-q",
            "-p",
            "no:cacheprovider",
            f"--benchmark-json={out}",
        ]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            tail = " ".join((done.stdout + done.stderr).split()[-30:])
            raise DivlaEvalError(f"the confirming rerun failed (exit {done.returncode}): {tail}")
        return read_bench(out)


def confirm(rows: list[Row], new: BenchRun, stored: BenchRun, tolerance: float) -> list[Row]:
    """Rerun every benchmark whose row is FAIL, once: it stays FAIL only when the rerun fails too (a
    burst of other work on the machine seldom hits the same benchmark twice; a slowdown in the code
    does). MISSING and STALE rows need no rerun."""
    slow = [r.what for r in rows if r.verdict == "FAIL"]
    missing = [n for n in slow if n not in new.fullnames]
    if missing:
        raise DivlaEvalError(f"cannot rerun {missing}: the new run's JSON has no pytest node id for them")
    if not slow:
        return rows
    print(f"confirming {len(slow)} slow benchmark(s) with a rerun: {', '.join(slow)}", flush=True)
    rerun = rerun_benchmarks([new.fullnames[n] for n in slow])
    again = {r.what: r for r in compare_benchmarks(rerun, stored, tolerance) if r.what in slow}
    out = []
    for r in rows:
        second = again.get(r.what)
        if r.verdict == "FAIL":
            if second is None:
                raise DivlaEvalError(f"the confirming rerun did not time {r.what}")
            verdict = "FAIL" if second.failed else "ok"
            r = dataclasses.replace(r, change=f"{r.change}, rerun {second.change}", verdict=verdict)
        out.append(r)
    return out


def bench_main(argv: list[str] | None = None) -> int:
    """`benchmarks/compare.py NEW.json [BASELINE.json] [--tolerance X] [--confirm]`: 0 pass, 1 regression
    or stale baseline, 2 bad input."""
    ap = argparse.ArgumentParser(
        prog="benchmarks/compare.py",
        description="compare pytest-benchmark medians with a stored baseline, in units of the reference "
        "matmul",
    )
    ap.add_argument("new", type=Path, help="pytest-benchmark JSON of the new run")
    ap.add_argument("baseline", type=Path, nargs="?", default=ROOT / "results" / "bench_sim.json")
    ap.add_argument("--tolerance", type=float, default=SPEED_TOLERANCE, help="growth factor that fails")
    ap.add_argument(
        "--confirm",
        action="store_true",
        help="rerun each benchmark past the tolerance once; it fails only when the rerun is past it too",
    )
    args = ap.parse_args(argv)
    try:
        if not args.baseline.is_file():
            raise DivlaEvalError(f"no baseline at {args.baseline}: store one with `nox -s bench_baseline`")
        new, stored = read_bench(args.new), read_bench(args.baseline)
        rows = compare_benchmarks(new, stored, args.tolerance)
        if args.confirm:
            rows = confirm(rows, new, stored, args.tolerance)
    except DivlaEvalError as exc:
        print(f"compare.py: error: {exc}", file=sys.stderr)
        return 2
    header = (
        "median / median of the reference matmul timed between its rounds (else the run's "
        f"{REFERENCE}); a benchmark fails past {args.tolerance:g}x its stored ratio"
        + (", in the run and in a rerun" if args.confirm else "")
    )
    return print_verdict(
        header,
        rows,
        [],
        "speed regression: {n} benchmark(s) failed ({names}); "
        "MISSING/STALE: store the baseline anew with `nox -s bench_baseline`",
    )


# --- success: the repository's grid (nox -s regression) ----------------------------------------------
@dataclass(frozen=True)
class Cell:
    name: str
    args: str
    """`divla-eval run` arguments, without --episodes, --out and --workers."""
    episodes: int


CELLS = (
    # DiVLA at its ~10% rate: 40 episodes flag a fall to 0/40 (the rule's limit at 4/40; at 3/30 no count
    # fails); the rate is too low for this grid to see smaller drops (docs/regression.md)
    Cell(
        "divla-bin_picking-unseen",
        "--task bin_picking --objects unseen --policy divla --checkpoint checkpoints/divla-bin_picking "
        "--seed 0",
        40,
    ),
    Cell("scripted-bin_picking-unseen", "--task bin_picking --objects unseen --policy scripted --seed 0", 10),
    # the best learned model (35000 steps, issue 25) on its surest sub-task: at a high rate the rule sees
    # small drops (docs/regression.md)
    Cell(
        "diffusion_policy-multitask-flip_pot",
        "--task multitask --split flip_pot --policy diffusion_policy "
        "--checkpoint checkpoints/diffusion_policy-multitask-wsd35k --seed 0",
        30,
    ),
    Cell(
        "scripted-sorting-easy-seen",
        "--task sorting --difficulty easy --objects seen --policy scripted --seed 0",
        10,
    ),
)


@dataclass(frozen=True)
class CellResult:
    """What a run directory says about a cell: counts, per-episode outcomes and what made them."""

    successes: int
    episodes: int
    outcomes: str
    """"1"/"0" per episode, by episode index; errors count as failures."""
    task_version: str
    checkpoint_hash: str | None


def cell_result(run_dir: Path) -> CellResult:
    from divla_eval.records import EpisodeStore

    records = sorted(EpisodeStore(Path(run_dir) / "episodes.jsonl").load(), key=lambda r: r.episode_index)
    if not records:
        raise DivlaEvalError(f"{run_dir} has no episode records")
    versions = {r.task_version for r in records}
    hashes = {r.checkpoint_hash for r in records}
    if len(versions) > 1 or len(hashes) > 1:
        raise DivlaEvalError(f"{run_dir} mixes task versions {versions} or checkpoints {hashes}")
    outcomes = "".join("1" if r.success else "0" for r in records)
    return CellResult(outcomes.count("1"), len(records), outcomes, versions.pop(), hashes.pop())


def grid_command(cell: Cell, out: Path, episodes: int, workers: int) -> list[str]:
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
    # `divla-eval run` uses one torch thread per worker by default, as the baselines were made
    code = subprocess.run(grid_command(cell, out, episodes, workers), cwd=ROOT).returncode
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        raise DivlaEvalError(f"cell {cell.name}: `divla-eval run` exited with code {code} (output above)")


def compare_cells(baseline: dict, results: dict[str, CellResult]) -> tuple[list[Row], list[str]]:
    """(rows, notes): one row per cell run; a cell with no stored entry fails (MISSING), one stored for
    another task version or checkpoint, or without a task version, fails (STALE)."""
    stored_cells = baseline.get("cells", {}) if isinstance(baseline, dict) else {}
    rows, notes = [], []
    for name, res in results.items():
        stored = stored_cells.get(name)
        new = _rate(res.successes, res.episodes)
        if not isinstance(stored, dict):
            rows.append(Row(name, "-", new, "", "not in the baseline", "MISSING"))
            continue
        try:
            k0, n0 = int(stored["successes"]), int(stored["episodes"])
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(f"baseline cell {name!r} has no successes/episodes counts") from None
        why = None
        if stored.get("task_version") is None:
            why = "stored without a task version"
        elif str(stored["task_version"]) != res.task_version:
            why = f"task version {stored['task_version']} -> {res.task_version}"
        elif stored.get("checkpoint_hash") != res.checkpoint_hash:
            why = f"checkpoint {stored.get('checkpoint_hash')} -> {res.checkpoint_hash}"
        if why:
            rows.append(Row(name, _rate(k0, n0), new, "", why, "STALE"))
            continue
        rows.append(success_row(name, (k0, n0), (res.successes, res.episodes)))
        moved = flipped(stored.get("outcomes"), res.outcomes)
        if moved:
            notes.append(f"{name}: {moved}")
    return rows, notes


def grid_baseline(results: dict[str, CellResult], commands: dict[str, str]) -> dict:
    cells = {}
    from divla_eval.metrics import wilson_interval

    for name, r in results.items():
        low, high = wilson_interval(r.successes, r.episodes)
        cells[name] = {
            "successes": r.successes,
            "episodes": r.episodes,
            "rate": r.successes / r.episodes,
            "ci95": [round(low, 4), round(high, 4)],
            "task_version": r.task_version,
            "checkpoint_hash": r.checkpoint_hash,
            "outcomes": r.outcomes,
            "command": commands.get(name, ""),
        }
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rule": RULE,
        "cells": cells,
    }


RULE = (
    "fail when the new rate is below the stored one by a one-sided 5% test: the upper end of the 90% "
    "Newcombe interval (Wilson score, z=1.645) of new - stored is below 0 (divla_eval/regression.py)"
)


def grid_main(argv: list[str] | None = None) -> int:
    """`nox -s regression`: 0 pass, 1 regression or stale baseline, 2 bad input."""
    ap = argparse.ArgumentParser(
        prog="scripts/regression.py",
        description="rerun the shipped checkpoints' fixed episode grid and compare success rates with the "
        "stored baseline (see divla_eval/regression.py for the rule)",
    )
    ap.add_argument("--baseline", type=Path, default=ROOT / "results" / "regression_baseline.json")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "regression", help="run directories")
    ap.add_argument("--cells", default=None, help="comma-separated cell names (default: all)")
    ap.add_argument(
        "--episodes", type=positive_int, default=None, help="override every cell's count (smoke test)"
    )
    ap.add_argument("--workers", type=positive_int, default=1)
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
    try:
        baseline = _read_json_object(args.baseline) if args.baseline.is_file() else {}
        results, commands = {}, {}
        for name, cell in cells.items():
            out = args.out / name
            episodes = args.episodes or cell.episodes
            shown = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
            commands[name] = "divla-eval " + shlex.join(grid_command(cell, shown, episodes, args.workers)[3:])
            if not args.no_run:
                print(f"== {name}: {commands[name]}", flush=True)
                run_cell(cell, out, episodes, args.workers, args.resume)
            if not (out / "episodes.jsonl").is_file():
                raise DivlaEvalError(f"missing: {out / 'episodes.jsonl'} (run without --no-run first)")
            results[name] = cell_result(out)
    except DivlaEvalError as exc:
        print(f"regression: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nregression: interrupted (--resume keeps the finished episodes)", file=sys.stderr)
        return 130

    if args.update:
        from divla_eval.safe_io import write_text

        # cells left out of this run (--cells) keep their stored values
        new = grid_baseline(results, commands)
        new["cells"] = {**baseline.get("cells", {}), **new["cells"]}
        write_text(args.baseline, json.dumps(new, indent=2) + "\n")
        print(f"wrote {args.baseline}")
        return 0
    rows, notes = compare_cells(baseline, results)
    return print_verdict(
        f"success rates against {args.baseline}: {RULE}",
        rows,
        [f"moved: {note}" for note in notes],
        "regression: {n} cell(s) failed ({names}); MISSING/STALE: store them anew with --cells NAME --update",
    )


def _read_json_object(path: Path) -> dict:
    from divla_eval.schema import read_json

    data = read_json(path)
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} is not a JSON object")
    return data


# --- divla-eval regression: any policy ---------------------------------------------------------------
DEFAULT_EPISODES = 20
DEFAULT_CALLS = 30
WARMUP = 5
REFERENCE_CALLS = 30
"""Reference calls timed before and after each block of the policy's calls, together: load that shifts
during the block moves both."""
BLOCKS = 3
"""Blocks of timed calls (`time_policy`, each between reference timings). The speed figure is the lowest
block's p50 over the lowest block's reference median, so a burst of other work on the machine during
one block moves neither (in one process, what the bench gate's `--confirm` rerun does)."""


def add_parser(sub) -> None:
    """`divla-eval regression` (registered by `divla_eval.cli.build_parser`)."""
    from divla_eval.cli import _add_device_argument, _add_key_value_option, _dir_text, _path, _positive_int

    p = sub.add_parser(
        "regression",
        help="gate a policy's success rate and inference speed against a stored baseline (for CI)",
        description="Run a small fixed grid of episodes and the inference timing of one policy, and "
        "compare both with a baseline file: exit 1 with a table of what moved when the success rate fell "
        "significantly (one-sided 5% test) or the inference call grew past --tolerance in units of a "
        "reference matmul; --update stores the baseline. docs/regression.md.",
    )
    p.add_argument("--policy", help="registered name or package.module:factory (as for `run`)")
    p.add_argument("--checkpoint", type=_dir_text, default=None, help="checkpoint directory, as for `run`")
    _add_key_value_option(p, "--policy-option", help="inference option, as for `run` (repeatable)")
    p.add_argument(
        "--baseline", type=_path, required=True, help="the baseline JSON to compare with or --update"
    )
    p.add_argument(
        "--update", action="store_true", help="store this run as the baseline instead of comparing"
    )
    p.add_argument(
        "--task", default=None, help="task of the grid (default: the baseline's, else bin_picking)"
    )
    p.add_argument("--split", default=None, help="split (default: the baseline's, else the task's default)")
    p.add_argument(
        "--episodes",
        type=_positive_int,
        default=None,
        help=f"episodes of the grid (default: the baseline's, else {DEFAULT_EPISODES})",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="run seed of the grid (default: the baseline's, else 0)"
    )
    p.add_argument("--workers", type=_positive_int, default=1, help="episode worker processes")
    p.add_argument(
        "--calls",
        type=_positive_int,
        default=DEFAULT_CALLS,
        help="timed inference calls per block (three blocks)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=SPEED_TOLERANCE,
        help="fail when the call's time in matmul units grew more than this factor "
        f"(default {SPEED_TOLERANCE:g})",
    )
    p.add_argument(
        "--out",
        type=_path,
        default=None,
        help="a new directory for the run and regression.json (default: temp)",
    )
    p.add_argument(
        "--result",
        type=_path,
        default=None,
        help="compare (or --update with) a regression.json that an earlier run wrote, without running",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device_argument(p)


def _checked(data, path: Path, sections: bool = False) -> dict:
    """A baseline or result file's contents, checked enough that comparing cannot fail obscurely; a
    result (`sections`) must hold both the success and the speed section, a baseline may lack one
    (the comparison then fails as MISSING)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CorruptFileError(f'{path} is not a `divla-eval regression` file (no "format": "{FORMAT}")')
    grid = data.get("grid")
    types = {"task": str, "split": str, "episodes": int, "seed": int, "task_version": str}
    if not isinstance(grid, dict) or any(not isinstance(grid.get(k), t) for k, t in types.items()):
        need = ", ".join(f"{k} ({t.__name__})" for k, t in types.items())
        raise CorruptFileError(f"{path}: 'grid' needs {need}")
    success, speed = data.get("success"), data.get("speed")
    if sections and (success is None or speed is None):
        raise CorruptFileError(f"{path}: a result needs both a 'success' and a 'speed' section")
    if success is not None:
        k = success.get("successes") if isinstance(success, dict) else None
        n = success.get("episodes") if isinstance(success, dict) else None
        if not (isinstance(k, int) and isinstance(n, int) and 0 <= k <= n and n > 0):
            raise CorruptFileError(f"{path}: 'success' needs successes <= episodes (integers, episodes > 0)")
    if speed is not None:
        ratio = speed.get("ratio") if isinstance(speed, dict) else None
        if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
            raise CorruptFileError(f"{path}: 'speed' needs a positive 'ratio'")
    return data


def read_regression_file(path: Path, result: bool = False) -> dict:
    """A `divla-eval regression` baseline (or, `result`, a regression.json to compare)."""
    from divla_eval.schema import read_json

    return _checked(read_json(path), path, sections=result)


def compare_results(
    baseline: dict, result: dict, tolerance: float = SPEED_TOLERANCE
) -> tuple[list[Row], list[str]]:
    """(rows, notes) of a `divla-eval regression` result against a baseline: the success rate by the
    success rule, the inference call by the speed rule. A missing section of the baseline fails
    (MISSING); a baseline of another task version, or timed against another reference, fails (STALE)."""
    if tolerance <= 1:
        raise DivlaEvalError(f"--tolerance is a growth factor above 1; got {tolerance}")
    bg, rg = baseline["grid"], result["grid"]
    differ = [k for k in ("task", "split", "difficulty", "episodes", "seed") if bg.get(k) != rg.get(k)]
    if differ:
        shown = ", ".join(f"{k} {bg.get(k)} vs {rg.get(k)}" for k in differ)
        raise DivlaEvalError(f"the result's grid is not the baseline's ({shown})")
    rows, notes = [], []
    stored, new = baseline.get("success"), result["success"]
    what = "success rate"
    if bg["task_version"] != rg["task_version"]:
        rows.append(
            Row(what, "-", "", "", f"task version {bg['task_version']} -> {rg['task_version']}", "STALE")
        )
    elif stored is None:
        rows.append(
            Row(what, "-", _rate(new["successes"], new["episodes"]), "", "not in the baseline", "MISSING")
        )
    else:
        rows.append(
            success_row(what, (stored["successes"], stored["episodes"]), (new["successes"], new["episodes"]))
        )
        moved = flipped(stored.get("outcomes"), new.get("outcomes"))
        if moved:
            notes.append(moved)
    stored, new = baseline.get("speed"), result["speed"]
    what = "infer p50 / matmul"
    if stored is None:
        rows.append(Row(what, "-", f"{new['ratio']:.3f}", "", "not in the baseline", "MISSING"))
    elif stored.get("reference") != new.get("reference"):
        rows.append(
            Row(what, "-", f"{new['ratio']:.3f}", "", f"timed against {stored.get('reference')}", "STALE")
        )
    else:
        rows.append(speed_row(what, stored["ratio"], new["ratio"], tolerance))
        nan = float("nan")
        notes.append(
            f"infer p50 {stored.get('infer_p50_ms', nan):.2f} -> {new.get('infer_p50_ms', nan):.2f} ms, "
            f"matmul {stored.get('reference_ms', nan):.2f} -> {new.get('reference_ms', nan):.2f} ms"
        )
    return rows, notes


def _grid(args, baseline: dict | None) -> dict:
    """The grid to run: the baseline's; a flag that differs from it is refused unless --update."""
    from divla_eval.tasks import get_task

    given = {"task": args.task, "split": args.split, "episodes": args.episodes, "seed": args.seed}
    if baseline is not None:
        stored = baseline["grid"]
        if not args.update:
            differ = [
                f"--{k} {v} (baseline: {stored[k]})"
                for k, v in given.items()
                if v is not None and v != stored[k]
            ]
            if differ:
                raise DivlaEvalError(
                    f"{args.baseline} was stored for another grid: {', '.join(differ)}; "
                    "leave the flag out, or store a new baseline with --update"
                )
        defaults = {k: stored[k] for k in given}
        if args.task is not None and args.task != stored["task"]:
            defaults["split"] = None  # another task (--update): its own default split
    else:
        defaults = {"task": "bin_picking", "split": None, "episodes": DEFAULT_EPISODES, "seed": 0}
    grid = {k: v if v is not None else defaults[k] for k, v in given.items()}
    task = get_task(grid["task"])
    grid["split"] = grid["split"] if grid["split"] is not None else task.default_split
    grid["difficulty"] = task.difficulties[0]
    grid["task_version"] = str(task.version)
    task.validate(grid["split"], grid["difficulty"])
    return grid


def measure(
    policy: str,
    grid: dict,
    out: Path,
    *,
    checkpoint: str | None = None,
    options: dict | None = None,
    workers: int = 1,
    calls: int = DEFAULT_CALLS,
    device: str = "auto",
    progress: bool = False,
) -> dict:
    """Run the grid's episodes (`divla_eval.evaluate`) into out/run, then time the policy's inference
    call by `divla_eval.timing.time_policy` between two timings of the reference call; the result dict
    (what `--update` stores)."""
    from divla_eval.api import evaluate
    from divla_eval.device import resolve_device
    from divla_eval.policy import ClosablePolicy, PrivilegedPolicy
    from divla_eval.timing import SceneObservations, build_policy, image_size_of, machine_info, time_policy

    options = dict(options or {})
    machine = machine_info()  # before our own work: its load average is the other jobs'
    result = evaluate(
        policy,
        task=grid["task"],
        split=grid["split"],
        difficulty=grid["difficulty"],
        episodes=grid["episodes"],
        seed=grid["seed"],
        workers=workers,
        out=out / "run",
        checkpoint=checkpoint,
        policy_options=options,
        progress=progress,
        device=device,
    )
    records = sorted(result.records, key=lambda r: r.episode_index)
    outcomes = "".join("1" if r.success else "0" for r in records)
    hashes = {r.checkpoint_hash for r in records}

    built, label = build_policy(
        policy, grid["task"], checkpoint, options=options, device=resolve_device(device)
    )
    scene = SceneObservations(grid["task"], grid["split"])
    try:
        obs = scene.get(built.metadata.cameras, image_size_of(built))
        if isinstance(built, PrivilegedPolicy):  # the expert reads the scene's simulator, as in runs
            built.bind(scene.env.sim, scene.env.episode)
        ref, ref_label = reference_call()
        blocks = []  # (p50 ms, reference median ms) of each block
        for _ in range(BLOCKS):
            ref_s = time_calls(ref, REFERENCE_CALLS)
            row = time_policy(
                built, obs, name=policy, checkpoint=label, threads=1, warmup=WARMUP, calls=calls
            )
            ref_s += time_calls(ref, REFERENCE_CALLS)
            blocks.append((row.p50_ms, statistics.median(ref_s) * 1e3))
    finally:
        scene.close()
        if isinstance(built, ClosablePolicy):
            built.close()
    # each the lowest of the blocks' medians: other work on the machine only ever adds time, and it
    # slows the matmul and the policy's call at different moments and by different factors
    infer_ms, reference_ms = min(b[0] for b in blocks), min(b[1] for b in blocks)
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "policy": policy,
        "checkpoint": checkpoint,
        "checkpoint_hash": hashes.pop() if len(hashes) == 1 else None,
        "policy_options": {k: v for k, v in options.items()},
        "grid": grid,
        "success": {"successes": outcomes.count("1"), "episodes": len(outcomes), "outcomes": outcomes},
        "speed": {
            "reference": ref_label,
            "reference_ms": round(reference_ms, 4),
            "infer_p50_ms": round(infer_ms, 4),
            "ratio": infer_ms / reference_ms,
            "blocks": [{"infer_p50_ms": round(a, 4), "reference_ms": round(b, 4)} for a, b in blocks],
            "calls": calls,
            "threads": 1,
            "weights": label,
        },
        "machine": machine,
        "rule": {"success": RULE, "speed": "fail when infer p50 / matmul median grew past --tolerance"},
        "run_dir": str(out / "run"),
    }


def cmd_regression(args) -> int:
    """`divla-eval regression`: 0 pass (or stored), 1 regression, 2 bad input (raised as DivlaEvalError)."""
    from divla_eval.policy import parse_policy_options
    from divla_eval.safe_io import write_text

    if not args.tolerance > 1:
        raise DivlaEvalError(f"--tolerance is a growth factor above 1; got {args.tolerance}")
    baseline = read_regression_file(args.baseline) if args.baseline.is_file() else None
    if baseline is None and not args.update:
        raise DivlaEvalError(f"no baseline at {args.baseline}: store one with --update")
    if args.baseline.exists() and not args.baseline.is_file():
        raise DivlaEvalError(f"--baseline {args.baseline} is not a file")

    if args.result is not None:
        result = read_regression_file(args.result, result=True)
        source = f"{args.result}"
    else:
        if not args.policy:
            raise DivlaEvalError("--policy is required (a registered name or package.module:factory)")
        if ":" in args.policy and "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.append(str(Path.cwd()))  # `--policy mypkg.policies:MyPolicy`, as `run` finds it
        from divla_eval.runner import RunConfig, validate

        grid = _grid(args, baseline)
        options = parse_policy_options(args.policy, dict(args.policy_option))
        validate(
            RunConfig(
                task=grid["task"],
                split=grid["split"],
                policy=args.policy,
                difficulty=grid["difficulty"],
                episodes=grid["episodes"],
                seed=grid["seed"],
                checkpoint=args.checkpoint,
                policy_options=options,
            )
        )
        from divla_eval.device import resolve_device

        resolve_device(args.device)  # a bad device is refused before anything runs
        if args.out is None:
            import tempfile

            out = Path(tempfile.mkdtemp(prefix="divla-eval-regression-"))
        else:
            out = args.out
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise DivlaEvalError(f"--out {out} exists and is not empty: give a new directory")
        print(
            f"regression: {args.policy} on {grid['task']} [{grid['split']}], {grid['episodes']} episodes, "
            f"seed {grid['seed']}; then {args.calls} timed inference calls; in {out}",
            file=sys.stderr,
        )
        try:
            result = measure(
                args.policy,
                grid,
                out,
                checkpoint=args.checkpoint,
                options=options,
                workers=args.workers,
                calls=args.calls,
                device=args.device,
                progress=not args.no_progress,
            )
        except KeyboardInterrupt:
            print(
                f"\ninterrupted: nothing compared or stored; the episodes so far are in {out}",
                file=sys.stderr,
            )
            return 130
        result["command"] = "divla-eval " + shlex.join(getattr(args, "argv", []) or [])
        write_text(out / "regression.json", json.dumps(result, indent=2) + "\n")
        source = str(out / "regression.json")

    s, sp = result["success"], result["speed"]
    measured = (
        f"success {_rate(s['successes'], s['episodes'])}; infer p50 {sp['infer_p50_ms']:.2f} ms = "
        f"{sp['ratio']:.3f} x matmul ({sp['reference_ms']:.2f} ms)"
    )
    if args.update:
        stored = {k: v for k, v in result.items() if k != "run_dir"}  # a temporary path: not the baseline's
        write_text(args.baseline, json.dumps(stored, indent=2) + "\n")
        print(f"stored {args.baseline}: {result['policy']} on {result['grid']['task']}: {measured}")
        return 0
    rows, notes = compare_results(baseline, result, args.tolerance)
    return print_verdict(
        f"regression: {result['policy']} ({source}) against {args.baseline} ({baseline.get('created', '?')})",
        rows,
        [f"  {note}" for note in notes],
        "regression: {names} failed; an accepted change is stored with --update",
    )


if __name__ == "__main__":
    sys.exit(grid_main())
