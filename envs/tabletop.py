"""A robosuite table-top scene whose contents are handed in by a task.

Why a subclass of robosuite's ManipulationEnv and not a hand-written MuJoCo model: the Panda model,
its gripper, the OSC controller, the table arena, object models and placement samplers are robosuite's,
so their behaviour matches what other robosuite benchmarks report.

What this layer adds:
- the scene (movable objects, fixtures such as a basket, a placement sampler) comes from a
  `SceneBuilder` that a task provides; the model is rebuilt only when the builder's `key` changes
  (`hard_reset` on demand), otherwise resets are soft (no XML recompilation);
- robosuite never renders (`use_camera_obs=False`): images are drawn on demand by
  `divla_eval.envs.rendering.CameraRenderer`, so an episode that consumes no image renders nothing;
- every source of randomness at reset (object placement, robot joint noise) is drawn from one seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from robosuite.controllers import load_composite_controller_config
from robosuite.environments.manipulation.manipulation_env import ManipulationEnv
from robosuite.models.arenas import TableArena
from robosuite.models.objects import MujocoObject
from robosuite.models.tasks import ManipulationTask
from robosuite.utils.errors import RandomizationError
from robosuite.utils.placement_samplers import ObjectPositionSampler

from divla_eval.envs.layout import (
    BIMANUAL_Y_OFFSETS,
    CONTROL_FREQ,
    FRONT_CAMERA,
    FRONT_CAMERA_POS,
    FRONT_CAMERA_QUAT,
    TABLE_FULL_SIZE,
    TABLE_OFFSET,
)
from divla_eval.envs.perturbations import MAIN_LIGHT
from divla_eval.envs.rendering import lighten_robot_meshes

PLACEMENT_ATTEMPTS = 20
"""Draws of a whole scene before a reset gives up (each draw already tries every object 5000 times)."""


@dataclass
class SceneModel:
    """What a task's builder returns: robosuite objects and how to place them."""

    objects: list[MujocoObject]
    """Free-jointed objects, placed by `placement` at every reset."""
    fixtures: list[MujocoObject] = field(default_factory=list)
    """Static objects (no joint) at the positions given in `fixture_positions`."""
    fixture_positions: list[tuple[float, float, float]] = field(default_factory=list)
    placement: ObjectPositionSampler | None = None


class SceneBuilder(Protocol):
    """Builds the task-specific part of the MuJoCo model."""

    key: str
    """Identifies the model: equal keys must build identical models (soft reset is then enough)."""

    def build(self) -> SceneModel: ...


