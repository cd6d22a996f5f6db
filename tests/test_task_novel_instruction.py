"""Novel multi-step instructions: held-out wording, order-sensitive success, scripted expert."""

import numpy as np
import pytest

from divla_eval.envs.layout import TABLE_TOP_Z
from divla_eval.tasks import make_env
from divla_eval.tasks.base import EpisodeSpec
from divla_eval.tasks.bin_picking import BASKET_POS
from divla_eval.tasks.novel_instruction import OBJECTS, TEMPLATES, NovelInstruction


@pytest.fixture(scope="module")
def env():
    e = make_env(task="novel_instruction", split="novel", cameras=())
    yield e
    e.close()


def _spec(i, split="novel"):
    return EpisodeSpec("novel_instruction", split, i)


def test_novel_templates_never_appear_in_training_split():
    task = NovelInstruction()
    train = {task.episode(_spec(i, "train")).instruction for i in range(task.default_episodes("train"))}
    novel = {task.episode(_spec(i)).instruction for i in range(task.default_episodes("novel"))}
    assert len(novel) == 36 and len(train) == 24
    assert not train & novel
    assert not set(TEMPLATES["train"]) & set(TEMPLATES["novel"])


def test_check_env_passes():
    from gymnasium.utils.env_checker import check_env

    e = make_env(task="novel_instruction", split="novel", image_size=32)
    try:
        check_env(e)
    finally:
        e.close()


def test_expert_follows_the_order(env):
    env.reset(options={"episode": _spec(22)})  # red pepper, then lemonade bottle
    ep = env.episode
    assert ep.instruction.index(OBJECTS[ep.first]) < ep.instruction.index(OBJECTS[ep.second])
    reasoning = []
    for _ in range(env.max_steps):
        out = ep.expert(env.sim)
        if not reasoning or reasoning[-1] != out.reasoning:
            reasoning.append(out.reasoning)
        step = env.advance(out.action)
        if step.done:
            break
    assert step.success and ep.entered == [ep.first, ep.second]
    assert reasoning[0] == f"the first object is the {OBJECTS[ep.first]}"
    assert f"the next object is the {OBJECTS[ep.second]}" in reasoning


def _drop_in_basket(env, index, dx):
    joint = env.sim.scene.objects[index].joints[0]
    env.sim.sim.data.set_joint_qpos(
        joint, np.array([BASKET_POS[0] + dx, BASKET_POS[1], TABLE_TOP_Z + 0.06, 1, 0, 0, 0])
    )
    env.sim.sim.forward()
    for _ in range(15):
        env.advance(np.array([0, 0, 0, 0, 0, 0, -1.0]))


def test_wrong_order_fails_right_order_succeeds(env):
    env.reset(options={"episode": _spec(0)})
    ep = env.episode
    _drop_in_basket(env, ep.second, 0.05)
    _drop_in_basket(env, ep.first, -0.05)
    assert not env.episode.evaluate(env.sim).success and ep.failure_mode(env.sim) == "wrong_order"
    env.reset(options={"episode": _spec(0)})
    ep = env.episode
    _drop_in_basket(env, ep.first, -0.05)
    assert ep.evaluate(env.sim).partial_score == 0.5
    _drop_in_basket(env, ep.second, 0.05)
    assert ep.evaluate(env.sim).success


def test_an_unmentioned_object_in_the_basket_fails(env):
    env.reset(options={"episode": _spec(0)})  # watermelon then lemonade bottle
    ep = env.episode
    other = next(i for i in range(4) if i not in (ep.first, ep.second))
    _drop_in_basket(env, ep.first, -0.06)
    _drop_in_basket(env, other, 0.0)
    _drop_in_basket(env, ep.second, 0.06)
    assert not ep.evaluate(env.sim).success and ep.failure_mode(env.sim) == "wrong_object"
