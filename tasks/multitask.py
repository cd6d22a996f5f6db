"""The paper's five real-robot Franka tasks (DiVLA paper, multi-task learning), one split each.

Description:
    Each split is one sub-task with a fixed instruction template; the variable words (colour, object
    name) come from the scene:

    - ``select_object``: four objects (cube, toy car, cylinder, ball, mug in four colours) lie on the
      table; "pick up the red cube" names one of them.
    - ``flip_pot``: a square pot with one flat side handle lies on its side, opening towards the robot
      and handle pointing up; "flip the pot upright".
    - ``cube_to_colour_box``: three open boxes of different colours and a cube;
      "put the cube into the blue box".
    - ``cup_on_plate``: a cup with a handle and a plate; "place the cup onto the plate".
    - ``cube_in_box``: one wooden box and a cube; "put the cube inside the box".

    Boxes and the plate are free bodies (heavy, so the arm does not shove them) rather than fixtures: their
    layout is then randomised by the placement at every reset, without recompiling the MuJoCo model.
    As in the paper's real-robot tasks, each sub-task but select_object always uses the same objects
    (yellow cube; red, green and blue boxes; red cup; slate plate; grey pot), so its model is compiled
    once per process: a model rebuild also costs a new renderer (~1 s here) when a policy consumes images.
Randomizations:
    From `EpisodeSpec.seed("objects")`: which four objects (of 5 categories x 4 colours) appear and which
    one is named (select_object: a new model each episode), which box is named (cube_to_colour_box).
    From the scene seed (placement at reset): positions and yaws of everything (the three boxes shuffled
    over three slots, so a colour is not tied to a place), and the robot's joint noise.
Success:
    - select_object: the named object's lowest point is more than 5 cm above the table and the gripper
      holds it.
    - flip_pot: the pot's axis is within 20 degrees of vertical (opening up), it moves slower than
      5 cm/s and the gripper no longer holds it, and at some step the gripper held the pot with its
      lowest point more than 5 cm above the table (version 2). Without that lift, pressing or nudging
      the lying pot could right it: the random policy did so in 4 of 100 episodes under version 1.
    - cube_to_colour_box / cube_in_box: the cube's centre is inside the named (the) box, between its
      inner walls and below its rim, it moves slower than 5 cm/s and is not held.
    - cup_on_plate: the cup stands upright (within 20 degrees) on the plate: its centre is within the
      plate's radius less 1 cm, its bottom within 1 cm above the plate's top, it moves slower than 5 cm/s
      and is not held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from divla_eval.envs.layout import TABLE_TOP_Z
from divla_eval.tasks.base import EpisodeSpec, Evaluation, ExpertAction, Task, TaskEpisode

SUBTASKS = ("select_object", "flip_pot", "cube_to_colour_box", "cup_on_plate", "cube_in_box")
#: Step budget per sub-task (20 Hz): the scripted expert's longest episode in 50 (75, 169, 154, 146,
#: 152 steps) with margin. The gym env asks for one `max_steps` before it knows the split, so the task's
#: is the largest; `MultiTask.max_steps_for` gives the per-split one for callers that know the split.
SUBTASK_MAX_STEPS = {
    "select_object": 150,
    "flip_pot": 300,
    "cube_to_colour_box": 250,
    "cup_on_plate": 250,
    "cube_in_box": 250,
}
DEFAULT_MAX_STEPS = max(SUBTASK_MAX_STEPS.values())
INSTRUCTIONS = {
    "select_object": "pick up the {target}",
    "flip_pot": "flip the pot upright",
    "cube_to_colour_box": "put the cube into the {colour} box",
    "cup_on_plate": "place the cup onto the plate",
    "cube_in_box": "put the cube inside the box",
}
FAILURE_MODES = {
    "select_object": ("no_grasp", "wrong_object", "dropped", "timeout"),
    "flip_pot": ("no_grasp", "dropped", "not_lifted", "not_upright", "timeout"),
    "cube_to_colour_box": ("no_grasp", "wrong_box", "outside_box", "dropped", "timeout"),
    "cup_on_plate": ("no_grasp", "tipped", "off_plate", "dropped", "timeout"),
    "cube_in_box": ("no_grasp", "outside_box", "dropped", "timeout"),
}

COLOURS = ("red", "green", "blue", "yellow")
BOX_COLOURS = ("red", "green", "blue")
CUBE_COLOUR = "yellow"
CUP_COLOUR = "red"
SELECT_CATEGORIES = ("cube", "toy car", "cylinder", "ball", "mug")
SELECT_COUNT = 4
LIFT_HEIGHT = 0.05
REST_SPEED = 0.05
UPRIGHT_COS = float(np.cos(np.radians(20.0)))
LIFTED_CLEARANCE = 0.05  # flip_pot: the held pot's lowest point above the table that counts as lifted

CUBE_HALF = 0.02
BOX_SIZE = (0.14, 0.14, 0.07)  # full outer size of an open box
BOX_WALL = 0.01
BOX_SLOTS_Y = (-0.2, 0.0, 0.2)
BOX_SLOT_X = 0.06
PLATE_RADIUS, PLATE_HALF_H = 0.08, 0.006
CUP_RADIUS, CUP_HALF_H, CUP_WALL = 0.028, 0.0375, 0.005
POT_HALF, POT_WALL, POT_BASE = 0.045, 0.008, 0.01  # square pot: outer half width = half height
POT_HANDLE = (0.0225, 0.01, 0.02)  # handle half sizes: outward, thickness, along the pot axis
POT_YAW = 0.5  # the pot's opening faces the robot, +- this many radians


# --- scene parts ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """One free body of a scene; its `id` names it in the builder key and in episode records."""

    kind: str
    """"cube", "box", "plate", "cup", "pot", or a select_object category."""
    colour: str | None = None

    @property
    def id(self) -> str:
        return f"mt-{self.kind.replace(' ', '_')}" + (f"-{self.colour}" if self.colour else "")

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}" if self.colour else self.kind


def _rgba(colour: str | None, default=(0.8, 0.8, 0.8, 1.0)):
    from divla_eval.envs.objects import COLOURS as PALETTE

    return PALETTE[colour] if colour else default


def _library_spec(part: Part):
    """select_object's objects reuse the library's builders (and their grasp hints), with fixed sizes."""
    from divla_eval.envs.objects import ObjectSpec

    category, dims = {
        "toy car": ("toy_car", (0.045, 0.022, 0.016, 0.012)),
        "cylinder": ("cylinder", (0.022, 0.035)),
        "ball": ("ball", (0.025,)),
        "mug": ("mug", (0.024, 0.035, 0.01)),
    }[part.kind]
    return ObjectSpec(
        id=part.id,
        split="multitask",
        category=category,
        name=part.name,
        kind="procedural",
        colour=part.colour,
        texture=None,
        size="medium",
        dims=dims,
        density=300.0,
    )


def _ring(radius: float, wall: float, half_h: float, z: float, n: int = 8):
    """Sizes, locations and quats of `n` boxes forming a polygonal tube (a cup's wall)."""
    half_w = (radius - wall / 2) * np.tan(np.pi / n) + 0.001
    sizes, locs, quats = [], [], []
    for k in range(n):
        a = 2 * np.pi * k / n
        sizes.append((wall / 2, half_w, half_h))
        locs.append(((radius - wall / 2) * np.cos(a), (radius - wall / 2) * np.sin(a), z))
        quats.append((np.cos(a / 2), 0.0, 0.0, np.sin(a / 2)))
    return sizes, locs, quats


def _build_cup(part: Part, sim_name: str):
    from robosuite.models.objects.generated_objects import CompositeObject

    from divla_eval.envs._builders import GraspHint

    base_h = 0.003
    sizes, locs, quats = _ring(CUP_RADIUS, CUP_WALL, CUP_HALF_H - base_h, base_h)
    handle = (0.012, 0.004, 0.02)
    obj = CompositeObject(
        name=sim_name,
        total_size=(CUP_RADIUS + 2 * handle[0], CUP_RADIUS, CUP_HALF_H),
        geom_types=["cylinder", *["box"] * len(sizes), "box"],
        geom_sizes=[(CUP_RADIUS - 0.002, base_h), *sizes, handle],
        geom_locations=[(0, 0, -CUP_HALF_H + base_h), *locs, (CUP_RADIUS + handle[0], 0, 0.004)],
        geom_quats=[None, *quats, None],
        geom_rgbas=[_rgba(part.colour)] * (len(sizes) + 2),
        geom_frictions=[(1.0, 0.005, 0.0001)] * (len(sizes) + 2),
        density=400.0,
        locations_relative_to_center=True,
        joints="default",
    )
    obj.grasp_hint = GraspHint(close_axis="y")  # across the body, fingers clear of the handle
    return obj


def _build_pot(part: Part, sim_name: str):
    """An open square pot (square, so that lying on its side it does not roll) with one flat handle on
    its +x wall, at the height of the pot's centre of mass so that the pot hangs level from it. The
    handle gets torsional friction (condim 4), like a rubber grip: the flip turns the wrist about the
    finger axis, the one rotation a pinch resists only by friction. Box-on-box contact patches held the
    pot without it in trials; this is margin."""
    from robosuite.models.objects.generated_objects import CompositeObject

    from divla_eval.envs._builders import GraspHint

    h, t, b = POT_HALF, POT_WALL, POT_BASE
    walls_z = b / 2
    sizes = [(h, h, b / 2)]
    locs = [(0.0, 0.0, -h + b / 2)]
    for sx, sy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        if sx:
            sizes.append((t / 2, h, h - b / 2))
        else:
            sizes.append((h - t, t / 2, h - b / 2))
        locs.append((sx * (h - t / 2), sy * (h - t / 2), walls_z))
    handle_z = _pot_com_z()
    sizes.append(POT_HANDLE)
    locs.append((h + POT_HANDLE[0], 0.0, handle_z))
    n = len(sizes)
    body_rgba = (0.35, 0.36, 0.4, 1.0)
    obj = CompositeObject(
        name=sim_name,
        total_size=(h + 2 * POT_HANDLE[0], h, h),
        geom_types=["box"] * n,
        geom_sizes=sizes,
        geom_locations=locs,
        geom_rgbas=[body_rgba] * (n - 1) + [(0.1, 0.1, 0.1, 1.0)],
        geom_frictions=[(1.0, 0.005, 0.0001)] * (n - 1) + [(1.5, 0.05, 0.0001)],
        geom_condims=[None] * (n - 1) + [4],
        density=350.0,
        locations_relative_to_center=True,
        joints="default",
    )
    obj.grasp_hint = GraspHint(offset=(h + POT_HANDLE[0], 0.0, handle_z), close_axis="y")
    return obj


def _pot_com_z() -> float:
    """Height of the pot body's centre of mass in its own frame (walls and base, equal density)."""
    h, t, b = POT_HALF, POT_WALL, POT_BASE
    base_v = (2 * h) ** 2 * b
    wall_v = 2 * (t * 2 * h + t * 2 * (h - t)) * (2 * h - b)
    return (base_v * (-h + b / 2) + wall_v * (b / 2)) / (base_v + wall_v)


def _build(part: Part, sim_name: str):
    """Build one part; returns (object, resting height of its origin, base orientation as wxyz)."""
    from robosuite.models.objects import Bin, BoxObject, CylinderObject

    from divla_eval.envs._builders import GraspHint

    upright = np.array([1.0, 0.0, 0.0, 0.0])
    if part.kind == "cube":
        obj = BoxObject(
            name=sim_name,
            size=(CUBE_HALF,) * 3,
            rgba=_rgba(part.colour),
            density=300.0,
            friction=(1.0, 0.005, 0.0001),
        )
        obj.grasp_hint = GraspHint(close_axis="y")
        return obj, CUBE_HALF, upright
    if part.kind == "box":
        wood = part.colour is None
        obj = Bin(
            sim_name,
            bin_size=BOX_SIZE,
            wall_thickness=BOX_WALL,
            transparent_walls=False,
            density=1500.0,
            use_texture=wood,
            rgba=_rgba(part.colour),
        )
        return obj, BOX_SIZE[2] / 2, upright
    if part.kind == "plate":
        obj = CylinderObject(
            name=sim_name,
            size=(PLATE_RADIUS, PLATE_HALF_H),
            rgba=(0.55, 0.62, 0.72, 1.0),  # slate: a white plate vanishes on the white table
            density=2000.0,
            friction=(1.0, 0.005, 0.0001),
        )
        return obj, PLATE_HALF_H, upright
    if part.kind == "cup":
        return _build_cup(part, sim_name), CUP_HALF_H, upright
    if part.kind == "pot":
        # Lying on its side, its opening facing the robot (axis z along world -x), handle (+x) up.
        import mujoco

        quat = np.zeros(4)
        mujoco.mju_mat2Quat(quat, np.array([[0, 0, -1], [0, 1, 0], [1, 0, 0]], dtype=float).flatten())
        return _build_pot(part, sim_name), POT_HALF, quat
    obj = _library_spec(part).build(sim_name)
    return obj, float(-obj.bottom_offset[2]), upright


def _yaw_quat(yaw: float, base: np.ndarray) -> np.ndarray:
    """World yaw rotation applied after `base` (both wxyz)."""
    import mujoco

    out = np.zeros(4)
    mujoco.mju_mulQuat(out, np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]), base)
    return out


