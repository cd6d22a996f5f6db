"""Sorting task: gym API, seeded scenes, the success predicate and partial score, the scripted expert."""

import gymnasium as gym
import numpy as np
import pytest

import divla_eval.envs  # noqa: F401  (registers the gym ids)
from divla_eval.envs import sorting_objects as library
from divla_eval.envs.layout import TABLE_TOP_Z
from divla_eval.tasks import make_env
from divla_eval.tasks.base import EpisodeSpec
from divla_eval.tasks.sorting import FAILURE_MODES, INSTRUCTION, PILE_CENTER, ZONES, choose_objects


@pytest.fixture(scope="module")
def env():
    e = make_env(task="sorting", split="seen", difficulty="easy", cameras=())
    yield e
    e.close()


def _spec(i, split="seen", difficulty="easy", seed=0, perturbations=()):
    return EpisodeSpec("sorting", split, i, run_seed=seed, difficulty=difficulty, perturbations=perturbations)


def _first_with(n, split="seen", difficulty="easy"):
    """The first episode index whose object set has n objects (a pure function of the seed)."""
    return next(i for i in range(200) if len(choose_objects(_spec(i, split, difficulty), difficulty)) == n)


def test_check_env_passes():
    from gymnasium.utils.env_checker import check_env

    e = gym.make("divla_eval/Sorting-v0", difficulty="easy", image_size=32, render_mode="rgb_array")
    try:
        check_env(e.unwrapped, skip_render_check=False)
        obs, _ = e.reset(seed=1)
        assert obs["front"].shape == (32, 32, 3) and obs["front"].dtype == np.uint8
        assert obs["instruction"] == INSTRUCTION
        assert 2 <= len(e.unwrapped.episode.object_ids) <= 4
    finally:
        e.close()


def test_object_sets_follow_difficulty_and_split():
    for i in range(20):
        easy = choose_objects(_spec(i), "easy")
        assert 2 <= len(easy) <= 4 and len({s.category for s in easy}) == len(easy)  # one per category
        hard = choose_objects(_spec(i, difficulty="hard"), "hard")
        assert 6 <= len(hard) <= 11
        counts = [sum(s.category == c for s in hard) for c in library.CATEGORIES]
        assert max(counts) - min(counts) <= 1  # balanced categories
        assert len({s.name for s in hard}) == len(hard)  # every object can be named unambiguously
        assert {s.split for s in choose_objects(_spec(i, "unseen"), "easy")} == {"unseen"}
        mixed = choose_objects(_spec(i, "mixed", "hard"), "hard")
        assert {s.split for s in mixed} == {"seen", "unseen"}
    assert choose_objects(_spec(3), "easy") == choose_objects(_spec(3), "easy")


def test_library_splits_differ_in_colour_and_shape():
    seen, unseen = library.objects("seen"), library.objects("unseen")
    assert not {o.id for o in seen} & {o.id for o in unseen}
    assert not {o.colour for o in seen} & {o.colour for o in unseen}
    gloves = {split: {o.dims[-1] for o in library.objects(split, "glove")} for split in library.SPLITS}
    assert gloves == {"seen": {4}, "unseen": {1}}  # five-finger gloves vs mittens
    for o in seen + unseen:
        built = o.build("obj0")
        assert built.joints and built.grasp_hint.close_axis in ("x", "y")


@pytest.mark.parametrize("difficulty", ["easy", "hard"])
def test_same_seed_same_initial_state(env, difficulty):
    env.reset(options={"episode": _spec(4, difficulty=difficulty)})
    a = env.get_state()
    ids = list(env.episode.object_ids)
    env.reset(options={"episode": _spec(5, difficulty=difficulty)})
    env.reset(options={"episode": _spec(4, difficulty=difficulty)})
    np.testing.assert_array_equal(env.get_state(), a)
    assert env.episode.object_ids == ids
    env.reset(options={"episode": _spec(4, difficulty=difficulty, seed=1)})
    assert not np.array_equal(env.get_state(), a)  # another run seed gives another scene


