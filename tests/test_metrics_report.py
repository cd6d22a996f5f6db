"""Wilson intervals, success tables and the markdown/PNG report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from divla_eval.errors import DivlaEvalError
from divla_eval.metrics import (
    failure_modes,
    per_object_table,
    perturbation_label,
    records_frame,
    success_table,
    wilson_interval,
)
from divla_eval.records import EpisodeRecord, EpisodeStore, write_manifest
from divla_eval.report import markdown_table, write_report


def rec(
    i: int,
    *,
    success: bool,
    status: str = "ok",
    obj: str = "apple",
    perturbations: list | None = None,
    failure_mode: str | None = None,
    policy: str = "random",
    key: str | None = None,
) -> EpisodeRecord:
    return EpisodeRecord(
        run_id="r1",
        task="bin_picking",
        task_version="1",
        split="seen",
        difficulty=None,
        episode_index=i,
        episode_key=key or f"k{i}-{policy}",
        seed=i,
        object_ids=[obj, "bin"],
        instruction="pick it",
        perturbations=perturbations or [],
        policy=policy,
        checkpoint_hash=None,
        success=success,
        partial_score=1.0 if success else 0.2,
        failure_mode=failure_mode,
        steps=50,
        wall_time_s=2.0,
        latency_ms={"n": 5, "mean": 4.0, "p50": 4.0, "p95": 6.0} if status == "ok" else {},
        reasoning_trace=[],
        status=status,
        error="Traceback ...\nRuntimeError: boom" if status == "error" else None,
    )


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [(0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (5, 10, 0.2366, 0.7634), (0, 0, 0.0, 1.0)],
)
def test_wilson_interval_known_values(successes: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(low, abs=1e-3) and hi == pytest.approx(high, abs=1e-3)


def test_wilson_interval_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_perturbation_label_is_order_independent() -> None:
    assert perturbation_label([]) == "none"
    a = [{"name": "lighting", "level": 2}, {"name": "distractors", "level": 1.0}]
    assert perturbation_label(a) == perturbation_label(a[::-1]) == "distractors:1+lighting:2"


def test_records_frame_columns() -> None:
    df = records_frame([rec(0, success=True, perturbations=[{"name": "lighting", "level": 2}])])
    row = df.iloc[0]
    assert (row["object_id"], row["perturbation"], row["latency_mean_ms"]) == ("apple", "lighting:2", 4.0)
    assert len(records_frame([])) == 0 and "success" in records_frame([]).columns


def test_success_table_counts_errors_as_failures() -> None:
    records = [
        rec(0, success=True),
        rec(1, success=False, failure_mode="missed_grasp"),
        rec(2, success=True, status="error"),  # a success flag on an errored episode must not count
        rec(3, success=False, status="error"),
        rec(4, success=True, policy="expert"),
    ]
    table = success_table(records_frame(records), ["task", "policy"]).set_index("policy")
    r = table.loc["random"]
    assert (r["n"], r["successes"], r["errors"]) == (4, 1, 2)
    assert r["success_rate"] == pytest.approx(0.25)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(wilson_interval(1, 4))
    assert table.loc["expert", "success_rate"] == 1.0
    overall = success_table(records_frame(records), [])
    assert overall.loc[0, "n"] == 5 and overall.loc[0, "successes"] == 2


def test_success_table_keeps_missing_difficulty_groups() -> None:
    df = records_frame([rec(0, success=True), rec(1, success=False)])
    table = success_table(df, ["difficulty"])
    assert table["n"].tolist() == [2]  # None difficulty must not be dropped by groupby


def test_failure_modes_and_per_object() -> None:
    records = [
        rec(0, success=False, failure_mode="missed_grasp"),
        rec(1, success=False, failure_mode="missed_grasp", obj="cup"),
        rec(2, success=False, status="error"),
        rec(3, success=True, obj="cup"),
    ]
    df = records_frame(records)
    modes = failure_modes(df, ["policy"])
    assert dict(zip(modes["failure_mode"], modes["count"])) == {"missed_grasp": 2, "error": 1}
    assert modes.loc[modes["failure_mode"] == "missed_grasp", "share"].item() == pytest.approx(0.5)
    objects = per_object_table(df).set_index("object_id")
    assert objects.loc["cup", "n"] == 2 and objects.loc["cup", "success_rate"] == 0.5
    assert objects.loc["apple", "errors"] == 1


def test_markdown_table_escapes_pipes() -> None:
    df = records_frame([rec(0, success=True, obj="a|b")])[["object_id", "steps"]]
    text = markdown_table(df)
    assert text.splitlines() == ["| object_id | steps |", "|:---|---:|", "| a\\|b | 50 |"]


def test_write_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_manifest(run_dir, {"seed": 0, "tasks": ["bin_picking"]}, {"environment": {"git_commit": "abc123"}})
    store = EpisodeStore(run_dir / "episodes.jsonl")
    for r in [
        rec(0, success=True),
        rec(1, success=False, failure_mode="missed_grasp", obj="cup"),
        rec(2, success=True, obj="cup", perturbations=[{"name": "lighting", "level": 2}]),
        rec(3, success=False, status="error", perturbations=[{"name": "lighting", "level": 2}]),
    ]:
        store.append(r)
    report = write_report(run_dir)
    assert report == run_dir / "report.md"
    text = report.read_text()
    assert "50.0%" in text  # 1/2 for the 'none' group and for the lighting group (the error is a failure)
    assert "| bin_picking | seen | lighting:2 | random | 2 | 1 | 50.0% |" in text
    assert "seed: `0`" in text and "abc123" in text
    assert "missed_grasp" in text and "## Per object" in text and "RuntimeError: boom" in text
    png = run_dir / "success.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_errors_are_user_facing(tmp_path: Path) -> None:
    with pytest.raises(DivlaEvalError, match="does not exist"):
        write_report(tmp_path / "missing")
    with pytest.raises(DivlaEvalError, match="no episodes.jsonl"):
        write_report(tmp_path)
    (tmp_path / "episodes.jsonl").write_text("")
    with pytest.raises(DivlaEvalError, match="no finished episodes"):
        write_report(tmp_path)


def test_summary_grid_over_run_dirs_counts_shared_episodes_once(tmp_path: Path) -> None:
    from divla_eval.report import write_summary

    light = [{"name": "lighting", "level": 3}]
    a, b = EpisodeStore(tmp_path / "a" / "episodes.jsonl"), EpisodeStore(tmp_path / "b" / "episodes.jsonl")
    for i in range(4):
        a.append(rec(i, success=i < 3))  # 3/4 unperturbed
        b.append(rec(i, success=i < 3))  # the same episodes again (a shared control): not counted twice
    b.append(rec(9, success=False, perturbations=light, key="k9-lighting"))
    path = write_summary(tmp_path)
    text = path.read_text()
    assert path == tmp_path / "summary.md"
    row = "| bin_picking | 1 | seen | - | random | - | 75.0% [30.1%-95.4%] n=4 | 0.0% [0.0%-79.3%] n=1 |"
    assert row in text
    assert "Cells below 95% success: 2." in text
    # the same policy from two checkpoints, or on another task version, is another row, never pooled
    for name, ok in (("with-inj", True), ("no-inj", False)):
        run = tmp_path / name
        store = EpisodeStore(run / "episodes.jsonl")
        for i in range(2):
            store.append(rec(i, success=ok, policy="divla", key=f"{name}-{i}"))
        (run / "manifest.json").write_text(json.dumps({"config": {"checkpoint": f"ckpts/divla-{name}"}}))
    # a retrained model saved into the same folder is told apart by its content hash
    for name, digest, ok in (("old", "0e8b41c1a292288d", False), ("new", "7acb90b6d0c0a5f1", True)):
        run = tmp_path / f"shipped-{name}"
        store = EpisodeStore(run / "episodes.jsonl")
        for i in range(3):
            store.append(
                dataclasses.replace(rec(i, success=ok, policy="divla", key=f"s-{i}"), checkpoint_hash=digest)
            )
        (run / "manifest.json").write_text(json.dumps({"config": {"checkpoint": "ckpts/divla-shipped"}}))
    newer = EpisodeStore(tmp_path / "v2" / "episodes.jsonl")
    # the same episode (same key) under a new task version is kept, not taken for a duplicate
    newer.append(dataclasses.replace(rec(0, success=True), task_version="2"))
    text = write_summary(tmp_path).read_text()
    assert "| bin_picking | 1 | seen | - | divla | divla-with-inj | 100.0% [34.2%-100.0%] n=2 |" in text
    assert "| bin_picking | 1 | seen | - | divla | divla-no-inj | 0.0% [0.0%-65.8%] n=2 |" in text
    assert "| divla | divla-shipped@0e8b41c1 | 0.0% [0.0%-56.1%] n=3 |" in text
    assert "| divla | divla-shipped@7acb90b6 | 100.0% [43.9%-100.0%] n=3 |" in text
    assert "| bin_picking | 2 | seen | - | random | - | 100.0% [20.7%-100.0%] n=1 |" in text
    assert "| bin_picking | 1 | seen | - | random | - | 75.0% [30.1%-95.4%] n=4 |" in text
    (tmp_path / "empty").mkdir()
    with pytest.raises(DivlaEvalError, match="no run directories"):
        write_summary(tmp_path / "empty")
    with pytest.raises(DivlaEvalError, match="not a directory"):
        write_summary(tmp_path / "missing")


def test_summary_keeps_another_run_seed_apart_and_leaves_out_the_archive_and_curves(tmp_path: Path) -> None:
    """Same episode names under another run seed are other scenes: a row of their own, never deduplicated
    against (or pooled with) the seed-0 run; runs in an `archive` or `curves` folder are left out."""
    from divla_eval.report import load_runs, write_summary

    for name, seed, ok, offset in (("seed0", 0, True, 0), ("seed1000", 1000, False, 500)):
        store = EpisodeStore(tmp_path / name / "episodes.jsonl")
        for i in range(3):  # same keys, other scene seeds (as a run with --seed 1000 records them)
            store.append(
                dataclasses.replace(rec(i, success=ok, policy="divla", key=f"k{i}"), seed=i + offset)
            )
        manifest = {"config": {"checkpoint": "ckpts/divla-small", "seed": seed}}
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    archived = EpisodeStore(tmp_path / "archive" / "old" / "episodes.jsonl")
    archived.append(rec(0, success=True, policy="octo"))
    snapshot = EpisodeStore(tmp_path / "curves" / "dp" / "step-0005000" / "flip_pot" / "episodes.jsonl")
    snapshot.append(rec(0, success=True, policy="openvla"))  # a learning curve's: its own curve.md
    text = write_summary(tmp_path).read_text()
    assert "| divla | divla-small | 100.0% [43.9%-100.0%] n=3 |" in text
    assert "| divla | divla-small (seed 1000) | 0.0% [0.0%-56.1%] n=3 |" in text
    assert "octo" not in text and "openvla" not in text
    df, run_dirs = load_runs(tmp_path / "archive")  # shown when asked for
    assert list(df["policy"]) == ["octo"] and run_dirs == [tmp_path / "archive" / "old"]


def test_compare_pairs_episodes_and_gives_the_exact_mcnemar_p(tmp_path: Path) -> None:
    from divla_eval.metrics import mcnemar_exact
    from divla_eval.report import compare_runs

    assert mcnemar_exact(11, 1) == pytest.approx(0.00635, abs=1e-5)  # 2 * (1 + 12) / 2**12
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    a, b = EpisodeStore(tmp_path / "a" / "episodes.jsonl"), EpisodeStore(tmp_path / "b" / "episodes.jsonl")
    for i in range(6):
        a.append(rec(i, success=i < 4))  # solves 0-3
        b.append(rec(i, success=i in (3, 4), policy="divla"))  # solves 3 and 4
    b.append(rec(7, success=True, policy="divla"))  # not in A: left out of the pairs
    text = compare_runs(tmp_path / "a", tmp_path / "b")
    assert "| bin_picking | seen | - | none | 6 | 4/6 = 66.7%" in text
    assert "| 1 | 3 | 1 | 0.625 |" in text  # both, only A, only B, p = 2 * 5/16
    assert "Task versions differ" not in text
    # another run seed: the same indices are other scenes, so nothing pairs
    reseeded = EpisodeStore(tmp_path / "s" / "episodes.jsonl")
    reseeded.append(dataclasses.replace(rec(0, success=True), seed=1000))
    with pytest.raises(DivlaEvalError, match="share no episode"):
        compare_runs(tmp_path / "a", tmp_path / "s")
    # another task version: paired, and said
    newer = EpisodeStore(tmp_path / "v" / "episodes.jsonl")
    newer.append(dataclasses.replace(rec(0, success=True), task_version="2"))
    assert "Task versions differ (A: 1; B: 2)" in compare_runs(tmp_path / "a", tmp_path / "v")
    other = EpisodeStore(tmp_path / "c" / "episodes.jsonl")
    other.append(dataclasses.replace(rec(0, success=True), split="unseen"))
    with pytest.raises(DivlaEvalError, match="share no episode"):
        compare_runs(tmp_path / "a", tmp_path / "c")
    with pytest.raises(DivlaEvalError, match="does not exist"):
        compare_runs(tmp_path / "a", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DivlaEvalError, match="not a run directory"):
        compare_runs(tmp_path / "empty", tmp_path / "a")


def test_paper_tables_name_every_paper_policy_and_pool_subtasks_only_when_complete(tmp_path: Path) -> None:
    from divla_eval.paper import MULTITASK_SUBTASKS, write_paper_tables

    def mt(i: int, split: str, ok: bool, policy: str = "divla", options: dict | None = None) -> EpisodeRecord:
        base = rec(i, success=ok, policy=policy, key=f"mt-{split}-{i}-{policy}-{options}")
        return dataclasses.replace(base, task="multitask", split=split, policy_options=options or {})

    store = EpisodeStore(tmp_path / "divla-mt" / "episodes.jsonl")
    for split in MULTITASK_SUBTASKS:
        for i in range(2):
            store.append(mt(i, split, ok=(split == "flip_pot" and i == 0)))
    # a trade-off run with a non-default option is not the policy's table entry
    odd = EpisodeStore(tmp_path / "divla-mt-ddim5" / "episodes.jsonl")
    odd.append(mt(0, "select_object", ok=True, options={"inference_steps": 5}))
    # an incomplete policy: one sub-task only, so no average
    partial = EpisodeStore(tmp_path / "dp-mt" / "episodes.jsonl")
    partial.append(mt(0, "select_object", ok=True, policy="diffusion_policy"))
    text = write_paper_tables(tmp_path).read_text()
    section = text.split("## Multi-task (five Franka tasks, in distribution)")[1].split("##")[0]
    divla_row = next(line for line in section.splitlines() if line.startswith("| divla |"))
    assert divla_row.count("0/2 = 0.0%") == 4 and "1/2 = 50.0%" in divla_row
    assert divla_row.endswith("| 1/10 = 10.0% [1.8%-40.4%] |")  # the five sub-tasks pooled
    dp_row = next(line for line in section.splitlines() if line.startswith("| diffusion_policy |"))
    assert "| 1/1 = 100.0%" in dp_row and dp_row.endswith("| - |")  # no average from one sub-task
    assert "| openvla | not run |" in section and "| octo | not run |" in section
    assert "inference_steps" not in text and section.count("| divla |") == 1
    # bin picking has no runs here: every paper policy is listed as not run
    bin_section = text.split("## Zero-shot bin picking")[1].split("##")[0]
    assert bin_section.count("| not run |") == 6


def test_sorting_cells_show_the_mean_fraction_sorted_with_errors_as_zero(tmp_path: Path) -> None:
    from divla_eval.paper import write_paper_tables

    store = EpisodeStore(tmp_path / "octo-sorting" / "episodes.jsonl")
    for i, (ok, score, status) in enumerate([(True, 1.0, "ok"), (False, 0.5, "ok"), (False, 0.25, "error")]):
        base = rec(i, success=ok, status=status, policy="octo", key=f"s{i}")
        store.append(dataclasses.replace(base, task="sorting", difficulty="easy", partial_score=score))
    text = write_paper_tables(tmp_path).read_text()
    section = text.split("## Factory sorting")[1].split("##")[0]
    row = next(line for line in section.splitlines() if line.startswith("| octo |"))
    # (1.0 + 0.5 + 0, the errored episode's 0.25 not counted) / 3 = 50%
    assert "| 1/3 = 33.3% [6.1%-79.2%]; 50% sorted |" in row
    assert "mean fraction of a scene's objects sorted" in section