def _scatter(rng: np.random.Generator, regions, radii, fixed=()) -> list[tuple[float, float]]:
    """Uniform xy in each (x range, y range) region, at least r_i + r_j apart; deterministic in `rng`.

    `fixed` holds (x, y, r) already placed (e.g. boxes in their slots)."""
    for _ in range(1000):
        placed = list(fixed)
        out = []
        for (xr, yr), r in zip(regions, radii):
            for _ in range(100):
                x, y = rng.uniform(*xr), rng.uniform(*yr)
                if all(np.hypot(x - px, y - py) > r + pr for px, py, pr in placed):
                    break
            else:
                break
            placed.append((x, y, r))
            out.append((x, y))
        else:
            return out
    raise RuntimeError("could not place the objects without overlap")


def _layout(subtask: str, rng: np.random.Generator, n: int) -> list[tuple[float, float, float]]:
    """(x, y, yaw) of each part of `subtask`'s scene, in the order of the builder's parts."""
    yaw = lambda lo=-np.pi, hi=np.pi: float(rng.uniform(lo, hi))  # noqa: E731
    box_r = float(np.hypot(*BOX_SIZE[:2])) / 2
    if subtask == "select_object":
        xy = _scatter(rng, [((-0.15, 0.1), (-0.22, 0.22))] * n, [0.065] * n)
        return [(x, y, yaw()) for x, y in xy]
    if subtask == "cube_to_colour_box":
        slots = rng.permutation(len(BOX_SLOTS_Y))
        boxes = [
            (BOX_SLOT_X + rng.uniform(-0.02, 0.02), BOX_SLOTS_Y[s] + rng.uniform(-0.02, 0.02), yaw(-0.3, 0.3))
            for s in slots[: n - 1]
        ]
        (cube,) = _scatter(
            rng, [((-0.17, -0.1), (-0.22, 0.22))], [0.03], [(x, y, box_r) for x, y, _ in boxes]
        )
        return [(*cube, yaw()), *boxes]
    if subtask == "cube_in_box":
        box = (rng.uniform(-0.05, 0.1), rng.uniform(-0.22, 0.22))
        (cube,) = _scatter(rng, [((-0.16, 0.12), (-0.25, 0.25))], [0.06], [(*box, box_r)])
        return [(*cube, yaw()), (*box, yaw(-np.pi / 4, np.pi / 4))]
    if subtask == "cup_on_plate":
        cup, plate = _scatter(
            rng, [((-0.15, 0.1), (-0.25, 0.25)), ((-0.12, 0.08), (-0.22, 0.22))], [0.07, 0.1]
        )
        return [(*cup, yaw()), (*plate, 0.0)]
    if subtask == "flip_pot":
        (pot,) = _scatter(rng, [((-0.12, 0.05), (-0.15, 0.15))], [0.1])
        return [(*pot, yaw(-POT_YAW, POT_YAW))]
    raise ValueError(f"no layout for {subtask!r}")