def test_hard_piles_6_to_11_objects_on_the_table(env):
    env.reset(options={"episode": _spec(0, "mixed", "hard")})
    n = len(env.sim.scene.objects)
    assert 6 <= n <= 11
    for _ in range(25):  # let the pile settle
        env.advance(np.array([0, 0, 0, 0, 0, 0, -1.0]))
    pos = env.sim.object_positions()
    assert np.all(pos[:, 2] > TABLE_TOP_Z) and np.all(np.abs(pos[:, :2] - PILE_CENTER).max(axis=1) < 0.2)
    m, d = env.sim.sim.model._model, env.sim.sim.data._data
    bodies = set(env.sim.object_body_ids)
    touching = [
        c
        for c in d.contact[: d.ncon]
        if m.geom_bodyid[c.geom1] in bodies
        and m.geom_bodyid[c.geom2] in bodies
        and m.geom_bodyid[c.geom1] != m.geom_bodyid[c.geom2]
    ]
    assert touching, "hard objects should touch or lie on each other"
    assert env.episode.evaluate(env.sim).partial_score < 1.0


def _place(env, index, xy, settle=True):
    obj = env.sim.scene.objects[index]
    z = TABLE_TOP_Z + obj.get_bounding_box_half_size()[2] + 0.004
    env.sim.sim.data.set_joint_qpos(obj.joints[0], np.array([xy[0], xy[1], z, 1, 0, 0, 0]))
    env.sim.sim.forward()
    if settle:
        for _ in range(20):
            env.sim.step(np.array([0, 0, 0, 0, 0, 0, -1.0]))


def _three_objects(env):
    env.reset(options={"episode": _spec(_first_with(3))})
    for i in range(3):  # all in the pile, apart
        _place(env, i, (PILE_CENTER[0], PILE_CENTER[1] - 0.09 + 0.09 * i), settle=False)
    return env.episode.categories


def test_partial_score_counts_objects_in_their_own_area(env):
    cats = _three_objects(env)
    _place(env, 0, ZONES[cats[0]])
    ev = env.episode.evaluate(env.sim)
    assert not ev.success and ev.partial_score == pytest.approx(1 / 3)
    assert env.episode.failure_mode(env.sim) == "no_grasp"  # nothing was ever picked up
    env.episode.ever_grasped = True
    assert env.episode.failure_mode(env.sim) == "unsorted"
    wrong = next(c for c in ZONES if c not in cats)
    _place(env, 1, ZONES[wrong])
    ev = env.episode.evaluate(env.sim)
    assert ev.partial_score == pytest.approx(1 / 3)  # the wrong area does not count
    assert env.episode.failure_mode(env.sim) == "wrong_zone"
    _place(env, 1, ZONES[cats[1]])
    _place(env, 2, ZONES[cats[2]])
    ev = env.episode.evaluate(env.sim)
    assert ev.success and ev.partial_score == 1.0


def test_distractors_are_not_sorted():
    e = make_env(
        task="sorting", split="seen", difficulty="easy", cameras=(), perturbations=(("distractors", 1),)
    )
    try:
        e.reset(options={"episode": _spec(_first_with(2), perturbations=(("distractors", 1),))})
        assert len(e.sim.scene.objects) > 2
        cats = e.episode.categories
        for i in range(2):
            _place(e, i, ZONES[cats[i]])
        ev = e.episode.evaluate(e.sim)
        assert ev.success and ev.partial_score == 1.0
    finally:
        e.close()


def test_object_off_the_table_is_dropped(env):
    cats = _three_objects(env)
    for i in range(2):
        _place(env, i, ZONES[cats[i]], settle=False)
    env.sim.sim.data.set_joint_qpos(
        env.sim.scene.objects[2].joints[0], np.array([0.3, -0.9, 0.1, 1, 0, 0, 0])
    )
    for _ in range(10):
        env.sim.step(np.array([0, 0, 0, 0, 0, 0, -1.0]))
    ev = env.episode.evaluate(env.sim)
    assert ev.partial_score == pytest.approx(2 / 3) and env.episode.failure_mode(env.sim) == "dropped"


