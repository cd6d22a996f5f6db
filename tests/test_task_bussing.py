"""Bimanual bussing: two arms, 14-D actions, per-object scoring, scripted expert."""

import numpy as np
import pytest

from divla_eval.envs.layout import TABLE_TOP_Z
from divla_eval.tasks import make_env
from divla_eval.tasks.base import EpisodeSpec
from divla_eval.tasks.bussing import BIN_POS, ITEMS, TRAY_POS, Bussing


@pytest.fixture(scope="module")
def env():
    e = make_env(task="bussing", split="seen", cameras=())
    yield e
    e.close()


def _spec(i, split="seen"):
    return EpisodeSpec("bussing", split, i)


def test_two_arms_and_their_spaces(env):
    obs, _ = env.reset(options={"episode": _spec(0)})
    assert env.action_space.shape == (14,) and obs["proprio"].shape == (22,)
    assert len(env.sim.robots) == 2 and env.embodiment == "bimanual_panda"


def test_check_env_passes_with_both_wrist_cameras():
    from gymnasium.utils.env_checker import check_env

    e = make_env(task="bussing", split="seen", cameras=("front", "wrist", "wrist_left"), image_size=32)
    try:
        check_env(e)
        obs, _ = e.reset(seed=0)
        assert not np.array_equal(obs["wrist"], obs["wrist_left"])  # two different wrist views
    finally:
        e.close()


def test_splits_draw_the_right_objects():
    task = Bussing()
    seen_ids = {i.id for i in ITEMS if i.split == "seen"}
    for i in range(20):
        seen = task.episode(_spec(i, "seen"))
        mixed = task.episode(_spec(i, "mixed"))
        assert set(seen.object_ids) <= seen_ids and 3 <= len(seen.object_ids) <= 5
        assert set(mixed.object_ids) - seen_ids, "mixed needs an unseen object"
        assert {it.kind for it in mixed.items} == {"utensil", "trash"}


def test_scripted_expert_clears_the_table(env):
    env.reset(options={"episode": _spec(0)})
    for _ in range(env.max_steps):
        step = env.advance(env.episode.expert(env.sim).action)
        if step.done:
            break
    assert step.success and step.partial_score == 1.0


def _put(env, i, xy):
    joint = env.sim.scene.objects[i].joints[0]
    env.sim.sim.data.set_joint_qpos(joint, np.array([xy[0], xy[1], TABLE_TOP_Z + 0.08, 1, 0, 0, 0]))
    env.sim.sim.forward()


def test_partial_score_and_wrong_place(env):
    env.reset(options={"episode": _spec(1)})
    items = env.episode.items
    utensil = next(i for i, it in enumerate(items) if it.kind == "utensil")
    trash = next(i for i, it in enumerate(items) if it.kind == "trash")
    _put(env, utensil, TRAY_POS)
    for _ in range(20):
        env.advance(env.episode._idle(env.sim))
    ev = env.episode.evaluate(env.sim)
    assert not ev.success and ev.partial_score == pytest.approx(1 / len(items))
    _put(env, trash, (TRAY_POS[0] + 0.05, TRAY_POS[1]))  # trash on the tray
    for _ in range(20):
        env.advance(env.episode._idle(env.sim))
    assert env.episode.failure_mode(env.sim) == "wrong_place"
    assert BIN_POS[1] < 0 < TRAY_POS[1]  # bin on the right arm's side, tray on the left's