class TabletopEnv(ManipulationEnv):
    """One Panda (or two side by side) at a table with task-provided objects; OSC end-effector control.

    The action per arm is robosuite's OSC_POSE delta (dx, dy, dz, dax, day, daz) in [-1, 1] plus the
    gripper command (-1 open, +1 close); with two arms the two 7-D actions are concatenated (robot 0,
    on the right as seen from the robots, first). Methods that concern one arm take `robot` (default 0).
    """

    def __init__(self, builder: SceneBuilder, robots: tuple[str, ...] = ("Panda",), horizon: int = 400):
        self.builder = builder
        self._built_key: str | None = None
        self.scene: SceneModel | None = None
        controllers = [load_composite_controller_config(controller="BASIC", robot=r) for r in robots]
        super().__init__(
            robots=list(robots),
            env_configuration="default" if len(robots) == 1 else "parallel",
            controller_configs=controllers if len(robots) > 1 else controllers[0],
            initialization_noise={"magnitude": 0.02, "type": "gaussian"},
            use_camera_obs=False,
            has_renderer=False,
            has_offscreen_renderer=False,
            control_freq=CONTROL_FREQ,
            horizon=horizon,
            ignore_done=True,
            hard_reset=False,
            camera_names=[],
            renderer="mujoco",
        )

    # --- robosuite hooks -------------------------------------------------------------------------
    def _load_model(self):
        super()._load_model()
        offsets = (0.0,) if len(self.robots) == 1 else BIMANUAL_Y_OFFSETS
        for robot, offset in zip(self.robots, offsets, strict=True):
            model = robot.robot_model
            model.set_base_xpos(
                np.array(model.base_xpos_offset["table"](TABLE_FULL_SIZE[0])) + (0, offset, 0)
            )
        arena = TableArena(table_full_size=TABLE_FULL_SIZE, table_offset=TABLE_OFFSET, has_legs=False)
        arena.set_origin([0, 0, 0])
        arena.worldbody.find("light").set("name", MAIN_LIGHT)  # so perturbations can address it
        # A static camera in front of the table, looking down at the whole workspace and the robot.
        arena.set_camera(camera_name=FRONT_CAMERA, pos=FRONT_CAMERA_POS, quat=FRONT_CAMERA_QUAT)
        self.scene = self.builder.build()
        for fixture, pos in zip(self.scene.fixtures, self.scene.fixture_positions, strict=True):
            root = fixture.get_obj()
            for joint in root.findall("joint"):
                root.remove(joint)
            root.set("pos", " ".join(f"{v:.5f}" for v in pos))
        self.model = ManipulationTask(
            mujoco_arena=arena,
            mujoco_robots=[robot.robot_model for robot in self.robots],
            mujoco_objects=[*self.scene.fixtures, *self.scene.objects],
        )
        self._built_key = self.builder.key

    def _initialize_sim(self, xml_string=None):
        super()._initialize_sim(lighten_robot_meshes(xml_string or self.model.get_xml()))

    def _setup_references(self):
        super()._setup_references()
        sim = self.sim
        self.object_body_ids = [sim.model.body_name2id(o.root_body) for o in self.scene.objects]
        self.object_joint_addrs = [sim.model.get_joint_qpos_addr(o.joints[0]) for o in self.scene.objects]

    def _reset_internal(self):
        super()._reset_internal()
        if self.scene.placement is not None:
            for sampler in getattr(self.scene.placement, "samplers", {}).values():
                sampler.rng = self.rng
            self.scene.placement.rng = self.rng
            placements = self._sample_placements()
            for pos, quat, obj in placements.values():
                self.sim.data.set_joint_qpos(
                    obj.joints[0], np.concatenate([np.asarray(pos), np.asarray(quat)])
                )

    def _sample_placements(self) -> dict:
        """Place the whole scene, drawing every object again when one does not fit.

        robosuite's sampler retries only the object that fails, with the ones before it fixed: a plate
        dropped in the middle of a small region can leave no room for a long fork however often the
        fork is drawn (5 of 300 bussing scenes failed so). A fresh draw of all objects fits at once.
        The retries draw from the same seeded RNG, so a scene stays a function of its seed, and scenes
        that fitted at the first draw are exactly as before.
        """
        for _ in range(PLACEMENT_ATTEMPTS - 1):
            try:
                return self.scene.placement.sample()
            except RandomizationError:
                pass
        return self.scene.placement.sample()  # the last failure reaches the caller

    def reward(self, action=None):  # success is judged by the task, not by robosuite's reward
        return 0.0

    # --- our API ---------------------------------------------------------------------------------
    def reset_scene(self, builder: SceneBuilder, seed: int) -> None:
        """Reset to `builder`'s scene with all randomness drawn from `seed`.

        The MuJoCo model is recompiled only when the builder's key differs from the loaded one.
        """
        self.builder = builder
        self.rng = np.random.default_rng(seed)
        self.hard_reset = builder.key != self._built_key
        self.reset()
        self.hard_reset = False

    def object_positions(self) -> np.ndarray:
        return np.array([self.sim.data.body_xpos[i] for i in self.object_body_ids])

    def object_quats(self) -> np.ndarray:
        return np.array([self.sim.data.body_xquat[i] for i in self.object_body_ids])

    def object_position(self, obj_index: int) -> np.ndarray:
        """The object's body origin in the world frame."""
        return np.array(self.sim.data.body_xpos[self.object_body_ids[obj_index]])

    def object_rotation(self, obj_index: int) -> np.ndarray:
        """The object's 3x3 rotation matrix (its axes as columns, in the world frame)."""
        return np.array(self.sim.data.body_xmat[self.object_body_ids[obj_index]]).reshape(3, 3)

    @property
    def eef_pos(self) -> np.ndarray:
        return self.eef_pos_of(0)

    def eef_pos_of(self, robot: int) -> np.ndarray:
        return np.array(self.sim.data.site_xpos[self.robots[robot].eef_site_id["right"]])

    def gripper_opening(self, robot: int = 0) -> float:
        """Finger joint positions summed: ~0.08 fully open, ~0 closed on nothing."""
        idx = self.robots[robot]._ref_gripper_joint_pos_indexes["right"]
        return float(np.sum(np.abs(self.sim.data.qpos[idx])))

    def grasping(self, obj_index: int, robot: int | None = None) -> bool:
        """Is the object held by `robot`'s gripper (by any arm's when None)?"""
        arms = range(len(self.robots)) if robot is None else [robot]
        obj = self.scene.objects[obj_index]
        return any(self._check_grasp(gripper=self.robots[r].gripper["right"], object_geoms=obj) for r in arms)

    def object_geom_ids(self, obj_index: int) -> list[int]:
        return [self.sim.model.geom_name2id(g) for g in self.scene.objects[obj_index].contact_geoms]

    def object_aabb(self, obj_index: int) -> tuple[np.ndarray, np.ndarray]:
        """World-frame (min, max) corners of the object's collision geoms."""
        pts = self.object_corners(obj_index)
        return pts.min(axis=0), pts.max(axis=0)

    def object_corners(self, obj_index: int) -> np.ndarray:
        """World positions of the corners of each collision geom's local bounding box."""
        m, d = self.sim.model._model, self.sim.data._data
        corners = []
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        for g in self.object_geom_ids(obj_index):
            center, half = m.geom_aabb[g, :3], m.geom_aabb[g, 3:]
            local = center + signs * half
            corners.append(d.geom_xpos[g] + local @ d.geom_xmat[g].reshape(3, 3).T)
        return np.concatenate(corners)

    def object_velocity(self, obj_index: int) -> np.ndarray:
        """Linear velocity (world frame) of the object's free joint."""
        jnt = self.sim.model.joint_name2id(self.scene.objects[obj_index].joints[0])
        adr = self.sim.model._model.jnt_dofadr[jnt]
        return np.array(self.sim.data.qvel[adr : adr + 3])

    def finger_axis(self, robot: int = 0) -> np.ndarray:
        """Unit xy vector from the right to the left finger pad: the direction the gripper closes along."""
        gripper = self.robots[robot].gripper["right"]
        names = gripper.important_geoms
        left = self.sim.data.geom_xpos[self.sim.model.geom_name2id(names["left_fingerpad"][0])]
        right = self.sim.data.geom_xpos[self.sim.model.geom_name2id(names["right_fingerpad"][0])]
        v = (left - right)[:2]
        return v / (np.linalg.norm(v) + 1e-9)

    def wrist_joint(self, robot: int = 0) -> tuple[float, float, float, float]:
        """The last arm joint (it turns the gripper about its own axis): position, lower and upper
        limit, and the sign of its world axis' z component, which says whether turning it positively
        turns the fingers' yaw positively (+1) or negatively (-1)."""
        r = self.robots[robot]
        joint = r._ref_joint_indexes[-1]
        q = float(self.sim.data.qpos[r._ref_joint_pos_indexes[-1]])
        lo, hi = self.sim.model.jnt_range[joint]
        body = self.sim.model.jnt_bodyid[joint]
        axis = np.array(self.sim.data.body_xmat[body]).reshape(3, 3) @ self.sim.model.jnt_axis[joint]
        return q, float(lo), float(hi), float(np.sign(axis[2]) or 1.0)

    def eef_rotation(self, robot: int = 0) -> np.ndarray:
        return np.array(self.sim.data.site_xmat[self.robots[robot].eef_site_id["right"]].reshape(3, 3))

    def proprio(self) -> np.ndarray:
        """Per arm: end-effector position (3), orientation as the first two columns of its rotation
        matrix (6), gripper finger positions (2).

        Not a quaternion: q and -q are the same orientation, and a top-down gripper sits right where
        the sign flips, so a quaternion jumps between +-1 from one step to the next. The 6-D
        representation (Zhou et al., CVPR 2019) is continuous, which a learned policy needs.
        """
        parts = []
        for robot in self.robots:
            site = robot.eef_site_id["right"]
            rot = self.sim.data.site_xmat[site].reshape(3, 3)
            fingers = self.sim.data.qpos[robot._ref_gripper_joint_pos_indexes["right"]]
            parts += [self.sim.data.site_xpos[site], rot[:, 0], rot[:, 1], fingers]
        return np.concatenate(parts).astype(np.float32)