@pytest.mark.parametrize("split", ["seen", "unseen"])
def test_scripted_expert_sorts_everything(env, split):
    env.reset(options={"episode": _spec(_first_with(2, split), split)})
    names = [s.name for s in env.episode.specs]
    trace = []
    for _ in range(env.max_steps):
        out = env.episode.expert(env.sim)
        if not trace or trace[-1] != out.reasoning:
            trace.append(out.reasoning)
        step = env.advance(out.action)
        if step.done:
            break
    assert step.success and step.partial_score == 1.0, env.episode.failure_mode(env.sim)
    assert env.steps < 400  # about 120 steps per object
    assert trace[0] in {f"the next object is the {n}" for n in names}
    for spec in env.episode.specs:
        assert f"grasp the {spec.name}" in trace
        assert f"place it in the {library.CATEGORY_WORDS[spec.category]} area" in trace
    assert env.frames_rendered == 0  # nothing consumed an image, so nothing was drawn


def test_random_actions_do_not_sort(env):
    rng = np.random.default_rng(0)
    env.reset(options={"episode": _spec(_first_with(3))})
    for _ in range(150):
        step = env.advance(rng.uniform(-1, 1, 7))
        assert not step.terminated
    assert step.partial_score < 1.0
    assert env.episode.failure_mode(env.sim) in FAILURE_MODES


def test_step_budget_follows_the_episode_difficulty():
    from divla_eval.tasks import make_env
    from divla_eval.tasks.base import EpisodeSpec

    env = make_env(task="sorting", split="seen", cameras=())  # built for `easy`
    try:
        env.reset(options={"episode": EpisodeSpec("sorting", "seen", 0, 0, "hard")})
        assert env.max_steps == 3000
        env.reset(options={"episode": EpisodeSpec("sorting", "seen", 0, 0, "easy")})
        assert env.max_steps == 1500
    finally:
        env.close()
    env = make_env(task="sorting", split="seen", difficulty="hard", cameras=(), max_steps=7)
    try:
        env.reset(options={"episode": EpisodeSpec("sorting", "seen", 0, 0, "hard")})
        assert env.max_steps == 7  # a user's --max-steps wins
    finally:
        env.close()


def _car_grasp_point(env, qpos_xyz):
    """Put episode 0's toy car at `qpos_xyz` (unrotated) and return it with the grasp point the
    sorting expert's controller would aim at."""
    from divla_eval.tasks.sorting import FreeSpotPickPlace, grasp_candidates

    env.reset(options={"episode": _spec(0)})
    car = env.episode.categories.index("toy_car")
    obj = env.sim.scene.objects[car]
    env.sim.sim.data.set_joint_qpos(obj.joints[0], np.array([*qpos_xyz, 1, 0, 0, 0]))
    env.sim.sim.forward()
    expert = FreeSpotPickPlace(
        obj_index=car,
        goal_xy=ZONES["toy_car"],
        release_z=TABLE_TOP_Z + 0.12,
        candidates=grasp_candidates(env.episode.specs[car], obj.grasp_hint),
    )
    expert.choose_candidate(env.sim)
    point, _yaw = expert._grasp_target(env.sim)
    return car, point


def test_expert_grasps_a_far_toy_car_by_its_near_end(env):
    """Beyond REACH the arm locks straight (tasks/sorting.py, ZONES); the expert takes such an
    object by its near end instead of its centre."""
    # lying on the table, its length along x, pointing away from the robot
    car, point = _car_grasp_point(env, (0.20, -0.25, TABLE_TOP_Z + 0.02))
    centre = env.sim.object_position(car)
    base = np.asarray(env.sim.robots[0].base_pos[:2])
    assert np.linalg.norm(centre[:2] - base) > 0.75
    lo, hi = env.sim.object_corners(car).min(axis=0), env.sim.object_corners(car).max(axis=0)
    assert np.linalg.norm(point[:2] - base) < np.linalg.norm(centre[:2] - base) - 0.02  # moved nearer
    assert np.all(point[:2] > lo[:2] + 0.01) and np.all(point[:2] < hi[:2] - 0.01)  # still on the car


def test_expert_does_not_chase_an_object_above_the_pile(env):
    """An object caught in the open fingers rises with the hand; the grasp point must not follow it
    up (tasks/sorting.py, GRASP_MAX_HEIGHT)."""
    from divla_eval.tasks.sorting import GRASP_MAX_HEIGHT

    _car, point = _car_grasp_point(env, (0.0, -0.1, TABLE_TOP_Z + 0.5))
    assert point[2] == pytest.approx(TABLE_TOP_Z + GRASP_MAX_HEIGHT)
