"""scripts/regression.py: the comparison rule and its exit codes, on fabricated episode records."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from divla_eval.records import EpisodeRecord, EpisodeStore

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "regression.py"


@pytest.fixture(scope="module")
def regression():
    spec = importlib.util.spec_from_file_location("regression_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_run(run_dir: Path, successes: int, episodes: int, errors: int = 0) -> None:
    store = EpisodeStore(run_dir / "episodes.jsonl")
    run_dir.mkdir(parents=True, exist_ok=True)
    for i in range(episodes):
        error = i >= episodes - errors
        store.append(
            EpisodeRecord(
                run_id="r",
                task="bin_picking",
                task_version="1",
                split="unseen",
                difficulty=None,
                episode_index=i,
                episode_key=f"bin_picking/unseen/-/none/{i:05d}",
                seed=i,
                object_ids=[],
                instruction="move any object",
                perturbations=[],
                policy="divla",
                checkpoint_hash=None,
                success=i < successes and not error,
                partial_score=0.0,
                failure_mode=None,
                steps=1,
                wall_time_s=0.0,
                latency_ms={},
                reasoning_trace=[],
                status="error" if error else "ok",
                error="boom" if error else None,
            )
        )


def test_counts_read_from_records_count_errors_as_failures(regression, tmp_path):
    write_run(tmp_path / "a", successes=5, episodes=10, errors=2)
    assert regression.cell_counts(tmp_path / "a") == (5, 10)


@pytest.mark.parametrize(
    ("stored", "k", "n", "ok"),
    [
        (0.30, 8, 30, True),  # a small dip inside the noise
        (0.30, 5, 30, True),  # upper bound 33.6% >= 30%
        (0.30, 4, 30, False),  # upper bound 29.7% < 30%
        (1.00, 10, 10, True),
        (1.00, 9, 10, False),  # at a stored 100% any failure is a regression (upper bound 98.2%)
        (0.90, 8, 10, True),
        (0.90, 7, 10, False),
        (0.10, 0, 30, True),  # 30 episodes cannot rule out 10%
        (0.10, 0, 40, False),
        (0.50, 10, 10, True),  # improvements never fail
    ],
)
def test_a_cell_fails_only_when_the_stored_rate_is_above_the_new_upper_bound(regression, stored, k, n, ok):
    (check,) = regression.compare({"cells": {"c": {"rate": stored}}}, {"c": (k, n)})
    assert check.ok is ok
    assert ("FAIL" in check.line()) is (not ok)


def test_a_cell_without_a_stored_rate_is_reported_not_failed(regression):
    (check,) = regression.compare({}, {"new": (0, 5)})
    assert check.ok and check.line().startswith("NEW")


def _grid(regression, root: Path, counts: dict[str, tuple[int, int]]) -> None:
    for name in regression.CELLS:
        k, n = counts[name.name]
        write_run(root / name.name, k, n)


def test_update_then_compare_pass_and_fail_exit_codes(regression, tmp_path, capsys):
    divla, expert, dp, sorting = (
        "divla-bin_picking-unseen",
        "scripted-bin_picking-unseen",
        "diffusion_policy-multitask-flip_pot",
        "scripted-sorting-easy-seen",
    )
    assert sorted(c.name for c in regression.CELLS) == sorted([divla, expert, dp, sorting])
    baseline = tmp_path / "baseline.json"
    first, second = tmp_path / "first", tmp_path / "second"
    _grid(regression, first, {divla: (4, 40), expert: (10, 10), dp: (14, 30), sorting: (10, 10)})
    args = ["--no-run", "--baseline", str(baseline)]
    assert regression.main([*args, "--out", str(first), "--update"]) == 0
    stored = json.loads(baseline.read_text())
    assert stored["cells"][divla]["rate"] == pytest.approx(0.1)
    assert stored["cells"][divla]["episodes"] == 40 and "--episodes 40" in stored["cells"][divla]["command"]
    assert regression.main([*args, "--out", str(first)]) == 0  # the same records pass

    _grid(regression, second, {divla: (2, 40), expert: (10, 10), dp: (14, 30), sorting: (6, 10)})
    capsys.readouterr()
    assert regression.main([*args, "--out", str(second)]) == 1  # sorting 6/10 against a stored 100%
    out = capsys.readouterr().out
    assert f"FAIL  {sorting}" in out and f"ok    {expert}" in out and f"ok    {divla}" in out


def test_updating_some_cells_keeps_the_others(regression, tmp_path):
    baseline = tmp_path / "baseline.json"
    runs = tmp_path / "runs"
    _grid(regression, runs, {c.name: (1, 10) for c in regression.CELLS})
    args = ["--no-run", "--baseline", str(baseline), "--out", str(runs)]
    assert regression.main([*args, "--update"]) == 0
    shutil.rmtree(runs / "scripted-sorting-easy-seen")
    write_run(runs / "scripted-sorting-easy-seen", 10, 10)
    assert regression.main([*args, "--cells", "scripted-sorting-easy-seen", "--update"]) == 0
    cells = json.loads(baseline.read_text())["cells"]
    assert cells["scripted-sorting-easy-seen"]["rate"] == 1.0
    assert {name: cell["rate"] for name, cell in cells.items() if name != "scripted-sorting-easy-seen"} == {
        c.name: 0.1 for c in regression.CELLS if c.name != "scripted-sorting-easy-seen"
    }


def test_missing_run_directories_and_unknown_cells_are_errors(regression, tmp_path):
    assert regression.main(["--no-run", "--out", str(tmp_path / "none")]) == 2
    with pytest.raises(SystemExit):
        regression.main(["--no-run", "--cells", "nosuchcell"])