def _placement_sampler(subtask: str, objects, rest_z, base_quats):
    """A robosuite placement sampler (the env sets `.rng` before each `sample()`) for `_layout`."""
    from robosuite.utils.placement_samplers import ObjectPositionSampler

    class _Placer(ObjectPositionSampler):
        def sample(self, fixtures=None, reference=None, on_top=True):
            poses = _layout(subtask, self.rng, len(objects))
            return {
                obj.name: ((x, y, TABLE_TOP_Z + z + 0.002), _yaw_quat(a, q), obj)
                for obj, z, q, (x, y, a) in zip(objects, rest_z, base_quats, poses, strict=True)
            }

    return _Placer(f"{subtask}_placer", mujoco_objects=objects)


@dataclass
class _Builder:
    """Builds one sub-task's parts; equal keys (same sub-task, parts and colours) reuse the model."""

    subtask: str
    parts: tuple[Part, ...]
    key: str = field(init=False)

    def __post_init__(self):
        self.key = f"multitask:{self.subtask}:" + ",".join(p.id for p in self.parts)

    def build(self):
        from divla_eval.envs.tabletop import SceneModel

        built = [_build(p, f"obj{i}") for i, p in enumerate(self.parts)]
        objs = [b[0] for b in built]
        sampler = _placement_sampler(self.subtask, objs, [b[1] for b in built], [b[2] for b in built])
        return SceneModel(objects=objs, placement=sampler)


