"""scripts/multitask_conditions.py: --first compares runs of unequal length on the same episodes."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from conftest import load_script
from test_metrics_report import rec

from divla_eval.records import EpisodeStore


@pytest.fixture(scope="module")
def conditions():
    return load_script("multitask_conditions")


def write_cell(run_dir: Path, episodes: int, successes: set[int]) -> None:
    run_dir.mkdir(parents=True)
    store = EpisodeStore(run_dir / "episodes.jsonl")
    for i in range(episodes):
        store.append(dataclasses.replace(rec(i, success=i in successes), task="multitask"))


def run(conditions, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["multitask_conditions.py", *args])
    code = conditions.main()
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_first_keeps_the_same_episodes_of_every_cell(conditions, tmp_path, monkeypatch, capsys):
    prefix = tmp_path / "policy" / "multitask"
    # In distribution 100 episodes, successes only past episode 20; under distractors 20 episodes.
    write_cell(Path(f"{prefix}-flip_pot"), 100, successes={3, 50, 60})
    write_cell(Path(f"{prefix}-flip_pot-distractors3"), 20, successes={3, 7})

    code, out = run(conditions, monkeypatch, capsys, str(prefix))
    assert code == 0
    assert "| flip_pot | 3/100 | 2/20 | - | - |" in out

    code, out = run(conditions, monkeypatch, capsys, str(prefix), "--first", "20")
    assert code == 0
    assert "| flip_pot | 1/20 | 2/20 | - | - |" in out
    # Paired on episodes 0-19: episode 3 succeeds in both, episode 7 only under distractors.
    assert "only unperturbed / only distractors3: 0 / 1" in out


def test_first_must_be_positive(conditions, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        run(conditions, monkeypatch, capsys, str(tmp_path / "x"), "--first", "0")
    assert exc.value.code == 2
    assert "--first must be a positive number of episodes, not 0" in capsys.readouterr().err
