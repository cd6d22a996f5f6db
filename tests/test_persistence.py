"""The success-persistence check: it reproduces a run's successes and can tell a lasting one from
one that ends when the robot stops."""

import numpy as np
import pytest

from divla_eval import persistence
from divla_eval.errors import DivlaEvalError
from divla_eval.persistence import check_run
from divla_eval.runner import RunConfig, run


def _expert_run(tmp_path, split):
    cfg = RunConfig(task="multitask", split=split, policy="scripted", episodes=1)
    summary = run(cfg, tmp_path, progress=False)
    assert summary.successes == 1
    return tmp_path


def test_expert_flip_reproduces_and_lasts(tmp_path):
    (result,) = check_run(_expert_run(tmp_path, "flip_pot"), hold=20, progress=False)
    assert result.reproduced and result.persists
    assert result.rerun_steps == result.recorded_steps


def test_a_success_that_ends_when_the_hand_opens_is_caught(tmp_path, monkeypatch):
    # select_object counts only while the gripper holds the object: opening it must fail the check
    run_dir = _expert_run(tmp_path, "select_object")
    assert check_run(run_dir, hold=20, progress=False)[0].persists

    def opened(action_dim):
        action = np.zeros(action_dim)
        action[6::7] = -1.0
        return action

    monkeypatch.setattr(persistence, "frozen_action", opened)
    (result,) = check_run(run_dir, hold=20, progress=False)
    assert result.reproduced and not result.persists


def test_not_a_run_directory(tmp_path):
    with pytest.raises(DivlaEvalError, match="not a run directory"):
        check_run(tmp_path, progress=False)
