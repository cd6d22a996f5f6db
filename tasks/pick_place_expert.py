"""A privileged top-down pick-and-place controller shared by the tasks' scripted experts.

It reads the simulator state (object pose, extents and grasp hint) and drives robosuite's OSC_POSE
delta controller through phases: align above the object, descend, close, lift, carry above the goal,
lower, open, retreat. Each phase change is where the reasoning phrase changes. A failed grasp (the
object is not between the fingers after lifting) sends it back to the first phase, at most
`max_retries` times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from divla_eval.envs.layout import TABLE_TOP_Z

POS_SCALE = 0.05  # metres per unit action (robosuite OSC_POSE default output_max)
ROT_SCALE = 0.5  # radians per unit action
SAFE_Z = TABLE_TOP_Z + 0.20
FINGER_DEPTH = 0.025  # how far below an object's top the finger pads may reach
TILT_OK = 0.1  # radians of gripper tilt at which `steady` starts to slow translation
CLEAR = 0.06  # metres between a neighbour's centre and the closing line that keep the hand clear of it
WRIST_MARGIN = 0.25  # radians kept clear of the wrist joint's limits when choosing a grasp yaw


def _wrap(a: float) -> float:
    return (a + np.pi) % (2 * np.pi) - np.pi


def _yaw(direction: np.ndarray) -> float:
    """The angle of a horizontal direction (x, y, ...) about the world z axis."""
    return float(np.arctan2(direction[1], direction[0]))


@dataclass
class PickPlaceExpert:
    obj_index: int
    goal_xy: tuple[float, float]
    release_z: float
    """Height of the gripper when it opens above the goal."""
    max_retries: int = 2
    robot: int = 0
    """Which arm (bimanual scenes have two)."""
    carry_gain: float = 1.5
    via_xy: tuple[float, float] | None = None
    """A point to carry the object over first (at the safe height): a straight line across the table
    can drive an arm through an outstretched, singular pose where it stalls."""
    settle_steps: int = 0
    """Steps to hold still at the release height before opening, so a swinging object calms down."""
    carry_max: float = 1.0
    """Largest carry action per axis (1 is the controller's full speed); light, tall objects such as
    cups slip out of the fingers when swung at full speed."""
    regrasp_on_slip: bool = False
    """Go back and grasp again when the object leaves the fingers during the carry, instead of
    carrying an empty hand to the goal."""
    centre_object: bool = False
    """Put the object's centre, not the hand, over the goal. A long or hollow object held off its
    centre (a fork by its handle, a cup by its rim) otherwise lands beside a small receptacle."""
    steady: bool = False
    """Lift straight up from the grasp point at the carry speed, correct the gripper's tilt with
    gain 1 instead of 2, and slow the hand's translation while the gripper is tilted. An arm that had
    reached across the table, close to its base, tilted as the lift began; the doubled rotation
    command saturated and the controller swung the arm into a straight-elbow pose from which the
    carry went astray (bussing, task version 2; traced on seen episodes 6, 9 and 31). With gain 1 the
    arm still tilts (up to ~25 degrees) but comes back."""
    set_down: float | None = None
    """Release this far above the height the fingers closed at, instead of at `release_z`: the object
    is set down on the table rather than dropped. A fork dropped from 5 cm at a bussing hand-over
    point bounced off a cup, landed on its side and could not be grasped again (seen episode 4)."""
    phase: str = "approach"
    retries: int = 0
    _phase_steps: int = 0
    _grasp_yaw: float | None = None
    _close_at: np.ndarray | None = None
    _low_since: int | None = None
    _via_passed: bool = False
    _hold_offset: np.ndarray | None = None
    _carry_gap: float | None = None

    @property
    def done(self) -> bool:
        return self.phase == "done"

    # --- geometry ---------------------------------------------------------------------------------
    def _grasp_target(self, env) -> tuple[np.ndarray, float]:
        """World grasp point and the gripper yaw that closes the fingers along the object's grasp axis."""
        obj = env.scene.objects[self.obj_index]
        hint = obj.grasp_hint
        rot = env.object_rotation(self.obj_index)
        pos = env.object_position(self.obj_index) + rot @ np.asarray(hint.offset)
        corners = env.object_corners(self.obj_index)
        hi = corners.max(axis=0)
        z = max(pos[2], hi[2] - FINGER_DEPTH, TABLE_TOP_Z + 0.012)
        axis = hint.close_axis
        if axis == "free":
            if abs(rot[2, 2]) < 0.7:  # a round object knocked over: close across its length, whose
                # ends otherwise wedge between the open fingers (an 8 cm can lying along the closing
                # line stayed in the opened gripper and was carried off; bussing mixed episode 43)
                return np.array([pos[0], pos[1], z]), float(np.arctan2(rot[0, 2], -rot[1, 2]))
            return np.array([pos[0], pos[1], z]), self._clear_yaw(env, pos)
        if axis is None:  # close along the shorter horizontal extent of the object (in its own frame)
            ext = np.ptp((corners - pos) @ rot, axis=0)
            axis = "x" if ext[0] < ext[1] else "y"
        close_dir = rot[:2, 0 if axis == "x" else 1]
        yaw = _yaw(close_dir)
        if hint.fallback_axis is not None:
            alt_dir = rot[:2, 0 if hint.fallback_axis == "x" else 1]
            alt = _yaw(alt_dir)
            clear, alt_clear = self._clearance(env, pos, np.array([yaw, alt]))
            if clear < CLEAR and alt_clear > clear:
                yaw = alt
        return np.array([pos[0], pos[1], z]), yaw

    def _clearance(self, env, pos: np.ndarray, yaws: np.ndarray) -> np.ndarray:
        """For each closing direction, the smallest sideways distance of a neighbour (within 15 cm)
        from the closing line through `pos`; inf where no neighbour is that close."""
        others = np.delete(env.object_positions(), self.obj_index, axis=0)[:, :2] - pos[:2]
        others = others[np.linalg.norm(others, axis=1) < 0.15]
        if len(others) == 0:
            return np.full(len(yaws), np.inf)
        normals = np.stack([-np.sin(yaws), np.cos(yaws)], axis=1)
        return np.min(np.abs(others @ normals.T), axis=0)

    def _clear_yaw(self, env, pos: np.ndarray) -> float:
        """A closing direction that keeps the hand clear of the other objects nearby, turning the
        wrist as little as possible.

        The hand and open fingers span ~10 cm each way along the closing direction; a tall neighbour
        8 cm away on that line stopped the descent 2.5 cm above a plate six times in a row (bussing
        mixed episode 1). So each direction's clearance is the smallest sideways distance of a
        neighbour from that line; among the directions clear by CLEAR (or the clearest, if none is),
        take the one nearest the fingers' current axis: a needless half turn of the wrist while
        reaching across the table contorted the arm and sent it 20 cm off course (bussing mixed
        episode 26, task version 4)."""
        axis = env.finger_axis(self.robot)
        current = _yaw(axis)
        yaws = current + np.radians(np.arange(-90, 90, 15))  # the fingers are symmetric: half a turn
        clearance = self._clearance(env, pos, yaws)
        ok = clearance >= min(CLEAR, clearance.max())
        return float(yaws[ok][np.argmin(np.abs(yaws[ok] - current))])

    def _action(
        self, env, target: np.ndarray, yaw: float | None, grip: float, gain: float = 1.0
    ) -> np.ndarray:
        act = np.zeros(7)
        act[:3] = np.clip(gain * (target - env.eef_pos_of(self.robot)) / POS_SCALE, -1, 1)
        # Keep the gripper pointing straight down; rotate about z so the fingers close along `yaw`.
        rot = env.eef_rotation(self.robot)
        down_err = np.cross(rot[:, 2], np.array([0.0, 0.0, -1.0]))
        act[3:5] = np.clip(down_err[:2] * (1.0 if self.steady else 2.0) / ROT_SCALE, -1, 1)
        if self.steady:
            tilt = float(np.arccos(np.clip(-rot[2, 2], -1.0, 1.0)))
            act[:3] *= min(1.0, TILT_OK / max(tilt, 1e-6))
        if yaw is not None:
            axis = env.finger_axis(self.robot)
            err = _wrap(yaw - _yaw(axis))
            # The fingers are symmetric, so `yaw` and `yaw + pi` grasp alike: take the smaller turn
            # unless it would drive the wrist joint into its limit (then the arm stalls short of the
            # object, seen in bussing after an arm's wrist had wound up on earlier objects).
            q, lo, hi, sign = env.wrist_joint(self.robot)
            turns = sorted((err, _wrap(err + np.pi)), key=abs)
            err = next((t for t in turns if lo + WRIST_MARGIN < q + sign * t < hi - WRIST_MARGIN), turns[0])
            act[5] = np.clip(err / ROT_SCALE, -1, 1)
        act[6] = grip
        return act

    def _release_height(self) -> float:
        if self.set_down is None or self._close_at is None:
            return self.release_z
        return float(self._close_at[2] + self.set_down)

    def _next(self, phase: str) -> None:
        self.phase, self._phase_steps, self._low_since = phase, 0, None

    def _slipping(self, env) -> bool:
        """Has the object moved away from the hand since the carry began? (Distance, not finger
        contacts: a held object touches one pad only now and then while it swings.)"""
        gap = float(np.linalg.norm(env.object_positions()[self.obj_index] - env.eef_pos_of(self.robot)))
        if self._carry_gap is None:
            self._carry_gap = gap
        return gap > self._carry_gap + 0.05

    def _slipped(self, env) -> np.ndarray:
        """The object fell out during the carry: grasp it again where it lies (counts as a retry)."""
        if self.retries < self.max_retries:
            self.retries += 1
            self._via_passed, self._carry_gap = False, None
            self._next("approach")
        else:
            self._next("done")
        return self._action(env, env.eef_pos_of(self.robot), None, -1.0)

    def _goal(self, env, measure: bool = False) -> np.ndarray:
        """Where the hand goes above the goal: the goal itself, or with `centre_object` the goal
        shifted by the object's offset in the hand (measured on entering carry and lower, then held,
        so a swinging object does not make the target chase it)."""
        goal = np.array(self.goal_xy, dtype=float)
        if not self.centre_object:
            return goal
        if measure or self._hold_offset is None:
            obj = env.object_positions()[self.obj_index][:2]
            self._hold_offset = np.asarray(obj) - env.eef_pos_of(self.robot)[:2]
        return goal - self._hold_offset

    # --- the state machine --------------------------------------------------------------------------
    def act(self, env) -> np.ndarray:
        self._phase_steps += 1
        eef = env.eef_pos_of(self.robot)
        grasp, yaw = self._grasp_target(env)
        if self.phase == "approach":
            self._grasp_yaw = yaw
            above = grasp + np.array([0, 0, 0.10])
            a = self._action(env, above, yaw, -1.0)
            axis = env.finger_axis(self.robot)
            yaw_err = abs(_wrap(2 * (yaw - _yaw(axis)))) / 2
            if (np.linalg.norm(above - eef) < 0.015 and yaw_err < 0.05) or self._phase_steps > 80:
                self._next("descend")
            return a
        if self.phase == "descend":
            a = self._action(env, grasp, self._grasp_yaw, -1.0)
            if np.linalg.norm(grasp - eef) < 0.008 or self._phase_steps > 50:
                self._close_at = grasp  # hold this point while closing: chasing a pushed object drags it
                self._next("close")
            return a
        if self.phase == "close":
            a = self._action(env, self._close_at, None, 1.0)
            if self._phase_steps > 15:
                self._next("lift")
            return a
        if self.phase == "lift":
            # straight up from where the fingers closed (with `steady`; otherwise from wherever the
            # hand is, which lets a drift during the lift go uncorrected)
            xy = self._close_at[:2] if self.steady else eef[:2]
            target = np.array([xy[0], xy[1], SAFE_Z])
            # start the lift gently so the grasped object does not slip out of the fingers
            a = self._action(env, target, None, 1.0, gain=0.3 if self._phase_steps < 10 else 1.0)
            if self.steady:
                a[:3] = np.clip(a[:3], -self.carry_max, self.carry_max)
            if eef[2] > SAFE_Z - 0.03 or self._phase_steps > 40:
                if env.grasping(self.obj_index, self.robot):
                    self._next("carry")
                elif self.retries < self.max_retries:
                    self.retries += 1
                    self._next("approach")
                else:
                    self._next("done")
            return a
        if self.phase == "carry":
            first_leg = self.via_xy is not None and not self._via_passed
            if first_leg:
                target = np.array([self.via_xy[0], self.via_xy[1], SAFE_Z])
                if np.linalg.norm((target - eef)[:2]) < 0.03 or self._phase_steps > 80:
                    self._via_passed, self._phase_steps = True, 0
            else:
                target = np.array([*self._goal(env, measure=self._phase_steps == 1), SAFE_Z])
            if self.regrasp_on_slip and self._slipping(env):
                return self._slipped(env)
            a = self._action(env, target, None, 1.0, gain=self.carry_gain)
            a[:3] = np.clip(a[:3], -self.carry_max, self.carry_max)
            if not first_leg and (np.linalg.norm((target - eef)[:2]) < 0.02 or self._phase_steps > 80):
                self._next("lower")
            return a
        if self.phase == "lower":
            target = np.array([*self._goal(env, measure=self._phase_steps == 1), self._release_height()])
            a = self._action(env, target, None, 1.0)
            if abs(target[2] - eef[2]) < 0.015 and self._low_since is None:
                self._low_since = self._phase_steps
            settled = self._low_since is not None and self._phase_steps - self._low_since >= self.settle_steps
            if settled or self._phase_steps > 40 + self.settle_steps:
                self._next("release")
            return a
        if self.phase == "release":
            a = self._action(env, np.array([*self._goal(env), self._release_height()]), None, -1.0)
            if self._phase_steps > 10:
                self._next("retreat")
            return a
        if self.phase == "retreat":
            target = np.array([*self._goal(env), SAFE_Z])
            if self._phase_steps > 20:
                self._next("done")
            return self._action(env, target, None, -1.0)
        return self._action(env, eef, None, -1.0)  # done: hold still, gripper open
