"""Novel multi-step instructions (DiVLA paper, Sec. 4.4): put objects in the basket in a given order.

Description:
    Four objects lie on the right panel: a watermelon, a lemonade bottle, a ball of blue paper trash
    and a red pepper (primitive-built stand-ins). The instruction names two of them and an order,
    e.g. "first put the lemonade bottle in the basket, then the red pepper". Split `novel` uses
    instruction templates that never appear in split `train` (the one demonstrations are collected
    on), so a policy meets their wording for the first time at evaluation.
Randomizations:
    Episode i asks for ordered pair i mod 12 (every ordered pair of the four objects) with template
    (i div 12) mod the split's template count; positions and yaw on the panel are uniform.
Success:
    Both named objects rest in the basket, the first one entered it before the second, and no other
    object is in it. Partial score: 0.5 per named object placed in its turn.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from divla_eval.envs.layout import TABLE_TOP_Z
from divla_eval.tasks.base import EpisodeSpec, Evaluation, ExpertAction, Task, TaskEpisode
from divla_eval.tasks.bin_picking import BASKET_POS, BASKET_SIZE, in_basket, scene_with_basket

OBJECTS = ("watermelon", "lemonade bottle", "blue paper trash", "red pepper")
PAIRS = tuple(itertools.permutations(range(len(OBJECTS)), 2))  # 12 ordered pairs
TEMPLATES = {
    "train": (
        "put the {a} in the basket, and after that the {b}",
        "move the {a} into the basket, then move the {b} into the basket",
    ),
    "novel": (
        "first put the {a} in the basket, then the {b}",
        "start with the {a}: basket it, and only then the {b}",
        "the {b} goes into the basket after the {a}",
    ),
}
FAILURE_MODES = ("wrong_order", "wrong_object", "incomplete", "timeout")


def build_object(kind: str, sim_name: str):
    """Primitive stand-ins; each gets a grasp hint like the library's objects."""
    from robosuite.models.objects import BallObject, CylinderObject
    from robosuite.models.objects.generated_objects import CompositeObject

    from divla_eval.envs._builders import GraspHint

    if kind == "watermelon":
        obj = BallObject(name=sim_name, size=(0.03,), rgba=(0.15, 0.5, 0.15, 1), density=300)
    elif kind == "lemonade bottle":
        obj = CylinderObject(name=sim_name, size=(0.022, 0.05), rgba=(0.95, 0.9, 0.35, 1), density=300)
    elif kind == "blue paper trash":
        # a crumpled ball: a few overlapping small boxes at odd angles
        quats = [(1, 0, 0, 0), (0.92, 0.38, 0, 0), (0.92, 0, 0.38, 0), (0.92, 0, 0, 0.38)]
        obj = CompositeObject(
            name=sim_name,
            total_size=(0.024, 0.024, 0.022),
            geom_types=["box"] * 4,
            geom_sizes=[(0.016, 0.016, 0.016)] * 4,
            geom_locations=[(0, 0, 0)] * 4,
            geom_quats=quats,
            geom_rgbas=[(0.2, 0.35, 0.85, 1)] * 4,
            density=150,
            locations_relative_to_center=True,
            joints="default",
        )
    elif kind == "red pepper":
        obj = CompositeObject(
            name=sim_name,
            total_size=(0.045, 0.022, 0.022),
            geom_types=["capsule", "cylinder"],
            geom_sizes=[(0.02, 0.02), (0.004, 0.008)],
            geom_locations=[(-0.004, 0, 0), (0.036, 0, 0)],
            geom_quats=[(0.7071068, 0, 0.7071068, 0)] * 2,
            geom_rgbas=[(0.8, 0.08, 0.05, 1), (0.2, 0.5, 0.1, 1)],
            density=300,
            locations_relative_to_center=True,
            joints="default",
        )
    else:
        raise ValueError(kind)
    # The round ones may be grasped from any side: the expert closes the fingers along the line
    # clearest of the others (the hand spans ~10 cm each way along it; closing towards the tall
    # bottle stopped the descent 3 cm short of the watermelon, novel episodes 45 and 69).
    obj.grasp_hint = GraspHint(close_axis="y" if kind == "red pepper" else "free")
    return obj