def test_object_across_the_line_is_handed_over(env):
    """A utensil on the right arm's side is set down across the line by the right arm, then the
    left arm takes it to the tray (lifting it from across the table tipped the left hand over)."""
    env.reset(options={"episode": _spec(2)})
    items = env.episode.items
    target = next(i for i, it in enumerate(items) if it.kind == "utensil")
    for i, it in enumerate(items):  # everything else is already cleared away
        if i != target:
            home = TRAY_POS if it.kind == "utensil" else BIN_POS
            _put(env, i, (home[0] + 0.06 * (i % 2) - 0.03, home[1] + 0.05 * (i // 2) - 0.05))
    _put(env, target, (-0.15, -0.07))
    trace = []
    for _ in range(900):
        act = env.episode.expert(env.sim)
        trace.append((env.episode._current.robot, act.reasoning))
        step = env.advance(act.action)
        if step.success:
            break
    assert trace[0] == (0, f"grasp the {items[target].name} with the right arm")
    assert (0, "hand it over to the left arm") in trace
    assert (1, f"grasp the {items[target].name} with the left arm") in trace
    assert step.success


def test_round_objects_are_grasped_clear_of_a_neighbour_with_the_least_wrist_turn():
    from divla_eval.tasks.pick_place_expert import PickPlaceExpert

    class Scene:  # the plate at the origin, a tall can 8 cm away along -y; the fingers along y
        positions = [[0.0, 0.0, 0.8], [0.0, -0.08, 0.84], [0.5, 0.5, 0.8]]

        def object_positions(self):
            return np.array(self.positions)

        def finger_axis(self, robot):
            return np.array([0.0, 1.0, 0.0])

    expert = PickPlaceExpert(obj_index=0, goal_xy=(0, 0), release_z=1.0)
    yaw = expert._clear_yaw(Scene(), np.zeros(3))
    # the smallest turn from y (in 15-degree steps) that puts the can 6 cm off the closing line: 60
    assert 0.08 * abs(np.cos(yaw)) >= 0.06 and abs(np.degrees(yaw) - 90) == pytest.approx(60)
    Scene.positions = [[0.0, 0.0, 0.8], [0.5, 0.5, 0.8]]  # nothing near: no turn at all
    assert expert._clear_yaw(Scene(), np.zeros(3)) == pytest.approx(np.pi / 2)


def test_hand_over_sets_the_object_down_clear_of_the_others(env):
    """The hand-over point skips points whose footprint a neighbour covers, and the object is set
    down there, not dropped (a dropped fork landed on its side across a cup: task version 5)."""
    env.reset(options={"episode": _spec(2)})
    items = env.episode.items
    target = next(i for i, it in enumerate(items) if it.kind == "utensil")
    blocker = next(i for i in range(len(items)) if i != target)
    for i, it in enumerate(items):
        if i not in (target, blocker):
            home = TRAY_POS if it.kind == "utensil" else BIN_POS
            _put(env, i, (home[0] + 0.06 * (i % 2) - 0.03, home[1] + 0.05 * (i // 2) - 0.05))
    _put(env, target, (-0.15, -0.07))
    _put(env, blocker, (-0.03, 0.1))  # covers the first hand-over point, (-0.08, 0.05)
    for _ in range(20):  # let the dropped objects come to rest
        env.advance(np.zeros(14))
    for _ in range(400):
        act = env.episode.expert(env.sim)
        expert = env.episode._current
        if expert.phase == "release":
            break
        env.advance(act.action)
    assert expert.obj_index == target and expert.robot == 0 and expert.phase == "release"
    goal = np.array(expert.goal_xy)
    assert not np.allclose(goal, (-0.08, 0.05))
    assert np.linalg.norm(goal - env.sim.object_positions()[blocker][:2]) > 0.08
    assert env.sim.object_aabb(target)[0][2] < TABLE_TOP_Z + 0.02


def test_grasp_lines_avoid_a_neighbour_and_cross_a_knocked_over_can(env):
    from divla_eval.tasks.pick_place_expert import PickPlaceExpert

    env.reset(options={"episode": _spec(11)})
    can, wrapper = (
        next(i for i, it in enumerate(env.episode.items) if it.id == k) for k in ("can-soda", "wrapper-red")
    )
    for i in range(len(env.episode.items)):
        _put(env, i, (0.15, 0.3 - 0.15 * i))  # far apart

    def yaw(i):
        return PickPlaceExpert(obj_index=i, goal_xy=(0, 0), release_z=1.0)._grasp_target(env.sim)[1]

    _put(env, wrapper, (-0.1, 0.0))  # its short side (local y) along the world's y
    assert abs(np.cos(yaw(wrapper))) == pytest.approx(0, abs=0.05)
    _put(env, can, (-0.1, -0.07))  # a can on that line: close on the wrapper lengthwise instead
    assert abs(np.sin(yaw(wrapper))) == pytest.approx(0, abs=0.05)
    # the can knocked over, lying along y: close across it (along x), whatever the neighbours
    env.sim.sim.data.set_joint_qpos(
        env.sim.scene.objects[can].joints[0], np.array([-0.1, -0.2, TABLE_TOP_Z + 0.03, 0.7071, 0.7071, 0, 0])
    )
    env.sim.sim.forward()
    assert abs(np.sin(yaw(can))) == pytest.approx(0, abs=0.05)


def test_hand_over_waits_for_room_and_footprints_are_capsules():
    """No free hand-over point: the object waits (None) unless it is the last one; a fork's
    footprint is a thin capsule, so a cup 4 cm beside its handle is clear of it but not on it."""
    from divla_eval.tasks.bussing import BussingEpisode, _footprint, _gap

    class Scene:  # axis-aligned boxes (centre x, y, half extent x, y)
        def __init__(self, boxes):
            self.boxes = np.array(boxes, dtype=float)

        def object_positions(self):
            return np.c_[self.boxes[:, :2], np.full(len(self.boxes), 0.82)]

        def object_corners(self, j):
            x, y, hx, hy = self.boxes[j]
            return np.array([[x + sx * hx, y + sy * hy, 0.82] for sx in (-1, 1) for sy in (-1, 1)])

        def object_rotation(self, j):
            return np.eye(3)

    fork, cup = (-0.1, 0.0, 0.07, 0.008), (-0.1, 0.04 + 0.008 + 0.022, 0.022, 0.022)
    scene = Scene([fork, cup])
    assert _gap(_footprint(scene, 0), _footprint(scene, 1)) == pytest.approx(0.04, abs=1e-6)
    assert _footprint(scene, 0).radius == pytest.approx(0.008)
    ep = BussingEpisode(_spec(2))
    # a cup on every hand-over point of the left side: the fork (on the right) has nowhere to go
    crowd = [(x, y, 0.022, 0.022) for x in (-0.13, -0.08, -0.03) for y in (0.05, 0.09)]
    scene = Scene([(-0.1, -0.06, 0.07, 0.008), *crowd])
    ep.items = ep.items[:1] * len(scene.boxes)
    assert ep._handover_point(scene, 0, side=1.0, last=False) is None
    assert ep._handover_point(scene, 0, side=1.0, last=True) is not None
    scene = Scene([(-0.1, -0.06, 0.07, 0.008), (-0.08, 0.2, 0.022, 0.022)])  # room: the first point
    ep.items = ep.items[:1] * len(scene.boxes)
    assert np.allclose(ep._handover_point(scene, 0, side=1.0, last=False), (-0.08, 0.05))


def test_a_scene_that_does_not_fit_at_the_first_draw_is_drawn_again():
    # with the collection seed 1000, scene 133 drops the plate where the fork then never fits: robosuite's
    # sampler alone raised RandomizationError and the demo was lost; the whole-scene redraw places it,
    # the same way every time
    e = make_env(task="bussing", split="seen", cameras=(), run_seed=1000)
    try:
        positions = []
        for _ in range(2):
            e.reset(options={"episode_index": 133})
            assert "fork-silver" in e.episode.object_ids and "plate-white" in e.episode.object_ids
            positions.append(e.sim.object_positions())
        np.testing.assert_array_equal(positions[0], positions[1])
        assert np.all(np.abs(positions[0][:, 2] - TABLE_TOP_Z) < 0.1)
    finally:
        e.close()