# --- geometry shared by predicates and experts -------------------------------------------------------------
def _pose(env, i: int) -> tuple[np.ndarray, np.ndarray]:
    return env.object_position(i), env.object_rotation(i)


def in_box(point, box_pos, box_rot, margin: float = 0.0) -> bool:
    """Is `point` between an upright box's inner walls and below its rim (widened by `margin`)?"""
    local = box_rot.T @ (np.asarray(point) - box_pos)
    half_in = BOX_SIZE[0] / 2 - BOX_WALL + margin
    return bool(
        box_rot[2, 2] > 0.9
        and abs(local[0]) < half_in
        and abs(local[1]) < half_in
        and -BOX_SIZE[2] / 2 < local[2] < BOX_SIZE[2] / 2 + margin
    )


def _resting(env, i: int) -> bool:
    return bool(np.linalg.norm(env.object_velocity(i)) < REST_SPEED and not env.grasping(i))


# --- episodes -----------------------------------------------------------------------------------------
class MultiTaskEpisode(TaskEpisode):
    """Grasp and drop bookkeeping for the object the instruction is about: always `parts[0]`, so that its
    index is the same in every sub-task (indices are invisible to a policy)."""

    subtask: str = ""
    target: int = 0

    def __init__(self, spec: EpisodeSpec, parts: tuple[Part, ...], instruction: str):
        self.spec = spec
        self.parts = parts
        self.instruction = instruction
        self.object_ids = [p.id for p in parts]
        self.builder = _Builder(self.subtask, parts)
        self.ever_grasped = False
        self.dropped = False
        self._held = False
        self._expert = None

    def on_step(self, env) -> None:
        held = env.grasping(self.target)
        self.ever_grasped |= held
        if self._held and not held:
            # Let go of (or lost) the object while it was well above the table.
            low = env.object_aabb(self.target)[0][2]
            self.dropped |= bool(low > TABLE_TOP_Z + self._drop_height())
        self._held = held

    def _drop_height(self) -> float:
        return 0.06

    def _pick_place(self, env, goal_xy, release_z) -> np.ndarray:
        from divla_eval.tasks.multitask_expert import PrecisePickPlace

        if self._expert is None:
            self._expert = PrecisePickPlace(self.target, goal_xy=tuple(goal_xy), release_z=release_z)
        self._expert.goal_xy = tuple(goal_xy)
        return self._expert.act(env)

    def _phase_reasoning(self, grasp: str, place: str, lift: str | None = None) -> str:
        phase = self._expert.phase
        if phase in ("approach", "descend", "close"):
            return grasp
        if phase == "lift":
            return lift or grasp
        if phase in ("carry", "lower", "release"):
            return place
        return "the task is done"


