"""Perturbations: visible, deterministic, recorded, restored, and harmless to physics and success."""

import numpy as np
import pytest

from divla_eval.envs.perturbations import PERTURBATIONS
from divla_eval.metrics import perturbation_drops, records_frame
from divla_eval.records import EpisodeStore
from divla_eval.runner import RunConfig, plan_episodes, run
from divla_eval.tasks import TASKS, get_task, make_env
from divla_eval.tasks.base import EpisodeSpec

ISSUE_PERTURBATIONS = ("distractors", "background", "lighting", "camera", "table")
NAMES = PERTURBATIONS.names()  # every registered perturbation, not a hand-written list


@pytest.fixture(scope="module")
def env():
    e = make_env(cameras=("front", "wrist"), image_size=48)
    yield e
    e.close()


def _reset(env, perturbations=(), index=0):
    obs, _ = env.reset(
        options={"episode": EpisodeSpec("bin_picking", "unseen", index, perturbations=perturbations)}
    )
    return obs


def test_every_issue_perturbation_is_registered():
    assert set(ISSUE_PERTURBATIONS) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_perturbation_visibly_changes_the_front_image(env, name):
    clean = _reset(env)["front"].astype(int)
    perturbed = _reset(env, ((name, 3),))["front"].astype(int)
    assert np.abs(clean - perturbed).mean() > 2.0, name  # mean absolute pixel change (0-255 scale)
    assert env.perturbation_params[0]["name"] == name and env.perturbation_params[0]["level"] == 3


@pytest.mark.parametrize("name", NAMES)
def test_task_objects_and_robot_start_where_they_would_without_it(env, name):
    _reset(env)
    clean = env.get_state()
    n_task = len(env.sim.scene.objects)
    clean_objects = env.sim.object_positions()
    _reset(env, ((name, 3),))
    assert np.allclose(env.sim.object_positions()[:n_task], clean_objects)
    if name != "distractors":  # extra objects lengthen the state vector; everything else is identical
        np.testing.assert_array_equal(env.get_state(), clean)


def test_appearance_is_restored_for_the_next_episode(env):
    clean = _reset(env)
    _reset(env, (("background", 3), ("lighting", 3), ("table", 3), ("camera", 3)))
    again = _reset(env)
    np.testing.assert_array_equal(clean["front"], again["front"])
    np.testing.assert_array_equal(clean["wrist"], again["wrist"])


def test_params_are_deterministic_and_depend_on_level(env):
    _reset(env, (("lighting", 2), ("distractors", 1)))
    first = env.perturbation_params
    _reset(env, (("lighting", 2), ("distractors", 1)))
    assert env.perturbation_params == first
    _reset(env, (("lighting", 3), ("distractors", 3)))
    assert env.perturbation_params != first
    assert len(env.perturbation_params[1]["objects"]) == 5


@pytest.mark.parametrize("name", NAMES)
def test_expert_still_succeeds_under_highest_severity(name):
    e = make_env(cameras=())
    try:
        e.reset(options={"episode": EpisodeSpec("bin_picking", "unseen", 14, perturbations=((name, 3),))})
        step = None
        for _ in range(e.max_steps):
            step = e.advance(e.episode.expert(e.sim).action)
            if step.done:
                break
        assert step.success, e.episode.failure_mode(e.sim)
    finally:
        e.close()


def test_matched_control_pairs_share_seeds_and_the_report_shows_the_drop(tmp_path):
    cfg = RunConfig(
        policy="random", episodes=2, max_steps=5, perturbations=(("lighting", 3),), matched_control=True
    )
    plan = plan_episodes(cfg)
    assert len(plan) == 4
    assert plan[0].seed("scene") == plan[1].seed("scene") and plan[0].key != plan[1].key
    run(cfg, tmp_path, progress=False)
    records = EpisodeStore(tmp_path / "episodes.jsonl").load()
    assert sorted(r.perturbations[0]["name"] if r.perturbations else "none" for r in records) == [
        "lighting",
        "lighting",
        "none",
        "none",
    ]
    assert all("diffuse" in r.perturbations[0] for r in records if r.perturbations)  # params are recorded
    drops = perturbation_drops(records_frame(records))
    assert list(drops["perturbation"]) == ["lighting:3"] and drops["pairs"].item() == 2


def test_paired_drop_on_constructed_records():
    import pandas as pd

    rows = []
    for i in range(10):
        base = dict(task="t", split="s", difficulty=None, policy="p", episode_index=i, status="ok")
        rows.append({**base, "perturbation": "none", "success": True})
        rows.append({**base, "perturbation": "lighting:3", "success": i < 6})
    drops = perturbation_drops(pd.DataFrame(rows))
    row = drops.iloc[0]
    assert row["drop"] == pytest.approx(0.4) and row["control_rate"] == 1.0 and row["perturbed_rate"] == 0.6
    assert row["drop_ci_low"] > 0.0 and row["drop_ci_high"] <= 0.8


VISUAL = tuple((name, 3) for name in NAMES if name != "distractors")


#: Where a task's hardest or most contact-rich split is not its default one; every other registered task
#: runs at its default split.
SPLIT_FOR = {"sorting": ("mixed", "hard"), "multitask": ("flip_pot", None), "bussing": ("mixed", None)}


@pytest.mark.parametrize(
    "task,split,difficulty",
    [(name, *SPLIT_FOR.get(name, (get_task(name).default_split, None))) for name in TASKS.names()],
)
def test_visual_perturbations_leave_the_expert_trajectory_bit_identical(task, split, difficulty):
    """The scripted expert reads simulator state and renders nothing, and episode seeds exclude the
    perturbations: under background, lighting, camera and table changes its rollout must be exactly
    the unperturbed one. Distractors are the one perturbation that changes the expert's physics."""
    e = make_env(task=task, split=split, difficulty=difficulty, cameras=())
    try:
        states = []
        for perturbations in ((), VISUAL):
            e.reset(options={"episode": EpisodeSpec(task, split, 1, 0, difficulty, perturbations)})
            for _ in range(60):
                e.advance(e.episode.expert(e.sim).action)
            states.append(e.get_state())
        assert len(e.perturbation_params) == len(VISUAL)
        np.testing.assert_array_equal(states[0], states[1])
    finally:
        e.close()
