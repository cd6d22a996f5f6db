"""What every task provides, and the naming/seeding rule that keeps results reproducible.

An episode is named by (task, split, difficulty, perturbations, episode_index). Its scene seed and the
policy's noise seed are pure functions of the run seed and that name (`episode_seed`), never of the
worker, the env slot or the order in which episodes finish.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class EpisodeSpec:
    task: str
    split: str
    episode_index: int
    run_seed: int = 0
    difficulty: str | None = None
    perturbations: tuple[tuple[str, int], ...] = ()

    @property
    def key(self) -> str:
        pert = "+".join(f"{n}:{lvl}" for n, lvl in self.perturbations) or "none"
        return f"{self.task}/{self.split}/{self.difficulty or '-'}/{pert}/{self.episode_index:05d}"

    @property
    def control_key(self) -> str:
        """The key of the same episode without perturbations (its matched control)."""
        return f"{self.task}/{self.split}/{self.difficulty or '-'}/none/{self.episode_index:05d}"

    def seed(self, purpose: str = "scene") -> int:
        """A 32-bit seed derived from the run seed, the episode name and what it is for.

        Perturbations are left out of the name on purpose: a perturbed episode has the same scene,
        objects and policy noise as its unperturbed control, so a difference in outcome is the
        perturbation's doing. Perturbation parameters use their own purpose ("perturb:NAME:LEVEL").
        """
        digest = hashlib.sha256(f"{self.run_seed}|{self.control_key}|{purpose}".encode()).digest()
        return int.from_bytes(digest[:4], "little")


@dataclass
class Evaluation:
    success: bool
    partial_score: float
    """Fraction of the task done (for multi-object tasks); equals float(success) for single-goal ones."""


@dataclass
class ExpertAction:
    action: np.ndarray
    reasoning: str
    """The phrase a VLM should produce at this step ("grasp the blue toy car")."""


class TaskEpisode(ABC):
    """One concrete episode of a task: its scene, instruction, success rule and scripted expert."""

    spec: EpisodeSpec
    instruction: str
    object_ids: list[str]
    builder: object
    """A `divla_eval.envs.tabletop.SceneBuilder`."""

    @abstractmethod
    def evaluate(self, env) -> Evaluation:
        """Judge the current simulator state (called after every step)."""

    def on_step(self, env) -> None:  # noqa: B027  (optional hook)
        """Track what the failure-mode analysis needs (grasps, lifts ...)."""

    @abstractmethod
    def failure_mode(self, env) -> str:
        """Why an unsuccessful episode failed, from what was tracked and the final state."""

    @abstractmethod
    def expert(self, env) -> ExpertAction:
        """Privileged scripted action for the current state (the one declared exception to
        "policies never see simulator state")."""


@dataclass(frozen=True)
class Task(ABC):
    """A registered task. Docstrings of subclasses have Description / Randomizations / Success."""

    name: str = "task"
    version: str = "1"
    splits: tuple[str, ...] = ()
    difficulties: tuple[str | None, ...] = (None,)
    max_steps: int = 300
    options: dict = field(default_factory=dict)
    robots: tuple[str, ...] = ("Panda",)
    """robosuite robot names; two for bimanual tasks (side by side, robot 0 on the right)."""
    embodiment: str = "panda"
    """Told to policies with every observation; a new embodiment gets its own output head in DiVLA."""

    @abstractmethod
    def episode(self, spec: EpisodeSpec) -> TaskEpisode: ...

    def spec(
        self,
        split: str,
        episode_index: int,
        run_seed: int = 0,
        difficulty: str | None = None,
        perturbations: tuple[tuple[str, int], ...] = (),
    ) -> EpisodeSpec:
        """The name (and so the seeds) of episode `episode_index` of this task."""
        return EpisodeSpec(self.name, split, episode_index, run_seed, difficulty, tuple(perturbations))

    def max_steps_for(self, split: str, difficulty: str | None = None) -> int:
        """Step budget of an episode of `split` at `difficulty` (tasks whose episodes differ in length
        override this)."""
        return self.max_steps

    def default_episodes(self, split: str) -> int:
        """How many episodes `divla-eval run` plans when --episodes is not given."""
        return 50

    @property
    def default_split(self) -> str:
        """The split used when none is given (`evaluate()`, and `divla-eval run` for a task with one
        default split): unseen where the task has it (the zero-shot test), else its first split."""
        return "unseen" if "unseen" in self.splits else self.splits[0]

    @property
    def default_splits(self) -> tuple[str, ...]:
        """The splits `divla-eval run` evaluates when --split is not given, one run directory each
        (tasks whose splits are parts of one benchmark, like multitask's sub-tasks, name them all)."""
        return (self.default_split,)

    def check_options(self) -> None:  # noqa: B027  (optional hook)
        """Raise DivlaEvalError for option values out of range (tasks override this)."""

    def validate(self, split: str, difficulty: str | None) -> None:
        from divla_eval.errors import DivlaEvalError

        if split not in self.splits:
            raise DivlaEvalError(
                f"unknown split {split!r} for task {self.name}; valid: {', '.join(self.splits)}"
            )
        if difficulty not in self.difficulties:
            if self.difficulties == (None,):
                raise DivlaEvalError(f"task {self.name} has no difficulty levels (got {difficulty!r})")
            valid = ", ".join(str(d) for d in self.difficulties)
            raise DivlaEvalError(f"unknown difficulty {difficulty!r} for task {self.name}; valid: {valid}")