class SelectObjectEpisode(MultiTaskEpisode):
    subtask = "select_object"

    def __init__(self, spec: EpisodeSpec):
        rng = np.random.default_rng(spec.seed("objects"))
        combos = [(k, c) for k in SELECT_CATEGORIES for c in COLOURS]
        picks = rng.choice(len(combos), size=SELECT_COUNT, replace=False)
        parts = tuple(Part(combos[i][0], combos[i][1]) for i in picks)
        super().__init__(spec, parts, INSTRUCTIONS["select_object"].format(target=parts[0].name))
        self.wrong_object = False
        self._start_xy = None

    def on_step(self, env) -> None:
        super().on_step(env)
        for i in range(1, len(self.parts)):
            if env.grasping(i) and env.object_aabb(i)[0][2] > TABLE_TOP_Z + 0.02:
                self.wrong_object = True

    def evaluate(self, env) -> Evaluation:
        lifted = env.object_aabb(0)[0][2] > TABLE_TOP_Z + LIFT_HEIGHT
        ok = bool(lifted and env.grasping(0))
        return Evaluation(success=ok, partial_score=float(ok))

    def failure_mode(self, env) -> str:
        if self.wrong_object:
            return "wrong_object"
        if not self.ever_grasped:
            return "no_grasp"
        if env.grasping(0):
            return "timeout"
        return "dropped"

    def expert(self, env) -> ExpertAction:
        if self._start_xy is None:
            self._start_xy = env.object_positions()[0][:2].copy()
        action = self._pick_place(env, self._start_xy, TABLE_TOP_Z + 0.2)
        name = self.parts[0].name
        return ExpertAction(
            action, self._phase_reasoning(f"grasp the {name}", "hold it up", f"lift the {name}")
        )


