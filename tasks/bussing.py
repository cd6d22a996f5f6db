"""Bimanual table bussing (DiVLA paper, Sec. 4.3).

Description:
    Two Pandas stand side by side at the table. Three to five objects lie in the middle: utensils
    (plates, cups, forks, spoons) go onto the tray on the left, trash (cans, paper balls, wrappers)
    into the bin on the right. Instruction: "clean the table: put the utensils on the tray and the
    trash in the bin". The left arm serves the tray and the right arm the bin, as in the paper.
Randomizations:
    Which objects (at least one utensil and one trash item), from the split's pool: `seen` uses seen
    instances only, `mixed` draws at least one unseen instance; positions and yaw in the middle region.
Success:
    Every object rests in its receptacle (utensil: inside the tray's walls; trash: inside the bin) and
    no arm holds anything. Partial score: objects placed correctly / objects present.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from divla_eval.envs.layout import TABLE_TOP_Z
from divla_eval.tasks.base import EpisodeSpec, Evaluation, ExpertAction, Task, TaskEpisode

TRAY_POS, TRAY_SIZE = (0.0, 0.42), (0.2, 0.22, 0.03)  # left of the robots (+y)
BIN_POS, BIN_SIZE = (0.0, -0.42), (0.2, 0.22, 0.09)  # right of the robots (-y)
# x and y ranges where objects start: a strip both arms reach from above with room to spare. Each arm
# serves objects on the other side of the centre line too, and in a wider strip (task version 2:
# x -0.22..0.06, y -0.12..0.12) that failed: beyond x = 0.04 the elbow straightens out (a singular
# pose from which the controller cannot pull back; the arm stalls above the object), and objects far
# across the centre line, close to the other arm's base, sent that arm astray as it lifted them
# (seen episodes 22, 23, 31). A narrower strip does not leave room to place five objects apart.
MIDDLE = ((-0.20, 0.04), (-0.09, 0.09))
WALL = 0.01
RIGHT_ARM, LEFT_ARM = 0, 1  # robosuite robot indices (robot 0 stands at -y)
# Where the idle arm waits: just behind and above its start pose. Parking it further out twisted its
# elbow and wrist (the controller's posture term is weak), and the twisted arm later stalled short of
# the objects.
HOME = {RIGHT_ARM: (-0.15, -0.2, 1.0), LEFT_ARM: (-0.15, 0.2, 1.0)}
FAILURE_MODES = ("wrong_place", "left_on_table", "dropped", "timeout")
SLOTS = ((-0.045, -0.05), (0.045, 0.05), (0.045, -0.05), (-0.045, 0.05), (0.0, 0.0))
MAX_ATTEMPTS = 2  # per object: a second try after a slip, then the expert moves on
# How both arms carry every object, to its receptacle or to a hand-over point (PickPlaceExpert
# options): forks and cups are held off their centre and the tray is small (centre the object, not the
# hand); a cup swung at full speed slipped out of the fingers (seen episode 44); a slip is re-grasped;
# the lift is steady (see PickPlaceExpert.steady).
GENTLE = dict(carry_gain=1.0, centre_object=True, carry_max=0.5, regrasp_on_slip=True, steady=True)
# An object lying this far across the centre line, on the other arm's side, is first handed over: the
# arm on its side sets it down at a free point just across the line (task version 4). Lifting it
# straight from across the table, close to its own base, tilted the serving arm's hand by up to 88
# degrees and the object fell beside the tray (bussing mixed episodes 4, 13, 16, 19; every failure of
# version 3's mixed cell but one).
HANDOVER_ACROSS = 0.02
# Hand-over points on the serving arm's side (x, |y|), in order of preference: nearest to the middle
# first, out where both arms reach comfortably, away from the bases. Points at x = 0 (task version 5)
# left the serving arm reaching with its elbow straight, and it stalled 17 cm short (seen episode 4).
# Points further across (|y| = 0.13, task version 6) were out of the handing arm's reach: it sagged
# back while lowering, tilting the object off (seen episode 23).
HANDOVER_POINTS = tuple((x, y) for y in (0.05, 0.09) for x in (-0.08, -0.03, -0.13))
HANDOVER_GAP = 0.015  # metres between the set-down object's footprint and any other's


@dataclass(frozen=True)
class Item:
    """A bussing object: `kind` is "utensil" or "trash"; `shape` picks the builder."""

    id: str
    name: str
    kind: str
    shape: str
    rgba: tuple[float, float, float, float]
    size: float = 1.0
    split: str = "seen"


_W, _GREY, _RED, _BLUE = (0.92, 0.92, 0.9, 1), (0.7, 0.7, 0.72, 1), (0.8, 0.15, 0.1, 1), (0.2, 0.35, 0.85, 1)
ITEMS = (
    Item("plate-white", "white plate", "utensil", "plate", _W),
    Item("cup-blue", "blue cup", "utensil", "cup", _BLUE),
    Item("fork-silver", "silver fork", "utensil", "fork", _GREY),
    Item("can-soda", "soda can", "trash", "can", _RED),
    Item("paper-white", "crumpled white paper", "trash", "paper", _W),
    Item("wrapper-red", "red wrapper", "trash", "wrapper", _RED),
    Item("plate-green", "small green plate", "utensil", "plate", (0.2, 0.6, 0.3, 1), 0.85, "unseen"),
    Item("cup-yellow", "yellow cup", "utensil", "cup", (0.95, 0.8, 0.2, 1), 1.1, "unseen"),
    Item("spoon-silver", "silver spoon", "utensil", "spoon", _GREY, 1.0, "unseen"),
    Item("paper-yellow", "crumpled yellow paper", "trash", "paper", (0.95, 0.85, 0.3, 1), 1.1, "unseen"),
    Item("wrapper-blue", "blue wrapper", "trash", "wrapper", _BLUE, 1.2, "unseen"),
    Item("can-small", "small soda can", "trash", "can", _RED, 0.8, "unseen"),
)


def build_item(item: Item, sim_name: str):
    """Primitive-built objects, each with a grasp hint for the expert."""
    from robosuite.models.objects import BoxObject, CylinderObject
    from robosuite.models.objects.generated_objects import CompositeObject

    from divla_eval.envs._builders import GraspHint

    s, hint = item.size, GraspHint(close_axis="y")

    def composite(total, types, sizes, locs, quats=None, rgbas=None):
        return CompositeObject(
            name=sim_name,
            total_size=total,
            geom_types=types,
            geom_sizes=sizes,
            geom_locations=locs,
            geom_quats=quats,
            geom_rgbas=rgbas or [item.rgba] * len(types),
            geom_frictions=[(1.0, 0.005, 0.0001)] * len(types),
            density=300,
            locations_relative_to_center=True,
            joints="default",
        )

    if item.shape == "plate":  # a thick saucer the fingers can pinch across
        obj = CylinderObject(name=sim_name, size=(0.03 * s, 0.012), rgba=item.rgba, density=400)
        hint = GraspHint(close_axis="free")  # round: close along whichever line is clear of neighbours
    elif item.shape == "cup":
        r, h = 0.022 * s, 0.03 * s
        obj = composite(
            (r + 0.008, r, h),
            ["cylinder", "box"],
            [(r, h), (0.008, 0.003, 0.6 * h)],
            [(-0.008, 0, 0), (r, 0, 0)],
        )
        hint = GraspHint(offset=(-0.008, 0.0, 0.0), close_axis="y")
    elif item.shape in ("fork", "spoon"):
        head = (0.016, 0.014, 0.008) if item.shape == "fork" else (0.018, 0.016, 0.008)
        obj = composite(
            (0.075, 0.016, 0.012),
            ["box", "box" if item.shape == "fork" else "ellipsoid"],
            [(0.05, 0.008, 0.012), head],
            [(-0.022, 0, 0), (0.055, 0, -0.004)],
        )
        # on the handle, 2 cm from the head: grasps at the centre of mass (task version 2) missed the
        # narrow neck by a centimetre and failed three times in a row (bussing seen episode 23)
        hint = GraspHint(offset=(-0.022, 0.0, 0.0), close_axis="y")
    elif item.shape == "can":
        # A primitive cylinder rather than robosuite's can mesh: the mesh, stiff and touched by each
        # finger at a point or two, slid down through the fingers and fell out while being carried.
        obj = CylinderObject(
            name=sim_name,
            size=(0.026 * s, 0.04 * s),
            rgba=item.rgba,
            density=150,
            friction=(1.0, 0.005, 0.0001),
        )
        hint = GraspHint(close_axis="free")
    elif item.shape == "paper":  # a crumpled, squashed ball that does not roll away
        # A lump on a flat-sided core: the fingers (closing along y) press on flat faces. A plain
        # ellipsoid touched each finger at one point and slipped out while being carried.
        r = 0.02 * s
        obj = composite(
            (r * 1.1, r, r * 0.75),
            ["box", "ellipsoid"],
            [(r * 0.8, r, r * 0.6), (r * 1.1, r * 0.9, r * 0.75)],
            [(0, 0, 0), (0, 0, 0)],
        )
    elif item.shape == "wrapper":
        obj = BoxObject(name=sim_name, size=(0.03 * s, 0.018, 0.012), rgba=item.rgba, density=200)
        # 6 cm long, so it fits the open fingers (8 cm) lengthwise too: a soda can 7 cm away on the
        # short axis' line stopped the descent four times in a row (seen episode 45)
        hint = GraspHint(close_axis="y", fallback_axis="x")
    else:
        raise ValueError(item.shape)
    obj.grasp_hint = hint
    return obj


@dataclass
class _Builder:
    items: tuple[Item, ...]
    key: str = field(init=False)

    def __post_init__(self):
        self.key = "bussing:" + ",".join(i.id for i in self.items)

    def build(self):
        from robosuite.models.objects import Bin
        from robosuite.utils.placement_samplers import UniformRandomSampler

        from divla_eval.envs.tabletop import SceneModel

        common = dict(wall_thickness=WALL, transparent_walls=False, use_texture=False)
        tray = Bin("tray", bin_size=TRAY_SIZE, rgba=(0.55, 0.35, 0.2, 1), **common)
        trash_bin = Bin("trash_bin", bin_size=BIN_SIZE, rgba=(0.25, 0.25, 0.28, 1), **common)
        objs = [build_item(item, f"obj{i}") for i, item in enumerate(self.items)]
        sampler = UniformRandomSampler(
            name="middle_sampler",
            mujoco_objects=objs,
            x_range=MIDDLE[0],
            y_range=MIDDLE[1],
            rotation=None,
            rotation_axis="z",
            ensure_object_boundary_in_range=False,
            ensure_valid_placement=True,
            reference_pos=(0.0, 0.0, TABLE_TOP_Z),
            z_offset=0.002,
        )
        return SceneModel(
            objects=objs,
            fixtures=[tray, trash_bin],
            fixture_positions=[
                (*TRAY_POS, TABLE_TOP_Z + TRAY_SIZE[2] / 2),
                (*BIN_POS, TABLE_TOP_Z + BIN_SIZE[2] / 2),
            ],
            placement=sampler,
        )


def _inside(pos, center, size, margin: float = 0.0) -> bool:
    half = np.array(size[:2]) / 2 - WALL + margin
    return bool(
        np.all(np.abs(np.asarray(pos[:2]) - np.array(center)) < half)
        and TABLE_TOP_Z - 0.02 < pos[2] < TABLE_TOP_Z + size[2] + 0.05 + margin
    )


def placed_correctly(item: Item, pos) -> bool:
    return _inside(pos, TRAY_POS, TRAY_SIZE) if item.kind == "utensil" else _inside(pos, BIN_POS, BIN_SIZE)


def placed_wrongly(item: Item, pos) -> bool:
    return _inside(pos, BIN_POS, BIN_SIZE) if item.kind == "utensil" else _inside(pos, TRAY_POS, TRAY_SIZE)


class BussingEpisode(TaskEpisode):
    def __init__(self, spec: EpisodeSpec):
        self.spec = spec
        rng = np.random.default_rng(spec.seed("objects"))
        seen = [i for i in ITEMS if i.split == "seen"]
        pool = seen if spec.split == "seen" else list(ITEMS)
        while True:  # at least one of each kind; `mixed` needs at least one unseen item
            count = int(rng.integers(3, 6))
            picks = [pool[k] for k in rng.choice(len(pool), size=count, replace=False)]
            kinds = {p.kind for p in picks}
            if kinds == {"utensil", "trash"} and (
                spec.split == "seen" or any(p.split == "unseen" for p in picks)
            ):
                break
        self.items = tuple(picks)
        self.object_ids = [i.id for i in self.items]
        self.instruction = "clean the table: put the utensils on the tray and the trash in the bin"
        self.builder = _Builder(self.items)
        self._queue: list[int] | None = None
        self._current = None
        self._drops = {True: 0, False: 0}  # drops made so far on the tray (True) and in the bin
        self._attempts: dict[int, int] = {}
        self._handed_over: set[int] = set()
        self._home_yaw: dict[int, float] | None = None

    def _resting(self, env, i: int) -> bool:
        return np.linalg.norm(env.object_velocity(i)) < 0.05 and not env.grasping(i)

    def evaluate(self, env) -> Evaluation:
        positions = env.object_positions()
        correct = [
            placed_correctly(item, positions[i]) and self._resting(env, i)
            for i, item in enumerate(self.items)
        ]
        return Evaluation(success=all(correct), partial_score=sum(correct) / len(self.items))

    def failure_mode(self, env) -> str:
        positions = env.object_positions()
        if any(placed_wrongly(item, positions[i]) for i, item in enumerate(self.items)):
            return "wrong_place"
        if any(positions[i][2] < TABLE_TOP_Z - 0.05 for i in range(len(self.items))):
            return "dropped"
        if any(env.grasping(i) for i in range(len(self.items))):
            return "timeout"
        return "left_on_table"

    def expert(self, env) -> ExpertAction:
        """One arm at a time (the middle is shared, so the arms never reach into it together)."""
        from divla_eval.tasks.pick_place_expert import PickPlaceExpert, _yaw

        positions = env.object_positions()
        if self._home_yaw is None:
            self._home_yaw = {arm: _yaw(env.finger_axis(arm)) for arm in HOME}
        if self._queue is None:  # nearest to the centre line first: both arms reach it comfortably
            self._queue = sorted(range(len(self.items)), key=lambda i: abs(positions[i][1]))
        if self._current is None or self._current.done:
            remaining = [i for i in self._queue if not placed_correctly(self.items[i], positions[i])]
            remaining = [i for i in remaining if self._attempts.get(i, 0) < MAX_ATTEMPTS]
            if not remaining:
                return ExpertAction(self._idle(env), "the table is clean")
            for k, i in enumerate(remaining):
                utensil = self.items[i].kind == "utensil"
                arm = LEFT_ARM if utensil else RIGHT_ARM
                side = 1.0 if arm == LEFT_ARM else -1.0  # the serving arm's side of the centre line
                if i in self._handed_over or -side * positions[i][1] <= HANDOVER_ACROSS:
                    break
                # To be handed over: where? With no free point yet, serve the next object first
                # (clearing the table makes room), unless this is the last one.
                point = self._handover_point(env, i, side, last=k == len(remaining) - 1)
                if point is not None:
                    self._handed_over.add(i)
                    self._current = self._handover(i, side, point)
                    return self._step(env)
            self._attempts[i] = self._attempts.get(i, 0) + 1
            (gx, gy), size = (TRAY_POS, TRAY_SIZE) if utensil else (BIN_POS, BIN_SIZE)
            # spread the drops over the receptacle so objects do not land on each other
            slot = SLOTS[self._drops[utensil] % len(SLOTS)]
            self._drops[utensil] += 1
            self._current = PickPlaceExpert(
                obj_index=i,
                goal_xy=(gx + slot[0], gy + slot[1]),
                release_z=TABLE_TOP_Z + size[2] + 0.08,
                robot=arm,
                # Carry over the arm's own side, gently, and let the object stop swinging before
                # letting go: a straight fast carry across the table stalled outstretched arms and
                # flung light cups off the tray.
                via_xy=HOME[arm][:2],
                settle_steps=10,
                **GENTLE,
            )
        return self._step(env)

    def _handover_point(self, env, i: int, side: float, last: bool) -> np.ndarray | None:
        """The first hand-over point (in order of preference) on the serving arm's side where the
        object's footprint keeps clear of every other object's. None if there is none, unless
        `last`: then the point with the most room."""
        # Footprints as capsules: a fork set down by its centre 4 cm from a cup lay across the cup's
        # rim, fell on its side and could not be grasped again (seen episode 4, version 5); a disc
        # as wide as a fork is long left no point free beside one, and the fallback sent the other
        # arm to a corner it could not reach (seen episodes 23 and 25, version 6).
        held = _footprint(env, i)
        others = [_footprint(env, j) for j in range(len(self.items)) if j != i]
        points = [np.array([x, side * y]) for x, y in HANDOVER_POINTS]
        gaps = [min((_gap(held.moved_to(p), other) for other in others), default=1.0) for p in points]
        free = [p for p, gap in zip(points, gaps) if gap > HANDOVER_GAP]
        if free:
            return free[0]
        return points[int(np.argmax(gaps))] if last else None

    def _handover(self, i: int, side: float, point: np.ndarray):
        """The arm on the object's side sets it down at `point`, on the serving arm's side; the
        serving arm then picks it up from there as usual."""
        from divla_eval.tasks.pick_place_expert import PickPlaceExpert

        arm = RIGHT_ARM if side > 0 else LEFT_ARM
        return PickPlaceExpert(
            obj_index=i,
            goal_xy=(float(point[0]), float(point[1])),
            release_z=TABLE_TOP_Z + 0.06,
            set_down=0.01,
            robot=arm,
            settle_steps=5,
            **GENTLE,
        )

    def _step(self, env) -> ExpertAction:
        expert = self._current
        item = self.items[expert.obj_index]
        action = self._idle(env)
        action[7 * expert.robot : 7 * expert.robot + 7] = expert.act(env)
        side = "left" if expert.robot == LEFT_ARM else "right"
        serving = "left" if item.kind == "utensil" else "right"
        if expert.phase in ("approach", "descend", "close", "lift"):
            reasoning = f"grasp the {item.name} with the {side} arm"
        elif expert.phase in ("carry", "lower", "release") and side != serving:
            reasoning = f"hand it over to the {serving} arm"
        elif expert.phase in ("carry", "lower", "release"):
            reasoning = "place it on the tray" if item.kind == "utensil" else "throw it in the bin"
        else:
            reasoning = "the next object"
        return ExpertAction(action=action, reasoning=reasoning)

    def _idle(self, env) -> np.ndarray:
        """Hold each arm at its home pose, gripper open, fingers turned back to their start yaw (the
        active arm's part is overwritten). Left alone, an idle wrist drifted and the arm began its
        next reach twisted (task version 5)."""
        from divla_eval.tasks.pick_place_expert import ROT_SCALE, _wrap, _yaw

        action = np.zeros(14)
        for arm, home in HOME.items():
            action[7 * arm : 7 * arm + 3] = np.clip((np.array(home) - env.eef_pos_of(arm)) / 0.05, -1, 1)
            action[7 * arm + 6] = -1.0
            if self._home_yaw is not None:  # the fingers are symmetric: a half turn is no turn
                err = _wrap(2 * (self._home_yaw[arm] - _yaw(env.finger_axis(arm)))) / 2
                action[7 * arm + 5] = np.clip(err / ROT_SCALE, -0.3, 0.3)
        return action


@dataclass(frozen=True)
class _Capsule:
    """An object's footprint on the table: the segment a..b widened by `radius` (a fork is a long
    thin capsule, a plate a disc)."""

    a: np.ndarray
    b: np.ndarray
    radius: float

    def moved_to(self, centre: np.ndarray) -> _Capsule:
        shift = centre - (self.a + self.b) / 2
        return _Capsule(self.a + shift, self.b + shift, self.radius)


def _footprint(env, j: int) -> _Capsule:
    """Along the object's longer horizontal axis (in its own frame), through its position."""
    centre = env.object_positions()[j][:2]
    corners = env.object_corners(j)[:, :2] - centre
    axes = env.object_rotation(j)[:2, :2].T  # rows: the object's x and y axes on the table
    extent = np.ptp(corners @ axes.T, axis=0) / 2  # half extents along them
    long = int(np.argmax(extent))
    radius = float(extent[1 - long])
    u = axes[long] / (np.linalg.norm(axes[long]) + 1e-9)
    half = max(float(extent[long]) - radius, 0.0)
    return _Capsule(centre - half * u, centre + half * u, radius)


