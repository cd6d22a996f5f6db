"""EpisodeStore durability/resume semantics and manifest handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from divla_eval.errors import ConfigMismatchError, CorruptFileError
from divla_eval.records import (
    EpisodeRecord,
    EpisodeStore,
    check_manifest_compatible,
    environment_info,
    read_manifest,
    write_manifest,
)


def make_record(i: int, **overrides: object) -> EpisodeRecord:
    fields: dict = {
        "run_id": "run0",
        "task": "bin_picking",
        "task_version": "1",
        "split": "seen",
        "difficulty": None,
        "episode_index": i,
        "episode_key": f"bin_picking/seen/none/{i}",
        "seed": 1000 + i,
        "object_ids": ["apple"],
        "instruction": "put the apple in the bin",
        "perturbations": [],
        "policy": "random",
        "checkpoint_hash": None,
        "success": i % 2 == 0,
        "partial_score": 0.5,
        "failure_mode": None if i % 2 == 0 else "missed_grasp",
        "steps": 100,
        "wall_time_s": 1.5,
        "latency_ms": {"n": 10, "mean": 2.0, "p50": 1.9, "p95": 3.0},
        "reasoning_trace": [{"step": 0, "text": "reach"}],
        "status": "ok",
        "error": None,
    }
    fields.update(overrides)
    return EpisodeRecord(**fields)


def test_to_json_is_one_sorted_line_and_round_trips() -> None:
    rec = make_record(3, extra={"note": "x\ny"})
    line = rec.to_json()
    assert "\n" not in line
    assert list(json.loads(line)) == sorted(json.loads(line))
    assert EpisodeRecord.from_dict(json.loads(line)) == rec


def test_from_dict_ignores_unknown_keys() -> None:
    data = json.loads(make_record(1).to_json())
    data["field_from_the_future"] = 42
    assert EpisodeRecord.from_dict(data) == make_record(1)


def test_append_load_round_trip(tmp_path: Path) -> None:
    store = EpisodeStore(tmp_path / "run" / "episodes.jsonl")
    assert store.load() == [] and store.done_keys() == set()
    records = [make_record(i) for i in range(3)]
    for r in records:
        store.append(r)
    assert store.path.read_text().count("\n") == 3
    assert store.load() == records
    assert store.done_keys() == {r.episode_key for r in records}


def test_truncated_last_line_is_ignored_with_warning(tmp_path: Path) -> None:
    store = EpisodeStore(tmp_path / "episodes.jsonl")
    store.append(make_record(0))
    store.append(make_record(1))
    with open(store.path, "a") as f:
        f.write(make_record(2).to_json()[:40])  # interrupted write: no closing brace, no newline
    with pytest.warns(UserWarning, match="truncated"):
        loaded = store.load()
    assert [r.episode_index for r in loaded] == [0, 1]


def test_append_after_interrupted_write_keeps_file_readable(tmp_path: Path) -> None:
    path = tmp_path / "episodes.jsonl"
    EpisodeStore(path).append(make_record(0))
    with open(path, "a") as f:
        f.write(make_record(1).to_json()[:25])
    resumed = EpisodeStore(path)
    with pytest.warns(UserWarning, match="truncated"):
        resumed.append(make_record(1))
    assert [r.episode_index for r in resumed.load()] == [0, 1]


def test_complete_last_line_missing_newline_is_kept_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "episodes.jsonl"
    path.write_text(make_record(0).to_json())  # full record, newline never written
    store = EpisodeStore(path)
    assert store.done_keys() == {make_record(0).episode_key}
    store.append(make_record(1))
    assert [r.episode_index for r in store.load()] == [0, 1]


def test_garbled_middle_line_raises_with_line_number(tmp_path: Path) -> None:
    path = tmp_path / "episodes.jsonl"
    path.write_text(make_record(0).to_json() + "\n{garbage\n" + make_record(1).to_json() + "\n")
    with pytest.raises(CorruptFileError, match=r"episodes\.jsonl:2"):
        EpisodeStore(path).load()


def test_line_that_is_json_but_not_a_record_raises(tmp_path: Path) -> None:
    path = tmp_path / "episodes.jsonl"
    path.write_text('{"task": "bin_picking"}\n' + make_record(0).to_json() + "\n")
    with pytest.raises(CorruptFileError, match=r":1: not an episode record"):
        EpisodeStore(path).load()


def test_duplicate_keys_keep_first(tmp_path: Path) -> None:
    store = EpisodeStore(tmp_path / "episodes.jsonl")
    store.append(make_record(0, success=True))
    store.append(make_record(1))
    store.append(make_record(0, success=False))
    with pytest.warns(UserWarning, match="duplicate"):
        loaded = store.load()
    assert [r.episode_index for r in loaded] == [0, 1]
    assert loaded[0].success is True


def test_manifest_round_trip_and_compatibility(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "x"
    assert read_manifest(run_dir) is None
    check_manifest_compatible(run_dir, {"seed": 0})  # no manifest yet: anything goes
    config = {"seed": 0, "tasks": ("bin_picking",), "policy": {"name": "random", "chunk": 8}}
    write_manifest(run_dir, config, {"environment": {"python": "3.11"}})
    manifest = read_manifest(run_dir)
    assert manifest is not None
    assert manifest["config"]["tasks"] == ["bin_picking"] and manifest["environment"] == {"python": "3.11"}
    assert [p.name for p in run_dir.iterdir()] == ["manifest.json"]  # no temp file left behind
    check_manifest_compatible(run_dir, config)  # tuple vs list must not count as a change


def test_manifest_mismatch_names_the_differing_keys(tmp_path: Path) -> None:
    run_dir = tmp_path / "x"
    write_manifest(run_dir, {"seed": 0, "policy": {"chunk": 8}, "workers": 2}, {})
    with pytest.raises(ConfigMismatchError) as info:
        check_manifest_compatible(run_dir, {"seed": 1, "policy": {"chunk": 16}, "workers": 2})
    msg = str(info.value)
    assert "seed: 0 -> 1" in msg and "policy.chunk: 8 -> 16" in msg
    assert "workers" not in msg and "use a new --out directory" in msg


def test_corrupt_manifest_raises(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="manifest.json"):
        read_manifest(tmp_path)


def test_environment_info_outside_git(tmp_path: Path) -> None:
    info = environment_info(cwd=tmp_path)
    assert info["git_commit"] is None and info["dirty"] is None
    assert info["cpu_count"] and info["python"].count(".") == 2
    assert set(info["packages"]) >= {"mujoco", "robosuite", "numpy", "torch"}
    assert info["packages"]["numpy"]  # installed in the venv; read from metadata
    json.dumps(info)  # must be storable in the manifest


def test_environment_info_reports_commit_and_dirty(tmp_path: Path) -> None:
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            check=True,
            capture_output=True,
        )

    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("commit", "-q", "-m", "init")
    (tmp_path / "untracked.txt").write_text("run output")
    info = environment_info(cwd=tmp_path)
    assert info["git_commit"] is not None and len(info["git_commit"]) == 40
    assert info["dirty"] is False  # untracked files (run dirs, venvs) do not change the code
    assert info["dirty_files"] == []
    (tmp_path / "a.txt").write_text("2")
    info = environment_info(cwd=tmp_path)
    assert info["dirty"] is True and info["dirty_files"] == ["a.txt"]
