"""Long checks, run by `nox -s slow` (excluded from the default suite)."""

import pytest

from divla_eval.runner import RunConfig, run


@pytest.mark.slow
def test_scripted_expert_on_all_102_unseen_objects(tmp_path):
    summary = run(RunConfig(task="bin_picking", split="unseen", policy="scripted"), tmp_path, progress=False)
    assert summary.planned == 102 and len(summary.records) == 102
    assert summary.errors == 0
    assert summary.successes / 102 >= 0.95


@pytest.mark.slow
def test_random_policy_over_20_episodes_never_succeeds(tmp_path):
    summary = run(RunConfig(policy="random", episodes=20), tmp_path, progress=False)
    assert summary.successes == 0