def _gap(p: _Capsule, q: _Capsule) -> float:
    """Clearance between two footprints (negative: they overlap), from points along each segment:
    a few millimetres of error at most, plenty for choosing where to set an object down."""

    def to_segment(points, a, b):
        ab = b - a
        t = np.clip((points - a) @ ab / max(float(ab @ ab), 1e-12), 0.0, 1.0)
        return np.linalg.norm(points - (a + t[:, None] * ab), axis=1)

    s = np.linspace(0.0, 1.0, 11)[:, None]
    along_p, along_q = p.a + s * (p.b - p.a), q.a + s * (q.b - q.a)
    dist = min(to_segment(along_p, q.a, q.b).min(), to_segment(along_q, p.a, p.b).min())
    return float(dist) - p.radius - q.radius


@dataclass(frozen=True)
class Bussing(Task):
    """Bimanual table bussing; see the module docstring."""

    name: str = "bussing"
    version: str = "7"  # 2: a primitive can, forks and spoons grasped at their centre of mass;
    # 3: a narrower start strip, forks and spoons grasped on the handle again, a steady lift;
    # 4: objects across the centre line are handed over; plates and cans grasped clear of neighbours;
    # 5: ... with the least wrist turn; 6: hand-over points clear of every neighbour's footprint and
    # further from the table's far edge, objects set down there (not dropped), wrappers closed on
    # lengthwise when a neighbour blocks the short side, a knocked-over can grasped across its
    # length, the idle arm's fingers kept at their start yaw; 7: footprints as capsules, points within
    # the handing arm's reach, and an object with no free point waits while the others are cleared
    splits: tuple[str, ...] = ("seen", "mixed")
    max_steps: int = 2000  # ~250 steps per object (a gentle carry), 5 at most, and room for re-grasps
    robots: tuple[str, ...] = ("Panda", "Panda")
    embodiment: str = "bimanual_panda"

    def episode(self, spec: EpisodeSpec) -> BussingEpisode:
        return BussingEpisode(spec)