class _CubeToBoxEpisode(MultiTaskEpisode):
    """Cube (index 0) into box `goal` (an index >= 1); other boxes are wrong ones."""

    goal: int = 1

    def _in(self, env, box: int, margin: float = 0.0) -> bool:
        pos, rot = _pose(env, box)
        return in_box(env.object_positions()[0], pos, rot, margin)

    def evaluate(self, env) -> Evaluation:
        ok = self._in(env, self.goal) and _resting(env, 0)
        return Evaluation(success=ok, partial_score=float(ok))

    def failure_mode(self, env) -> str:
        if not self.ever_grasped:
            return "no_grasp"
        if env.grasping(0):
            return "timeout"
        boxes = range(1, len(self.parts))
        if any(self._in(env, b) for b in boxes if b != self.goal):
            return "wrong_box"
        if self._in(env, self.goal, margin=0.05):
            return "outside_box"
        return "dropped"

    def _box_phrase(self) -> str:
        return "place it in the box"

    def expert(self, env) -> ExpertAction:
        goal_xy = env.object_positions()[self.goal][:2]
        action = self._pick_place(env, goal_xy, TABLE_TOP_Z + BOX_SIZE[2] + 0.08)
        return ExpertAction(action, self._phase_reasoning("grasp the cube", self._box_phrase()))


class CubeToColourBoxEpisode(_CubeToBoxEpisode):
    subtask = "cube_to_colour_box"

    def __init__(self, spec: EpisodeSpec):
        rng = np.random.default_rng(spec.seed("objects"))
        self.goal = 1 + int(rng.integers(len(BOX_COLOURS)))
        parts = (Part("cube", CUBE_COLOUR), *(Part("box", c) for c in BOX_COLOURS))
        self.goal_colour = BOX_COLOURS[self.goal - 1]
        super().__init__(spec, parts, INSTRUCTIONS["cube_to_colour_box"].format(colour=self.goal_colour))

    def _box_phrase(self) -> str:
        return f"place it in the {self.goal_colour} box"


class CubeInBoxEpisode(_CubeToBoxEpisode):
    subtask = "cube_in_box"

    def __init__(self, spec: EpisodeSpec):
        super().__init__(spec, (Part("cube", CUBE_COLOUR), Part("box")), INSTRUCTIONS["cube_in_box"])


