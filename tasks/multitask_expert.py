"""Privileged scripted controllers for multitask, beside the shared `PickPlaceExpert`.

`FlipExpert` sets a pot lying on its side upright (flip_pot). The pot lies with its opening towards
the robot and its flat handle pointing up. A top-down pinch on the handle, fingers closing across it,
is the grasp the shared top-down controller already does well; the flip is then one 90-degree turn of
the wrist about the finger axis, which swings the pot's base down. Turning that way leaves the gripper
pointing back at the robot: that is the direction the Panda's sixth joint has room for when the hand
starts pointing down near the table (turning the other way runs it into its upper limit). The turn is
made at a fixed point close to the robot (`FLIP_XY`), since a gripper pointing back with the wrist far
out is beyond the arm's reach. Then the pot is lowered until its base nearly touches the table,
released, and the open fingers slide off the handle.

`PrecisePickPlace` is the shared controller with a tighter alignment before it descends (the cup).

Unlike `PickPlaceExpert`, `FlipExpert` steers the full gripper orientation (a rotation-vector error
in the world frame, the frame of robosuite's OSC delta rotation for a robot whose base is not rotated).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from divla_eval.envs.layout import TABLE_TOP_Z
from divla_eval.tasks.pick_place_expert import POS_SCALE, ROT_SCALE, PickPlaceExpert

LIFT_Z = TABLE_TOP_Z + 0.27  # high enough that the pot swinging below the wrist clears the table
FLIP_XY = (-0.1, 0.15)  # where the wrist turns: this x, and y clipped to +- this
RELEASE_GAP = 0.012  # pot base above the table when the fingers open
GRASP_BELOW_TOP = 0.012  # grasp this far below the handle's outer end
MAX_ROT_STEP = 0.25  # radians per control step while turning


class PrecisePickPlace(PickPlaceExpert):
    """`PickPlaceExpert` that starts descending only once the gripper is within `xy_tol` of the grasp
    point horizontally. The shared controller accepts 1.5 cm, more than the ~1.2 cm a 5.6 cm cup leaves
    between it and an open finger: a finger then lands on the rim and tips the cup over."""

    xy_tol: float = 0.005

    def act(self, env) -> np.ndarray:
        was, steps = self.phase, self._phase_steps
        action = super().act(env)
        if was == "approach" and self.phase == "descend" and steps < 80:
            grasp, _ = self._grasp_target(env)
            if np.linalg.norm((grasp - env.eef_pos)[:2]) > self.xy_tol:
                self.phase, self._phase_steps = "approach", steps + 1
        return action


def _rotvec(rot: np.ndarray) -> np.ndarray:
    """Rotation vector (axis * angle) of a rotation matrix."""
    import mujoco

    q = np.zeros(4)
    mujoco.mju_mat2Quat(q, np.asarray(rot, dtype=float).flatten())
    if q[0] < 0:
        q = -q
    s = np.linalg.norm(q[1:])
    if s < 1e-9:
        return np.zeros(3)
    return q[1:] / s * 2 * np.arctan2(s, q[0])


def _axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    import mujoco

    q, out = np.zeros(4), np.zeros(9)
    mujoco.mju_axisAngle2Quat(q, np.asarray(axis, dtype=float), float(angle))
    mujoco.mju_quat2Mat(out, q)
    return out.reshape(3, 3)


@dataclass
class FlipExpert:
    obj_index: int
    handle_half: tuple[float, float, float]
    """Half sizes of the pot's handle: outward (the pot's x), thickness, along the pot's axis."""
    max_retries: int = 2
    phase: str = "approach"
    retries: int = 0
    _phase_steps: int = 0
    _grasp_rot: np.ndarray | None = None
    _goal_rot: np.ndarray | None = None
    _hold: np.ndarray | None = None
    _forward: np.ndarray | None = None

    @property
    def done(self) -> bool:
        return self.phase == "done"

    # --- geometry ----------------------------------------------------------------------------------
    def _pot(self, env) -> tuple[np.ndarray, np.ndarray]:
        return env.object_position(self.obj_index), env.object_rotation(self.obj_index)

    def _grasp_point(self, env) -> np.ndarray:
        """On the handle, GRASP_BELOW_TOP inside its outer end (the handle sticks out along the pot's x)."""
        pos, rot = self._pot(env)
        hint = env.scene.objects[self.obj_index].grasp_hint
        outward = self.handle_half[0] - GRASP_BELOW_TOP
        return pos + rot @ (np.asarray(hint.offset) + np.array([outward, 0.0, 0.0]))

    def _top_down_rotation(self, env, finger_dir: np.ndarray) -> np.ndarray:
        """Gripper pointing down with the fingers closing along `finger_dir` (the sign nearest now)."""
        cur = env.eef_rotation()
        x = np.array([finger_dir[0], finger_dir[1], 0.0])
        x /= np.linalg.norm(x) + 1e-9
        if x @ cur[:, 0] < 0:
            x = -x
        z = np.array([0.0, 0.0, -1.0])
        return np.column_stack([x, np.cross(z, x), z])

    def _action(self, env, target: np.ndarray, rot: np.ndarray, grip: float, gain: float = 1.0) -> np.ndarray:
        act = np.zeros(7)
        act[:3] = np.clip(gain * (target - env.eef_pos) / POS_SCALE, -1, 1)
        err = _rotvec(rot @ env.eef_rotation().T)
        norm = np.linalg.norm(err)
        if norm > MAX_ROT_STEP:
            err *= MAX_ROT_STEP / norm
        act[3:6] = np.clip(err / ROT_SCALE, -1, 1)
        act[6] = grip
        return act

    def _next(self, phase: str) -> None:
        self.phase, self._phase_steps = phase, 0

    # --- the state machine ---------------------------------------------------------------------------
    def act(self, env) -> np.ndarray:
        self._phase_steps += 1
        eef = env.eef_pos
        if self.phase in ("approach", "descend"):
            _, rot = self._pot(env)
            grasp = self._grasp_point(env)
            self._grasp_rot = self._top_down_rotation(env, rot[:, 1])  # across the handle
            if self.phase == "approach":
                above = grasp + np.array([0.0, 0.0, 0.10])
                a = self._action(env, above, self._grasp_rot, -1.0)
                aligned = np.linalg.norm(_rotvec(self._grasp_rot @ env.eef_rotation().T)) < 0.05
                if (np.linalg.norm(above - eef) < 0.015 and aligned) or self._phase_steps > 80:
                    self._next("descend")
                return a
            a = self._action(env, grasp, self._grasp_rot, -1.0)
            if np.linalg.norm(grasp - eef) < 0.008 or self._phase_steps > 50:
                self._hold = grasp
                self._next("close")
            return a
        if self.phase == "close":
            a = self._action(env, self._hold, self._grasp_rot, 1.0)
            if self._phase_steps > 15:
                self._next("lift")
            return a
        if self.phase == "lift":
            target = np.array([self._hold[0], self._hold[1], LIFT_Z])
            a = self._action(env, target, self._grasp_rot, 1.0, gain=0.3 if self._phase_steps < 10 else 1.0)
            settled = (
                abs(LIFT_Z - eef[2]) < 0.01 and np.linalg.norm(env.object_velocity(self.obj_index)) < 0.03
            )
            if settled or self._phase_steps > 60:
                if env.grasping(self.obj_index):
                    y = float(np.clip(eef[1], -FLIP_XY[1], FLIP_XY[1]))
                    self._hold = np.array([FLIP_XY[0], y, LIFT_Z])
                    self._next("carry")
                elif self.retries < self.max_retries:
                    self.retries += 1
                    self._next("approach")
                else:
                    self._next("done")
            return a
        if self.phase == "carry":
            a = self._action(env, self._hold, self._grasp_rot, 1.0)
            if np.linalg.norm(self._hold - eef) < 0.01 or self._phase_steps > 40:
                # Turn about the horizontal axis that brings the pot's axis (z) up, by the angle between.
                axis_z = self._pot(env)[1][:, 2]
                turn = np.cross(axis_z, [0.0, 0.0, 1.0])
                angle = float(np.arctan2(np.linalg.norm(turn), axis_z[2]))
                self._goal_rot = _axis_rotation(turn / np.linalg.norm(turn), angle) @ env.eef_rotation()
                self._forward = np.array([axis_z[0], axis_z[1], 0.0]) / np.linalg.norm(axis_z[:2])
                self._next("rotate")
            return a
        if self.phase == "rotate":
            a = self._action(env, self._hold, self._goal_rot, 1.0)
            err = np.linalg.norm(_rotvec(self._goal_rot @ env.eef_rotation().T))
            if (
                err < 0.03 and np.linalg.norm(env.object_velocity(self.obj_index)) < 0.05
            ) or self._phase_steps > 60:
                self._next("lower")
            return a
        if self.phase == "lower":
            low = env.object_aabb(self.obj_index)[0][2]
            target = np.array([self._hold[0], self._hold[1], eef[2] - (low - TABLE_TOP_Z - RELEASE_GAP)])
            a = self._action(env, target, self._goal_rot, 1.0, gain=0.7)
            if abs(low - TABLE_TOP_Z - RELEASE_GAP) < 0.004 or self._phase_steps > 50:
                self._hold = eef.copy()
                self._next("release")
            return a
        if self.phase == "release":
            a = self._action(env, self._hold, self._goal_rot, -1.0)
            if self._phase_steps > 10:
                self._next("retreat")
            return a
        if self.phase == "retreat":
            # Slide the open fingers off the handle, backwards along the gripper's pointing direction.
            target = self._hold - 0.09 * self._forward + np.array([0.0, 0.0, 0.01])
            a = self._action(env, target, self._goal_rot, -1.0)
            if np.linalg.norm(target - eef) < 0.015 or self._phase_steps > 30:
                self._hold = target
                self._next("raise")
            return a
        if self.phase == "raise":
            target = self._hold + np.array([0.0, 0.0, 0.1])
            if self._phase_steps > 20:
                self._next("done")
            return self._action(env, target, self._goal_rot, -1.0)
        rot = self._goal_rot if self._goal_rot is not None else env.eef_rotation()
        return self._action(env, eef, rot, -1.0)  # done: hold still, gripper open
