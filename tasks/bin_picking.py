"""Zero-shot bin picking (DiVLA paper, Sec. 4.2).

Description:
    Objects lie on the right panel of the table (seen from the robot), a basket stands on the left.
    Instruction: "move any object from the right panel into the left basket"; with
    `variant="named"` the instruction names one object ("move the small red mug ...").
Randomizations:
    Episode i features object i (mod the split's size) of the chosen split (so 102 episodes of the
    unseen split cover every unseen object once) plus `num_objects - 1` others drawn from the same
    split; positions on the panel and yaw are uniform; the robot's joints get small Gaussian noise.
Success:
    An object (the named one, for `variant="named"`) rests inside the basket: its centre is within the
    basket's inner walls, below the rim, it moves slower than 5 cm/s and the gripper no longer holds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from divla_eval.envs import objects as library
from divla_eval.envs.layout import TABLE_TOP_Z
from divla_eval.tasks.base import EpisodeSpec, Evaluation, ExpertAction, Task, TaskEpisode

BASKET_POS = (0.0, 0.24, 0.0)  # x, y on the table; z filled in at build time
BASKET_SIZE = (0.24, 0.28, 0.09)  # full outer size x, y, z
PANEL_CENTER = (0.0, -0.2)
PANEL_HALF = (0.14, 0.16)
WALL = 0.01
FAILURE_MODES = ("no_grasp", "dropped", "outside_basket", "timeout")
VARIANTS = ("any", "named")
MAX_OBJECTS = 4  # more do not reliably fit on the panel next to each other


@dataclass
class _Builder:
    """Builds basket, panel and the episode's objects; `key` changes only with the object set."""

    specs: tuple
    key: str = field(init=False)

    def __post_init__(self):
        self.key = "bin_picking:" + ",".join(s.id for s in self.specs)

    def build(self):
        return scene_with_basket([spec.build(f"obj{i}") for i, spec in enumerate(self.specs)])


def scene_with_basket(objs: list):
    """The bin-picking table: a basket on the left, a panel on the right with `objs` placed on it."""
    from robosuite.models.objects import Bin, BoxObject
    from robosuite.utils.placement_samplers import UniformRandomSampler

    from divla_eval.envs.tabletop import SceneModel

    basket = Bin(
        "basket", bin_size=BASKET_SIZE, wall_thickness=WALL, transparent_walls=False, use_texture=True
    )
    panel = BoxObject(
        "panel",
        size=(PANEL_HALF[0], PANEL_HALF[1], 0.001),
        rgba=(0.35, 0.45, 0.6, 1.0),
        obj_type="visual",
        joints=None,
    )
    sampler = UniformRandomSampler(
        name="panel_sampler",
        mujoco_objects=objs,
        x_range=(-PANEL_HALF[0] + 0.03, PANEL_HALF[0] - 0.03),
        y_range=(-PANEL_HALF[1] + 0.03, PANEL_HALF[1] - 0.03),
        rotation=None,
        rotation_axis="z",
        ensure_object_boundary_in_range=False,
        ensure_valid_placement=True,
        reference_pos=(PANEL_CENTER[0], PANEL_CENTER[1], TABLE_TOP_Z),
        z_offset=0.002,
    )
    return SceneModel(
        objects=objs,
        fixtures=[basket, panel],
        fixture_positions=[
            (BASKET_POS[0], BASKET_POS[1], TABLE_TOP_Z + BASKET_SIZE[2] / 2),
            (PANEL_CENTER[0], PANEL_CENTER[1], TABLE_TOP_Z + 0.001),
        ],
        placement=sampler,
    )


def in_basket(pos: np.ndarray, margin: float = 0.0) -> bool:
    """Is a point inside the basket's inner volume (walls excluded), optionally widened by `margin`?"""
    half_in = np.array(BASKET_SIZE[:2]) / 2 - WALL + margin
    dxy = np.abs(np.asarray(pos[:2]) - np.array(BASKET_POS[:2]))
    return bool(np.all(dxy < half_in) and TABLE_TOP_Z < pos[2] < TABLE_TOP_Z + BASKET_SIZE[2] + margin)


class BinPickingEpisode(TaskEpisode):
    def __init__(self, spec: EpisodeSpec, num_objects: int, variant: str):
        split_objects = library.objects(spec.split)
        featured = split_objects[spec.episode_index % len(split_objects)]
        rng = np.random.default_rng(spec.seed("objects"))
        others = [o for o in split_objects if o.id != featured.id]
        picks = rng.choice(len(others), size=num_objects - 1, replace=False) if num_objects > 1 else []
        self.specs = (featured, *(others[i] for i in picks))
        self.spec = spec
        self.variant = variant
        self.object_ids = [s.id for s in self.specs]
        self.builder = _Builder(self.specs)
        if variant == "named":
            self.instruction = f"move the {featured.name} from the right panel into the left basket"
        else:
            self.instruction = "move any object from the right panel into the left basket"
        self._expert = None
        self.ever_grasped = False

    def _targets(self) -> range:
        return range(1) if self.variant == "named" else range(len(self.specs))

    def evaluate(self, env) -> Evaluation:
        for i in self._targets():
            pos = env.object_positions()[i]
            if in_basket(pos) and np.linalg.norm(env.object_velocity(i)) < 0.05 and not env.grasping(i):
                return Evaluation(success=True, partial_score=1.0)
        return Evaluation(success=False, partial_score=0.0)

    def on_step(self, env) -> None:
        if not self.ever_grasped:
            self.ever_grasped = any(env.grasping(i) for i in self._targets())

    def failure_mode(self, env) -> str:
        if not self.ever_grasped:
            return "no_grasp"
        if any(env.grasping(i) for i in self._targets()):
            return "timeout"
        if any(in_basket(env.object_positions()[i], margin=0.05) for i in self._targets()):
            return "outside_basket"
        return "dropped"

    def expert(self, env) -> ExpertAction:
        from divla_eval.tasks.pick_place_expert import PickPlaceExpert

        if self._expert is None:
            self._expert = PickPlaceExpert(
                obj_index=0, goal_xy=BASKET_POS[:2], release_z=TABLE_TOP_Z + BASKET_SIZE[2] + 0.09
            )
        action = self._expert.act(env)
        phase = self._expert.phase
        name = self.specs[0].name
        if phase in ("approach", "descend", "close", "lift"):
            reasoning = f"grasp the {name}"
        elif phase in ("carry", "lower", "release"):
            reasoning = "place it in the basket"
        else:
            reasoning = "the task is done"
        return ExpertAction(action=action, reasoning=reasoning)


@dataclass(frozen=True)
class BinPicking(Task):
    """Zero-shot bin picking; see the module docstring."""

    name: str = "bin_picking"
    version: str = "1"
    splits: tuple[str, ...] = library.SPLITS
    max_steps: int = 300
    num_objects: int = 3
    variant: str = "any"

    def check_options(self) -> None:
        from divla_eval.errors import DivlaEvalError

        if self.variant not in VARIANTS:
            raise DivlaEvalError(
                f"bin_picking variant {self.variant!r} unknown; valid: {', '.join(VARIANTS)}"
            )
        if not 1 <= self.num_objects <= MAX_OBJECTS:
            raise DivlaEvalError(f"bin_picking num_objects must be 1..{MAX_OBJECTS}, got {self.num_objects}")

    def default_episodes(self, split: str) -> int:
        """One episode per object of the split: 102 for unseen, each object featured once."""
        return len(library.objects(split))

    def episode(self, spec: EpisodeSpec) -> BinPickingEpisode:
        return BinPickingEpisode(spec, self.num_objects, self.variant)
