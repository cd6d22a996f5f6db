"""The success rule and the repository's grid (`nox -s regression`, divla_eval/regression.py), on
fabricated episode records; and that the stored grid baseline is current (no simulation: < 1 s)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from divla_eval import regression
from divla_eval.records import EpisodeRecord, EpisodeStore

ROOT = Path(__file__).resolve().parent.parent


def write_run(
    run_dir: Path,
    successes: int,
    episodes: int,
    errors: int = 0,
    task_version: str = "1",
    checkpoint_hash: str | None = None,
) -> None:
    store = EpisodeStore(run_dir / "episodes.jsonl")
    run_dir.mkdir(parents=True, exist_ok=True)
    for i in range(episodes):
        error = i >= episodes - errors
        store.append(
            EpisodeRecord(
                run_id="r",
                task="bin_picking",
                task_version=task_version,
                split="unseen",
                difficulty=None,
                episode_index=i,
                episode_key=f"bin_picking/unseen/-/none/{i:05d}",
                seed=i,
                object_ids=[],
                instruction="move any object",
                perturbations=[],
                policy="divla",
                checkpoint_hash=checkpoint_hash,
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


def test_counts_read_from_records_count_errors_as_failures(tmp_path):
    write_run(tmp_path / "a", successes=5, episodes=10, errors=2)
    res = regression.cell_result(tmp_path / "a")
    assert (res.successes, res.episodes, res.outcomes, res.task_version) == (5, 10, "1111100000", "1")


@pytest.mark.parametrize(
    ("k0", "n0", "k1", "n1", "fails"),
    [
        (14, 30, 8, 30, False),  # a drop inside both runs' noise
        (14, 30, 7, 30, True),  # the shipped Diffusion Policy cell's limit
        (4, 40, 0, 40, True),  # DiVLA's cell: only a collapse is visible at a 10% rate
        (4, 40, 1, 40, False),
        (10, 10, 8, 10, False),  # the expert at 100%: noise of a perturbed rollout is not a regression
        (10, 10, 7, 10, True),
        (3, 3, 1, 3, True),  # the CI smoke's 3 scripted episodes
        (3, 3, 2, 3, False),
        (5, 10, 10, 10, False),  # improvements never fail
        (0, 10, 0, 10, False),
        (9, 30, 2, 10, False),  # unequal counts: 10 new episodes say less
    ],
)
def test_success_rule(k0, n0, k1, n1, fails):
    assert regression.success_dropped(k0, n0, k1, n1) is fails
    row = regression.success_row("c", (k0, n0), (k1, n1))
    assert row.failed is fails and (row.verdict == "FAIL") is fails
    limit = regression.fails_at(k0, n0, n1)
    assert (limit is not None and k1 <= limit) is fails


def test_the_rule_is_a_one_sided_5_percent_test_counting_both_runs_noise():
    # an unchanged policy whose rollouts were all perturbed: both counts binomial at the same rate
    for n in (10, 20, 30, 40):
        rates = [regression.false_alarm(k, n) for k in range(n + 1)]
        assert max(rates) < 0.06, (n, max(rates))
        assert rates[0] == rates[n] == 0.0  # 0% and 100% policies have no noise to mistake
    low, high = regression.rate_change_interval(14, 30, 7, 30)
    assert low < -0.233 < high < 0  # the interval holds the observed change and lies below 0


def _grid(root: Path, counts: dict[str, tuple[int, int]], **kw) -> None:
    for cell in regression.CELLS:
        k, n = counts[cell.name]
        write_run(root / cell.name, k, n, **kw)


DIVLA, EXPERT, DP, SORTING = (
    "divla-bin_picking-unseen",
    "scripted-bin_picking-unseen",
    "diffusion_policy-multitask-flip_pot",
    "scripted-sorting-easy-seen",
)


def test_update_then_compare_pass_and_fail_exit_codes(tmp_path, capsys):
    assert sorted(c.name for c in regression.CELLS) == sorted([DIVLA, EXPERT, DP, SORTING])
    baseline = tmp_path / "baseline.json"
    first, second = tmp_path / "first", tmp_path / "second"
    _grid(first, {DIVLA: (4, 40), EXPERT: (10, 10), DP: (14, 30), SORTING: (10, 10)})
    args = ["--no-run", "--baseline", str(baseline)]
    assert regression.grid_main([*args, "--out", str(first), "--update"]) == 0
    stored = json.loads(baseline.read_text())
    assert stored["cells"][DIVLA]["rate"] == pytest.approx(0.1)
    assert (
        stored["cells"][DIVLA]["task_version"] == "1"
        and stored["cells"][DIVLA]["outcomes"] == "1" * 4 + "0" * 36
    )
    assert stored["cells"][DIVLA]["episodes"] == 40 and "--episodes 40" in stored["cells"][DIVLA]["command"]
    assert regression.grid_main([*args, "--out", str(first)]) == 0  # the same records pass

    _grid(second, {DIVLA: (2, 40), EXPERT: (10, 10), DP: (14, 30), SORTING: (6, 10)})
    capsys.readouterr()
    assert regression.grid_main([*args, "--out", str(second)]) == 1  # sorting 6/10 against a stored 10/10
    out = capsys.readouterr().out
    lines = {
        line.split()[0]: line
        for line in out.splitlines()
        if line.split() and line.split()[0] in stored["cells"]
    }
    assert lines[SORTING].rstrip().endswith("FAIL") and "fails at <= 7/10" in lines[SORTING]
    assert lines[DIVLA].rstrip().endswith("ok") and lines[EXPERT].rstrip().endswith("ok")
    assert f"moved: {SORTING}: success -> failure at episode(s) 6, 7, 8, 9" in out
    assert f"regression: 1 cell(s) failed ({SORTING})" in out


def test_a_missing_or_stale_cell_fails(tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    runs = tmp_path / "runs"
    _grid(runs, {c.name: (5, 10) for c in regression.CELLS})
    args = ["--no-run", "--baseline", str(baseline), "--out", str(runs)]
    assert regression.grid_main([*args, "--update"]) == 0
    data = json.loads(baseline.read_text())
    del data["cells"][EXPERT]  # stale: a cell added to the grid without storing it
    data["cells"][DIVLA]["task_version"] = "0"  # stale: the task changed since
    del data["cells"][SORTING]["task_version"]  # stale: a baseline from before versions were stored
    data["cells"][DP]["checkpoint_hash"] = "0123456789abcdef"  # stale: the shipped checkpoint changed
    baseline.write_text(json.dumps(data))
    capsys.readouterr()
    assert regression.grid_main(args) == 1
    out = capsys.readouterr().out
    assert "MISSING" in next(line for line in out.splitlines() if line.startswith(EXPERT))
    assert "task version 0 -> 1" in out and "stored without a task version" in out
    assert "checkpoint 0123456789abcdef -> None" in out


def test_updating_some_cells_keeps_the_others(tmp_path):
    baseline = tmp_path / "baseline.json"
    runs = tmp_path / "runs"
    _grid(runs, {c.name: (1, 10) for c in regression.CELLS})
    args = ["--no-run", "--baseline", str(baseline), "--out", str(runs)]
    assert regression.grid_main([*args, "--update"]) == 0
    shutil.rmtree(runs / SORTING)
    write_run(runs / SORTING, 10, 10)
    assert regression.grid_main([*args, "--cells", SORTING, "--update"]) == 0
    cells = json.loads(baseline.read_text())["cells"]
    assert cells[SORTING]["rate"] == 1.0
    assert {name: cell["rate"] for name, cell in cells.items() if name != SORTING} == {
        c.name: 0.1 for c in regression.CELLS if c.name != SORTING
    }


def test_missing_run_directories_and_unknown_cells_are_errors(tmp_path, capsys):
    assert regression.grid_main(["--no-run", "--out", str(tmp_path / "none")]) == 2
    assert "missing:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        regression.grid_main(["--no-run", "--cells", "nosuchcell"])
    assert exc.value.code == 2


def test_the_stored_grid_baseline_is_current():
    """results/regression_baseline.json holds every cell of the grid, stored under the task version and
    the shipped checkpoint that the grid runs now: otherwise `nox -s regression` fails as STALE."""
    from divla_eval.checkpoint import checkpoint_hash
    from divla_eval.tasks import get_task

    stored = json.loads((ROOT / "results" / "regression_baseline.json").read_text())
    assert stored["rule"] == regression.RULE
    for cell in regression.CELLS:
        entry = stored["cells"][cell.name]
        args = shlex.split(cell.args)
        task = args[args.index("--task") + 1]
        assert entry["task_version"] == str(get_task(task).version), cell.name
        ckpt = args[args.index("--checkpoint") + 1] if "--checkpoint" in args else None
        assert entry["checkpoint_hash"] == (checkpoint_hash(ROOT / ckpt) if ckpt else None), cell.name
        assert entry["episodes"] == cell.episodes and len(entry["outcomes"]) == cell.episodes
        assert entry["successes"] == entry["outcomes"].count("1")
