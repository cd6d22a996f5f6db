"""Conformance over the registries: every registered task and perturbation, not a hand-written list.

A task added to `TASKS` (or a perturbation to `PERTURBATIONS`) is checked here without editing this file:
each task passes gymnasium's `check_env` at its default split, its scripted expert succeeds and a random
policy does not on one seed; each perturbation changes the image and leaves the physics alone.
(Policies have their own conformance tests: tests/test_policy_conformance.py.)
"""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

from divla_eval.envs.perturbations import PERTURBATIONS
from divla_eval.tasks import ENV_IDS, TASKS, get_task, make_env
from divla_eval.tasks.base import EpisodeSpec

TASK_NAMES = TASKS.names()
GYM_ID = {task: env_id for env_id, task in ENV_IDS.items()}
SLOW_EXPERT = {"bussing"}
"""Tasks whose expert episode takes more than a few seconds (run with the `slow` marker)."""


def _default_split(name: str) -> str:
    return get_task(name).default_split


def test_every_task_has_a_gymnasium_id():
    assert sorted(GYM_ID) == sorted(TASK_NAMES)


def test_import_divla_eval_registers_the_gym_ids_without_the_simulator():
    code = (
        "import sys, divla_eval, gymnasium\n"
        "heavy = [m for m in ('torch', 'robosuite', 'mujoco') if m in sys.modules]\n"
        "assert heavy == [], heavy\n"
        "env = gymnasium.make('divla_eval/BinPicking-v0', image_size=16, cameras=('front',))\n"
        "obs, _ = env.reset(seed=0)\n"
        "assert obs['front'].shape == (16, 16, 3), obs['front'].shape\n"
        "env.close()\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_passes_gymnasium_check_env(name):
    from gymnasium.utils.env_checker import check_env

    env = gym.make(GYM_ID[name], split=_default_split(name), image_size=32, max_steps=20)
    try:
        check_env(env.unwrapped, skip_render_check=True)
    finally:
        env.close()


def _rollout(env, act, steps=None):
    """Run `act(env)` until the episode ends (or `steps`); returns the last StepResult."""
    step = None
    for _ in range(steps or env.max_steps):
        step = env.advance(act(env))
        if step.done:
            break
    return step


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_EXPERT else n for n in TASK_NAMES]
)
def test_expert_succeeds_and_random_does_not(name):
    env = make_env(task=name, split=_default_split(name), cameras=())
    try:
        env.reset(seed=0)
        step = _rollout(env, lambda e: e.episode.expert(e.sim).action)
        assert step.success, env.episode.failure_mode(env.sim)
        env.reset(seed=0)
        rng = np.random.default_rng(0)
        step = _rollout(env, lambda e: rng.uniform(-1, 1, e.action_space.shape), steps=50)
        assert not step.success
    finally:
        env.close()


@pytest.fixture(scope="module")
def bin_env():
    env = make_env(cameras=("front",), image_size=32)
    yield env
    env.close()


def _run_fixed_actions(env, perturbations=()):
    spec = EpisodeSpec("bin_picking", "unseen", 0, perturbations=perturbations)
    obs, _ = env.reset(options={"episode": spec})
    actions = np.random.default_rng(0).uniform(-1, 1, (15, env.action_space.shape[0]))
    proprio = []
    for action in actions:
        env.advance(action)
        proprio.append(env.observe(cameras=())["proprio"])
    return obs["front"], np.array(proprio), env.sim.object_positions()


@pytest.mark.parametrize("name", PERTURBATIONS.names())
def test_perturbation_changes_the_image_and_not_the_physics(bin_env, name):
    clean_image, clean_proprio, clean_objects = _run_fixed_actions(bin_env)
    image, proprio, objects = _run_fixed_actions(bin_env, ((name, 3),))
    assert np.abs(image.astype(int) - clean_image.astype(int)).mean() > 1.0, name
    objects = objects[: len(clean_objects)]  # distractors are added after the task's own objects
    if name == "distractors":  # extra bodies change the contact solver's summation order (1e-16 apart)
        np.testing.assert_allclose(proprio, clean_proprio, rtol=0, atol=1e-9)
        np.testing.assert_allclose(objects, clean_objects, rtol=0, atol=1e-9)
    else:  # a purely visual change: bit-identical physics
        np.testing.assert_array_equal(proprio, clean_proprio)
        np.testing.assert_array_equal(objects, clean_objects)