class CupOnPlateEpisode(MultiTaskEpisode):
    subtask = "cup_on_plate"

    def __init__(self, spec: EpisodeSpec):
        super().__init__(spec, (Part("cup", CUP_COLOUR), Part("plate")), INSTRUCTIONS["cup_on_plate"])

    def _state(self, env) -> tuple[bool, bool]:
        """(upright, on the plate) for the cup's current pose."""
        cup, rot = _pose(env, 0)
        plate = env.object_positions()[1]
        upright = rot[2, 2] > UPRIGHT_COS
        bottom = cup[2] - CUP_HALF_H * rot[2, 2]
        gap = bottom - (plate[2] + PLATE_HALF_H)
        on = np.hypot(*(cup[:2] - plate[:2])) < PLATE_RADIUS - 0.01 and -0.005 < gap < 0.01
        return bool(upright), bool(on)

    def evaluate(self, env) -> Evaluation:
        upright, on = self._state(env)
        ok = upright and on and _resting(env, 0)
        return Evaluation(success=ok, partial_score=float(ok))

    def failure_mode(self, env) -> str:
        if not self.ever_grasped:
            return "no_grasp"
        if env.grasping(0):
            return "timeout"
        upright, on = self._state(env)
        if not upright:
            return "tipped"
        if self.dropped:
            return "dropped"
        return "off_plate"

    def expert(self, env) -> ExpertAction:
        plate = env.object_positions()[1]
        # The fingers hold the cup 2.5 cm below its rim: release with its bottom ~1 cm above the plate.
        release_z = plate[2] + PLATE_HALF_H + 2 * CUP_HALF_H - 0.025 + 0.01
        action = self._pick_place(env, plate[:2], release_z)
        return ExpertAction(action, self._phase_reasoning("grasp the cup", "place it onto the plate"))


class FlipPotEpisode(MultiTaskEpisode):
    subtask = "flip_pot"

    def __init__(self, spec: EpisodeSpec):
        super().__init__(spec, (Part("pot"),), INSTRUCTIONS["flip_pot"])
        self.lifted = False
        """The gripper has held the pot clear of the table (`LIFTED_CLEARANCE`): the paper's flip is a
        manipulation, and a pot pressed or pushed upright without it does not count."""

    def on_step(self, env) -> None:
        super().on_step(env)
        if self._held and not self.lifted:
            self.lifted = bool(env.object_aabb(self.target)[0][2] > TABLE_TOP_Z + LIFTED_CLEARANCE)

    def _drop_height(self) -> float:
        return 0.04

    def _upright(self, env) -> bool:
        return bool(_pose(env, 0)[1][2, 2] > UPRIGHT_COS)

    def evaluate(self, env) -> Evaluation:
        ok = self.lifted and self._upright(env) and _resting(env, 0)
        return Evaluation(success=ok, partial_score=float(ok))

    def failure_mode(self, env) -> str:
        if not self.ever_grasped:
            return "no_grasp"
        if env.grasping(0):
            return "timeout"
        if self.dropped:
            return "dropped"
        if not self.lifted:
            return "not_lifted"
        return "not_upright"

    def expert(self, env) -> ExpertAction:
        from divla_eval.tasks.multitask_expert import FlipExpert

        if self._expert is None:
            self._expert = FlipExpert(obj_index=self.target, handle_half=POT_HANDLE)
        action = self._expert.act(env)
        phase = self._expert.phase
        if phase in ("approach", "descend", "close"):
            reasoning = "grasp the pot by its handle"
        elif phase in ("lift", "carry", "rotate"):
            reasoning = "flip the pot upright"
        elif phase in ("lower", "release", "retreat", "raise"):
            reasoning = "put the pot down"
        else:
            reasoning = "the task is done"
        return ExpertAction(action, reasoning)


EPISODES = {
    "select_object": SelectObjectEpisode,
    "flip_pot": FlipPotEpisode,
    "cube_to_colour_box": CubeToColourBoxEpisode,
    "cup_on_plate": CupOnPlateEpisode,
    "cube_in_box": CubeInBoxEpisode,
}


@dataclass(frozen=True)
class MultiTask(Task):
    """The five Franka tasks; see the module docstring. One split per sub-task, so reports group by it."""

    name: str = "multitask"
    version: str = "2"
    """2: flip_pot needs the pot lifted in the gripper (a pot pressed upright no longer counts)."""
    splits: tuple[str, ...] = SUBTASKS
    max_steps: int = DEFAULT_MAX_STEPS

    def max_steps_for(self, split: str, difficulty: str | None = None) -> int:
        """The split's own budget, unless the user set `max_steps` (then that, for every split)."""
        return SUBTASK_MAX_STEPS[split] if self.max_steps == DEFAULT_MAX_STEPS else self.max_steps

    @property
    def default_splits(self) -> tuple[str, ...]:
        """`divla-eval run --task multitask` without --split: every sub-task, one run each (the paper's
        table is all five); `evaluate()` and `--split NAME` take one."""
        return self.splits

    def episode(self, spec: EpisodeSpec) -> MultiTaskEpisode:
        return EPISODES[spec.split](spec)