@dataclass
class _Builder:
    key: str = "novel_instruction:v1"

    def build(self):
        return scene_with_basket([build_object(k, f"obj{i}") for i, k in enumerate(OBJECTS)])


class NovelInstructionEpisode(TaskEpisode):
    def __init__(self, spec: EpisodeSpec):
        self.spec = spec
        self.first, self.second = PAIRS[spec.episode_index % len(PAIRS)]
        templates = TEMPLATES[spec.split]
        self.template = (spec.episode_index // len(PAIRS)) % len(templates)
        self.instruction = templates[self.template].format(a=OBJECTS[self.first], b=OBJECTS[self.second])
        self.object_ids = [OBJECTS[self.first], OBJECTS[self.second]]
        self.builder = _Builder()
        self.entered: list[int] = []  # objects in the order they first came to rest in the basket
        self._experts: list = []
        self.extra = {"template": f"{spec.split}-{self.template}", "order": list(self.object_ids)}

    def _resting_in_basket(self, env, i: int) -> bool:
        return (
            in_basket(env.object_positions()[i])
            and np.linalg.norm(env.object_velocity(i)) < 0.05
            and not env.grasping(i)
        )

    def on_step(self, env) -> None:
        for i in range(len(OBJECTS)):
            if i not in self.entered and self._resting_in_basket(env, i):
                self.entered.append(i)

    def evaluate(self, env) -> Evaluation:
        inside = [i for i in range(len(OBJECTS)) if in_basket(env.object_positions()[i])]
        score = 0.0
        if self.entered[:1] == [self.first]:
            score += 0.5
            if self.entered[:2] == [self.first, self.second]:
                score += 0.5
        success = score == 1.0 and sorted(inside) == sorted([self.first, self.second])
        return Evaluation(
            success=bool(success and self._resting_in_basket(env, self.second)), partial_score=score
        )

    def failure_mode(self, env) -> str:
        if any(i not in (self.first, self.second) for i in self.entered):
            return "wrong_object"
        if self.second in self.entered and (
            self.first not in self.entered or self.entered.index(self.second) == 0
        ):
            return "wrong_order"
        if any(env.grasping(i) for i in range(len(OBJECTS))):
            return "timeout"
        return "incomplete"

    def expert(self, env) -> ExpertAction:
        from divla_eval.tasks.pick_place_expert import PickPlaceExpert

        if not self._experts:
            release_z = TABLE_TOP_Z + BASKET_SIZE[2] + 0.09
            # release the two objects apart in the basket so the second does not land on the first
            goals = [(BASKET_POS[0] - 0.04, BASKET_POS[1]), (BASKET_POS[0] + 0.04, BASKET_POS[1])]
            self._experts = [
                PickPlaceExpert(obj_index=i, goal_xy=g, release_z=release_z)
                for i, g in zip((self.first, self.second), goals, strict=True)
            ]
        stage = 0 if not self._experts[0].done else 1
        expert = self._experts[stage]
        action = expert.act(env)
        name = OBJECTS[expert.obj_index]
        if expert.phase == "approach":
            reasoning = f"the {'first' if stage == 0 else 'next'} object is the {name}"
        elif expert.phase in ("descend", "close", "lift"):
            reasoning = f"grasp the {name}"
        elif expert.phase in ("carry", "lower", "release"):
            reasoning = "place it in the basket"
        elif stage == 0:
            reasoning = f"the next object is the {OBJECTS[self.second]}"
        else:
            reasoning = "the task is done"
        return ExpertAction(action=action, reasoning=reasoning)


@dataclass(frozen=True)
class NovelInstruction(Task):
    """Ordered multi-step instructions; see the module docstring."""

    name: str = "novel_instruction"
    version: str = "3"  # 2: round objects grasped along the line clearest of the others; 3: with the
    # least wrist turn among the clear ones
    splits: tuple[str, ...] = ("novel", "train")
    max_steps: int = 420
    options: dict = field(default_factory=dict)

    def default_episodes(self, split: str) -> int:
        """Every ordered pair with every template of the split once (36 novel, 24 train)."""
        return len(PAIRS) * len(TEMPLATES[split])

    def episode(self, spec: EpisodeSpec) -> NovelInstructionEpisode:
        return NovelInstructionEpisode(spec)
