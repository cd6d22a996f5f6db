"""Named experiments as data: `divla-eval experiment NAME --stage STAGE`.

An experiment is everything behind a row of results: the demonstrations to collect (`Demos`), the
policy and its training options (`Training`), the evaluation cells (`Cell`) and the visual conditions
(`Condition`) they are run again under. Each is a frozen dataclass, registered by name in
`EXPERIMENTS` next to its definition; `divla-eval experiment ls` lists them. The reference scripts
(`scripts/*.sh`) used to spell this out in bash arrays, environment variables and directory-name
suffixes; they are now one-line wrappers around this command.

Stages, in the order an experiment runs them (each experiment has the ones its fields call for):

- collect: `divla-eval collect` for each demonstration file;
- train: `divla-eval train` on all of them, then, for a fixed-budget training, the fp16 copy in
  `checkpoints/` (`scripts/ship_checkpoint.py`) that evaluation reads (so `eval` never reads a copy
  older than the training);
- eval: `divla-eval run` and `divla-eval report` for each cell;
- eval-visual: the same cells again under each visual condition;
- curve: `divla-eval curve` over a training's snapshots;
- ship (learning curves): the last snapshot as the fp16 copy, with the whole run's training log.

Every stage resumes because the commands under it do: rerunning finishes what an interrupted run left.

Names. `path` is the one function that names an experiment's training run, shipped checkpoint,
result directories and curve folder, by filling in the experiment's `Layout` templates. The layouts
reproduce the names the scripts gave (`-7k` for the baselines' equal budget, `-noinj` for the ablation,
`bp-v2-s8a1` and `-v2` for the first DiVLA runs), so every directory already under runs/,
checkpoints/ and results/ resumes unchanged (tests/test_experiments.py pins them). Overrides
(`--episodes`, `--steps`, ...) never change a name: a larger `--episodes` extends the same run.

Why each step is a subprocess (`sys.executable -m divla_eval.cli ...`) rather than the in-process
functions: the commands are exactly those `--dry-run` prints, and each step gets a fresh process as it
did under the scripts: one MuJoCo renderer per process (DESIGN.md), torch's thread count set once per
process, a training's memory returned before evaluation starts, and each command's own Ctrl-C /
SIGTERM handling (what finished is kept, exit 130), to which a SIGTERM sent to this process is passed.

Paths are relative to the working directory, which must be the repository root (where data/, runs/,
checkpoints/, results/ and scripts/ are).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from divla_eval.errors import DivlaEvalError
from divla_eval.options import positive_int as _positive_int
from divla_eval.registry import Registry
from divla_eval.tasks.multitask import SUBTASKS

STAGES = ("collect", "train", "curve", "ship", "eval", "eval-visual")
"""Every stage name, in the order an experiment runs the ones it has (ship before eval: a model trained
with snapshots is evaluated from its shipped copy)."""
BASELINES = ("openvla", "octo", "diffusion_policy")
TRAINED_POLICIES = ("divla", "diffusion_policy", "openvla", "octo")
SHIP_SCRIPT = "scripts/ship_checkpoint.py"


# --- the parts of an experiment ------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """Perturbations a cell is run under; `name` is its part of a run directory's name."""

    name: str
    perturb: tuple[str, ...]
    """`--perturb` values, e.g. ("distractors:3",)."""
    matched_control: bool = False
    """Also run each episode unperturbed (`--matched-control`)."""

    def args(self) -> list[str]:
        out = [arg for p in self.perturb for arg in ("--perturb", p)]
        return out + ["--matched-control"] if self.matched_control else out


def level3(perturbation: str, matched_control: bool = False) -> Condition:
    """One perturbation at its highest level, named like `distractors3`."""
    return Condition(f"{perturbation}3", (f"{perturbation}:3",), matched_control)


VISUAL_CONDITIONS = tuple(level3(p) for p in ("distractors", "background", "lighting"))
"""The paper's visual-generalisation conditions, each at level 3."""


@dataclass(frozen=True)
class Cell:
    """One evaluation run: a task's split (and difficulty), optionally under a condition."""

    task: str
    split: str
    difficulty: str | None = None
    episodes: int | None = None
    """None: the experiment's `episodes`, else the task's own number."""
    condition: Condition | None = None

    @property
    def name(self) -> str:
        """The cell's part of a run directory's name, e.g. `hard-mixed`, `unseen`, `flip_pot`."""
        return self.split if self.difficulty is None else f"{self.difficulty}-{self.split}"

    @property
    def label(self) -> str:
        """The name with its condition, e.g. `flip_pot-distractors3`."""
        return self.name if self.condition is None else f"{self.name}-{self.condition.name}"


@dataclass(frozen=True)
class Demos:
    """One demonstrations file, collected by the scripted expert."""

    task: str
    split: str
    episodes: int
    file: str
    difficulty: str | None = None


@dataclass(frozen=True)
class Training:
    """`divla-eval train` options (batch 32, lr 3e-4, seed 0: train's defaults)."""

    steps: int = 7000
    schedule: str = "cosine"
    decay_steps: int = 0
    """schedule "wsd": the final decay's steps."""
    init_from: str = ""
    """A constant-lr training run to start from (`train --init-from`): a decay branched off it."""
    snapshot_every: int = 0
    """>0: keep snapshots for a learning curve; the `ship` stage then ships the last one."""
    threads: int = 1
    """One torch thread: the references train beside other jobs on 2 cores."""
    model_options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Layout:
    """Templates of an experiment's paths, filled in by `path` with {policy}, {task}, {tag} and, for a
    result directory, {cell} and {condition} (`-distractors3`, or empty). Empty: the experiment has
    none of that kind."""

    train: str = ""
    checkpoint: str = ""
    result: str = ""
    curve: str = ""


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    """One line, for `divla-eval experiment ls`."""
    policy: str
    layout: Layout
    task: str = ""
    """The task trained on (and in names); the cells name their own."""
    tag: str = ""
    """The training's short name in the layout's templates."""
    demos: tuple[Demos, ...] = ()
    training: Training | None = None
    cells: tuple[Cell, ...] = ()
    """Evaluated by `eval` (or by `curve`, for a learning curve)."""
    conditions: tuple[Condition, ...] = ()
    """`eval-visual`: the cells named in `visual_cells` (all when empty) under each of these."""
    visual_cells: tuple[str, ...] = ()
    episodes: int | None = None
    """Episodes per cell when a cell does not say; None: the task's own (bin picking: every object)."""
    workers: int = 2
    curve_every: int = 1
    curve_episodes: int = 20
    """`curve`: episodes per cell and snapshot (the same seeds for every snapshot)."""
    summary: str = ""
    """A folder to run `divla-eval summary` on after `eval`."""
    rates_table: str = ""
    """A markdown file that `collect` writes each collection's demos-per-hour line into."""

    @property
    def stages(self) -> tuple[str, ...]:
        has = {
            "collect": bool(self.demos),
            "train": self.training is not None,
            "eval": bool(self.cells and self.layout.result),
            "eval-visual": bool(self.conditions and self.layout.result),
            "curve": bool(self.layout.curve),
            "ship": self.training is not None and self.training.snapshot_every > 0,
        }
        return tuple(s for s in STAGES if has[s])


def path(exp: Experiment, kind: str, cell: Cell | None = None) -> str:
    """The path of an experiment's `kind` (train, checkpoint, result, curve): the one function that
    names run directories and checkpoints. `result` takes the cell (with its condition)."""
    template = getattr(exp.layout, kind)
    if not template:
        raise DivlaEvalError(f"experiment {exp.name} has no {kind} directory")
    fields = {"policy": exp.policy, "task": exp.task, "tag": exp.tag}
    if kind == "result":
        if cell is None:
            raise ValueError("a result directory needs its cell")
        condition = f"-{cell.condition.name}" if cell.condition is not None else ""
        fields |= {"task": cell.task, "cell": cell.name, "condition": condition}
    return template.format(**fields)


# --- the registry and the definitions ------------------------------------------------------------

EXPERIMENTS: Registry[Experiment] = Registry("experiment")


def register(exp: Experiment) -> Experiment:
    EXPERIMENTS.register(exp.name, exp, description=exp.description)
    return exp


@dataclass(frozen=True)
class TaskRecipe:
    """What every policy of a task trains on and is scored on (DiVLA, the baselines, random), so that
    the rows of a paper table compare: the demonstrations, the cells, episodes per cell, the tag of
    the task's training runs."""

    task: str
    tag: str
    demos: tuple[Demos, ...]
    cells: tuple[Cell, ...]
    episodes: int | None = 100


TASK_RECIPES = {
    "bin_picking": TaskRecipe(
        "bin_picking",
        "bp-v2",
        (Demos("bin_picking", "seen", 300, "data/bin_picking-seen-300-v2.hdf5"),),
        (Cell("bin_picking", "unseen"),),
        episodes=None,  # all 102 unseen objects
    ),
    "multitask": TaskRecipe(  # 60 demos per sub-task: 300, as for bin picking
        "multitask",
        "multitask",
        tuple(Demos("multitask", s, 60, f"data/multitask-{s}-60.hdf5") for s in SUBTASKS),
        tuple(Cell("multitask", s) for s in SUBTASKS),
    ),
    "sorting": TaskRecipe(
        "sorting",
        "sorting",
        tuple(Demos("sorting", "seen", 150, f"data/sorting-{d}-seen-150.hdf5", d) for d in ("easy", "hard")),
        tuple(Cell("sorting", s, d) for d in ("easy", "hard") for s in ("seen", "mixed")),
    ),
    "bussing": TaskRecipe(
        "bussing",
        "bussing",
        (Demos("bussing", "seen", 300, "data/bussing-seen-300.hdf5"),),
        (Cell("bussing", "seen"), Cell("bussing", "mixed")),
    ),
}

# alpha 1 (not the paper's 10) and 8 noise draws per observation: docs/divla.md, "The model"
DIVLA_OPTIONS = (("diffusion_samples", "8"), ("alpha", "1.0"))
NO_INJECTION = (("reasoning_injection", "false"),)  # TinyVLA's head: no FiLM from the reasoning

# DiVLA's own experiments: runs/train/divla-TAG, checkpoints/divla-TAG, results/divla/TAG-CELL...
REFERENCE = Layout(
    train="runs/train/{policy}-{tag}",
    checkpoint="checkpoints/{policy}-{tag}",
    result="results/{policy}/{tag}-{cell}{condition}",
)
# The first DiVLA model, on bin picking, predates that scheme: its training run names the recipe
# (bp-v2: the second demo set; s8a1: 8 noise draws, alpha 1), its results the model after the cell.
DIVLA_BIN_PICKING = Layout(
    train="runs/train/{policy}-bp-v2-s8a1",
    checkpoint="checkpoints/{policy}-{task}",
    result="results/{policy}/{task}-{cell}-v2{condition}",
)
DIVLA_BIN_PICKING_NOINJ = Layout(
    train="runs/train/{policy}-bp-v2-s8a1-noinj",
    checkpoint="checkpoints/{policy}-{task}-noinj",
    result="results/{policy}/{task}-{cell}-noinj{condition}",
)
# The baselines, at DiVLA's budget of 7000 steps (-7k), on the same demos and cells.
BASELINE = Layout(
    train="runs/train/{policy}-{tag}-7k",
    checkpoint="checkpoints/{policy}-{tag}",
    result="results/{policy}/{task}-{cell}{condition}-7k",
)
UNTRAINED = Layout(result="results/{policy}/{task}-{cell}{condition}")
EXPERTS = Layout(result="results/experts/{task}-{cell}{condition}")
CURVE = Layout(
    train="runs/train/{policy}-{task}-curve",
    checkpoint="checkpoints/{policy}-{task}-v2",
    curve="results/curves/{policy}-{task}",
)
# A learning curve of a recipe variant (tag: what changed), beside the policy's own curve.
CURVE_VARIANT = Layout(
    train="runs/train/{policy}-{task}-{tag}-curve",
    checkpoint="checkpoints/{policy}-{task}-{tag}-v2",
    curve="results/curves/{policy}-{task}-{tag}",
)
# A learning-rate decay branched off a learning curve's constant-lr run (tag: wsd + its total steps):
# a point of the curve (`curve`), and a final model scored like every other row of the tables (`eval`).
DECAY = Layout(
    train="runs/train/{policy}-{task}-{tag}",
    checkpoint="checkpoints/{policy}-{task}-{tag}",
    result="results/{policy}/{task}-{cell}{condition}-{tag}",
    curve="results/curves/{policy}-{task}-{tag}",
)

_BP = TASK_RECIPES["bin_picking"]
register(
    Experiment(
        "divla-bin_picking",
        "the shipped DiVLA reference (checkpoints/divla-bin_picking): 300 seen-object demos, 7000 steps; "
        "the 102 unseen and 52 seen objects; eval-visual: unseen under the visual conditions",
        "divla",
        DIVLA_BIN_PICKING,
        task="bin_picking",
        demos=_BP.demos,
        training=Training(model_options=DIVLA_OPTIONS),
        cells=(*_BP.cells, Cell("bin_picking", "seen")),
        conditions=VISUAL_CONDITIONS,
        visual_cells=("unseen",),
        episodes=None,
    )
)
register(
    Experiment(
        "divla-bin_picking-noinj",
        "the reasoning-injection ablation on bin picking: divla-bin_picking's recipe with "
        "reasoning_injection=false; unseen objects, unperturbed and under the visual conditions",
        "divla",
        DIVLA_BIN_PICKING_NOINJ,
        task="bin_picking",
        demos=_BP.demos,
        training=Training(model_options=DIVLA_OPTIONS + NO_INJECTION),
        cells=_BP.cells,
        conditions=VISUAL_CONDITIONS,
        episodes=None,
    )
)

_DIVLA_TASKS = {
    "multitask": "DiVLA on the five Franka sub-tasks, one model (5 x 60 demos, 7000 steps), 100 episodes "
    "per sub-task",
    "sorting": "DiVLA on factory sorting (150 easy + 150 hard seen demos, 7000 steps), easy/hard x "
    "seen/mixed",
    "bussing": "DiVLA on bimanual bussing (300 seen demos, 7000 steps), seen and mixed",
}
for _task, _text in _DIVLA_TASKS.items():
    _recipe = TASK_RECIPES[_task]
    for _noinj in (False, True):
        _tag = f"{_task}-noinj" if _noinj else _task
        register(
            Experiment(
                f"divla-{_tag}",
                _text + (" (without reasoning injection: the ablation)" if _noinj else ""),
                "divla",
                REFERENCE,
                task=_task,
                tag=_tag,
                demos=_recipe.demos,
                training=Training(model_options=DIVLA_OPTIONS + (NO_INJECTION if _noinj else ())),
                cells=_recipe.cells,
                conditions=VISUAL_CONDITIONS if _task == "multitask" else (),
                episodes=_recipe.episodes,
            )
        )

for _task, _recipe in TASK_RECIPES.items():
    for _policy in BASELINES:
        register(
            Experiment(
                f"{_policy}-{_task}",
                f"{_policy} at DiVLA's budget on {_task} (the same demos, 7000 steps, the same cells)",
                _policy,
                BASELINE,
                task=_task,
                tag=_recipe.tag,
                demos=_recipe.demos,
                training=Training(),
                cells=_recipe.cells,
                conditions=VISUAL_CONDITIONS,
                episodes=_recipe.episodes,
            )
        )
    register(
        Experiment(
            f"random-{_task}",
            f"the random policy, the lower bound, on {_task}'s cells",
            "random",
            UNTRAINED,
            task=_task,
            cells=_recipe.cells,
            conditions=VISUAL_CONDITIONS,
            episodes=_recipe.episodes,
        )
    )

for _policy in TRAINED_POLICIES:
    register(
        Experiment(
            f"{_policy}-multitask-curve",
            f"learning curve of {_policy} on multitask: 5 x 200 demos, 70000 steps at a constant lr, a "
            "snapshot every 5000 evaluated on 20 episodes per sub-task",
            _policy,
            CURVE,
            task="multitask",
            demos=tuple(Demos("multitask", s, 200, f"data/multitask-{s}-200.hdf5") for s in SUBTASKS),
            training=Training(
                steps=70000,
                schedule="constant",  # the snapshot at step s is the model an s-step run would make
                snapshot_every=5000,
                model_options=DIVLA_OPTIONS if _policy == "divla" else (),
            ),
            cells=TASK_RECIPES["multitask"].cells,
            workers=1,
        )
    )


# DiVLA learns far more slowly per step than Diffusion Policy on the same demos, and open loop its
# errors exceed Diffusion Policy's most where to reach (y), which only the images tell, and its actions
# hardly change when it is shown another scene's images. Each variant below changes one thing about
# how the images reach the model (docs/curves.md, "Why DiVLA learns slowly"): tag -> (the question,
# the model options added to the curve's).
DIVLA_VARIANTS = {
    "convstem": (
        "a convolutional stem in front of its SigLIP encoder (vision_stem=conv, the hybrid ViT): is the "
        "linear patch embedding what slows the from-scratch model down?",
        (("vision_stem", "conv"),),
    ),
    "wrist36": (
        "the wrist view's whole 6x6 patch grid instead of the paper's 16 pooled tokens "
        "(view_tokens=[36,36]): does pooling the wrist view cost the grasp its precision?",
        (("view_tokens", "[36,36]"),),
    ),
    "viscond": (
        "every visual token also fed straight to the action head (visual_condition_dim=8; not the "
        "paper's design): does the head learn to use the images once it has a direct path to them?",
        (("visual_condition_dim", "8"),),
    ),
    "viscond-dec": (
        "the decoder's last hidden states at every visual position fed to the action head "
        "(visual_condition_dim=8, visual_condition_source=decoder: the VLM's output embeddings, as "
        "TinyVLA's and DexVLA's heads read them, unpooled): the viscond test on the paper's side of the VLM",
        (("visual_condition_dim", "8"), ("visual_condition_source", "decoder")),
    ),
    "merge": (
        "7-pixel patches (a 12x12 grid per view) merged into the same 36 and 16 tokens by "
        "concatenation, as Qwen2-VL's PatchMerger (patch_size=7, token_merge=concat), where the "
        "reference averages a 6x6 grid of 14-pixel patches: can the encoder then say where a small "
        "object lies?",
        (("patch_size", "7"), ("token_merge", "concat")),
    ),
    "alpha01": (
        "the reasoning loss weighted 0.1 instead of 1 (alpha=0.1; the paper's is 10): at alpha 1 the "
        "phrase's loss sends the vision encoder 20-40x the gradient the actions' loss does "
        "(scripts/gradients.py). Does an encoder trained mostly by the actions learn where things are?",
        (("alpha", "0.1"),),
    ),
    "keypoints": (
        "Diffusion Policy's image encoder per camera (a small ResNet ending in 32 spatial-softmax "
        "keypoints) fed straight to the action head beside the action tokens (keypoint_condition=32; "
        "not the paper's design): the probe finds the from-scratch SigLIP never learns where the cube "
        "is, and Diffusion Policy's condition does. Does DiVLA, which also reads the instruction, then "
        "learn as Diffusion Policy does?",
        (("keypoint_condition", "32"),),
    ),
    "keypoints-noinj": (
        "the keypoints variant without the reasoning injection (keypoint_condition=32, "
        "reasoning_injection=false: TinyVLA's head): the paper's ablation, on the recipe that learns. "
        "Does FiLM from the phrase help?",
        (("keypoint_condition", "32"), ("reasoning_injection", "false")),
    ),
}
# Octo reads the images through its own from-scratch stem and transformer, and its readout loses where
# the objects are (scripts/probe.py): the same test as DiVLA's keypoints variant.
OCTO_VARIANTS = {
    "keypoints": (
        "Diffusion Policy's image encoder on each camera's latest image (32 spatial-softmax keypoints) "
        "fed straight to the diffusion head beside the readout (keypoint_condition=32; not Octo's "
        "design): does Octo learn once the head has a direct path to where things are, as DiVLA did?",
        (("keypoint_condition", "32"),),
    ),
}
# OpenVLA shares DiVLA's from-scratch SigLIP, and has no action head to feed keypoints to: they enter as
# visual tokens.
OPENVLA_VARIANTS = {
    "keypoints": (
        "one Diffusion Policy keypoint token per camera (32 spatial-softmax keypoints projected to the "
        "decoder's width) after the SigLIP tokens (keypoint_token_points=32; not OpenVLA's design): does "
        "OpenVLA learn once it is told where things are, as DiVLA did?",
        (("keypoint_token_points", "32"),),
    ),
}
for _policy, _variants in (("divla", DIVLA_VARIANTS), ("octo", OCTO_VARIANTS), ("openvla", OPENVLA_VARIANTS)):
    _curve = EXPERIMENTS.get(f"{_policy}-multitask-curve")
    for _tag, (_question, _options) in _variants.items():
        register(
            replace(
                _curve,
                name=f"{_policy}-multitask-{_tag}-curve",
                description=f"learning curve of {_policy} with {_question} Same demos, steps and grid "
                f"as {_curve.name}",
                layout=CURVE_VARIANT,
                tag=_tag,
                training=replace(  # a variant's option replaces the reference's of the same name
                    _curve.training,
                    model_options=tuple({**dict(_curve.training.model_options), **dict(_options)}.items()),
                ),
            )
        )


# The decays measured so far: (policy, total steps); the last `DECAY_STEPS` of them decay. Each starts
# from the learning curve's shipped snapshot (`ship` stage), weights only: the constant run's runs/
# directory, with its optimiser state, does not survive the machine, the shipped copy does.
DECAY_STEPS = 5000
DECAYS = (("diffusion_policy", 35000),)
for _policy, _steps in DECAYS:
    _curve_exp = EXPERIMENTS.get(f"{_policy}-multitask-curve")
    register(
        Experiment(
            f"{_policy}-multitask-wsd{_steps // 1000}k",
            f"{_policy}'s learning curve with its lr decayed linearly to 0 over steps "
            f"{_steps - DECAY_STEPS}-{_steps} (a wsd branch, started from the curve's shipped snapshot "
            f"{path(_curve_exp, 'checkpoint')} with a fresh optimiser)",
            _policy,
            DECAY,
            task="multitask",
            tag=f"wsd{_steps // 1000}k",
            demos=_curve_exp.demos,
            training=replace(
                _curve_exp.training,
                steps=_steps,
                schedule="wsd",
                decay_steps=DECAY_STEPS,
                init_from=path(_curve_exp, "checkpoint"),
            ),
            cells=_curve_exp.cells,
            conditions=VISUAL_CONDITIONS,
            episodes=TASK_RECIPES["multitask"].episodes,
            workers=1,
        )
    )


ALL_VISUAL = Condition("visual3", tuple(f"{p}:3" for p in ("background", "lighting", "camera", "table")))
"""The four visual perturbations composed in one run (the expert grid's costlier tasks)."""


def _expert_cells() -> tuple[Cell, ...]:
    """The scripted expert's grid over every task but sorting. Distractors change the physics, so
    they run with a matched control (the unperturbed cell too); the other perturbations only change
    pixels, which the expert never reads: run one at a time where cheap, composed for bussing."""
    distractors = level3("distractors", matched_control=True)
    cells = [Cell("bussing", s, episodes=50, condition=distractors) for s in ("seen", "mixed")]
    cells += [Cell("multitask", s, episodes=50, condition=distractors) for s in SUBTASKS]
    # 72 = each of the 36 held-out instructions twice, with different object layouts
    cells += [
        Cell("novel_instruction", "novel", episodes=72, condition=distractors),
        Cell("bin_picking", "unseen", episodes=102, condition=distractors),
        Cell("bin_picking", "seen", episodes=52, condition=distractors),
    ]
    for pert in ("background", "lighting", "camera", "table"):
        cond = level3(pert)
        cells += [Cell("bin_picking", s, episodes=50, condition=cond) for s in ("unseen", "seen")]
        cells += [Cell("multitask", s, episodes=50, condition=cond) for s in SUBTASKS]
        cells.append(Cell("novel_instruction", "novel", episodes=72, condition=cond))
    cells += [Cell("bussing", s, episodes=50, condition=ALL_VISUAL) for s in ("seen", "mixed")]
    # the split demonstrations are collected on (its 24 instructions, three layouts each)
    cells += [
        Cell("novel_instruction", "train", episodes=72, condition=distractors),
        Cell("novel_instruction", "train", episodes=72, condition=ALL_VISUAL),
    ]
    return tuple(cells)


_SORTING_GRID = tuple((d, s) for d in ("easy", "hard") for s in ("seen", "unseen", "mixed"))
register(
    Experiment(
        "experts",
        "the scripted expert's reference grid (every task but sorting) under each perturbation at "
        "level 3; then results/experts/summary.md",
        "scripted",
        EXPERTS,
        cells=_expert_cells(),
        workers=1,
        summary="results/experts",
    )
)
register(
    Experiment(
        "experts-sorting",
        "the scripted expert's reference grid on sorting (easy/hard x seen/unseen/mixed), distractors and "
        "the four visual perturbations composed; then results/experts/summary.md",
        "scripted",
        EXPERTS,
        cells=tuple(
            Cell("sorting", s, d, episodes=50, condition=c)
            for c in (level3("distractors", matched_control=True), ALL_VISUAL)
            for d, s in _SORTING_GRID
        ),
        workers=1,
        summary="results/experts",
    )
)

_RATE_SPLITS = (
    ("bin_picking", "seen", None),
    ("sorting", "seen", "easy"),
    ("sorting", "seen", "hard"),
    *(("multitask", s, None) for s in SUBTASKS),
    ("bussing", "seen", None),
    ("novel_instruction", "train", None),
)
register(
    Experiment(
        "demo-rates",
        "expert demonstrations per hour for every task (10 each, one worker; --episodes N), into "
        "results/demo_rates.md; delete data/rates/ to measure again",
        "scripted",
        Layout(),
        demos=tuple(
            Demos(t, s, 10, f"data/rates/{t}-{s}{'-' + d if d else ''}.hdf5", d) for t, s, d in _RATE_SPLITS
        ),
        workers=1,
        rates_table="results/demo_rates.md",
    )
)


# --- from an experiment to commands --------------------------------------------------------------


@dataclass(frozen=True)
class Overrides:
    """Command-line overrides; none of them changes a name."""

    cells: tuple[str, ...] = ()
    episodes: int | None = None
    workers: int | None = None
    threads: int | None = None
    steps: int | None = None
    curve_every: int | None = None
    init_from: str | None = None
    """train: where a training whose run directory was lost starts from (`train --init-from`: a
    saved policy such as the shipped copy, or a run); replaces the experiment's own. A training that
    has its own checkpoint resumes from it and ignores this."""


@dataclass(frozen=True)
class Step:
    """One command: `divla-eval ...`, `python SCRIPT ...` or `cp SRC DST`, as `--dry-run` prints it."""

    command: tuple[str, ...]
    rate_row: str = ""
    """For demo-rates: the table row's task label; the command's demos/hour line is kept."""

    def __str__(self) -> str:
        return shlex.join(self.command)


def select_cells(exp: Experiment, names: Iterable[str]) -> tuple[Cell, ...]:
    """The experiment's cells named in `names` (a cell's name, e.g. `easy-seen`, or with its
    condition, `flip_pot-distractors3`), in the experiment's order; an unknown name is refused with
    the valid ones."""
    names = tuple(names)
    if not names:
        return exp.cells
    if not exp.cells:
        raise DivlaEvalError(f"--cells: experiment {exp.name} has no evaluation cells")
    valid = list(dict.fromkeys(n for c in exp.cells for n in (c.name, c.label)))
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise DivlaEvalError(
            f"--cells {' '.join(unknown)}: not a cell of experiment {exp.name}; valid: {', '.join(valid)}"
        )
    return tuple(c for c in exp.cells if c.name in names or c.label in names)


def _episodes(exp: Experiment, cell: Cell, o: Overrides) -> int | None:
    return o.episodes or cell.episodes or exp.episodes


def train_command(exp: Experiment, o: Overrides) -> tuple[str, ...]:
    t = exp.training
    assert t is not None
    cmd = ["divla-eval", "train", "--policy", exp.policy, "--task", exp.task]
    cmd += [arg for d in exp.demos for arg in ("--demos", d.file)]
    cmd += ["--out", path(exp, "train"), "--steps", str(o.steps or t.steps)]
    if t.schedule != "cosine":
        cmd += ["--schedule", t.schedule]
    if t.decay_steps:
        cmd += ["--decay-steps", str(t.decay_steps)]
    source = o.init_from or t.init_from
    if source:
        cmd += ["--init-from", source]
    if t.snapshot_every:
        cmd += ["--snapshot-every", str(t.snapshot_every)]
    cmd += ["--threads", str(o.threads or t.threads), "--no-progress"]
    cmd += [arg for k, v in t.model_options for arg in ("--model-option", f"{k}={v}")]
    return tuple(cmd)


def last_snapshot(exp: Experiment) -> str | None:
    """The training's last snapshot directory, or None when it has none yet."""
    found = sorted(Path(path(exp, "train"), "snapshots").glob("step-*"))
    return str(found[-1]) if found else None


def _collect(exp: Experiment, o: Overrides) -> list[Step]:
    steps = []
    for d in exp.demos:
        # --episodes is per evaluation cell; an experiment that evaluates nothing sizes its demos by it
        episodes = o.episodes if (o.episodes and not exp.cells) else d.episodes
        cmd = ["divla-eval", "collect", "--task", d.task, "--split", d.split]
        cmd += ["--difficulty", d.difficulty] if d.difficulty else []
        cmd += ["--episodes", str(episodes), "--out", d.file]
        cmd += ["--workers", str(o.workers or exp.workers), "--no-progress"]
        label = f"{d.task} {d.difficulty}" if d.difficulty else d.task
        steps.append(Step(tuple(cmd), rate_row=label if exp.rates_table else ""))
    return steps


def _train(exp: Experiment, o: Overrides) -> list[Step]:
    train = train_command(exp, o)
    steps = [Step(train)]
    if not exp.training.snapshot_every:  # ship what was trained: eval reads the shipped copy
        train_dir, shipped = path(exp, "train"), path(exp, "checkpoint")
        steps.append(Step(("python", SHIP_SCRIPT, train_dir, shipped, "--command", shlex.join(train))))
    return steps


def _ship(exp: Experiment, o: Overrides) -> list[Step]:
    train, shipped = path(exp, "train"), path(exp, "checkpoint")
    last = last_snapshot(exp) or f"{train}/snapshots/step-<last>"
    record = f"{shlex.join(train_command(exp, o))} (snapshot {Path(last).name})"
    return [
        Step(("python", SHIP_SCRIPT, last, shipped, "--command", record)),
        # the whole run's losses, for the record (a snapshot holds none)
        Step(("cp", f"{train}/train_log.jsonl", f"{shipped}/train_log.jsonl")),
    ]


def _evaluate(exp: Experiment, cells: Iterable[Cell], o: Overrides) -> list[Step]:
    steps = []
    for cell in cells:
        out = path(exp, "result", cell)
        cmd = ["divla-eval", "run", "--task", cell.task, "--split", cell.split]
        cmd += ["--difficulty", cell.difficulty] if cell.difficulty else []
        cmd += ["--policy", exp.policy]
        cmd += ["--checkpoint", path(exp, "checkpoint")] if exp.layout.checkpoint else []
        episodes = _episodes(exp, cell, o)
        cmd += ["--episodes", str(episodes)] if episodes else []
        cmd += cell.condition.args() if cell.condition else []
        # one torch thread per worker: these run beside other jobs (two runs of two threads each on 2
        # cores made an OpenVLA call 14-50x slower)
        cmd += ["--workers", str(o.workers or exp.workers), "--threads", str(o.threads or 1)]
        cmd += ["--no-progress", "--out", out]
        steps += [Step(tuple(cmd)), Step(("divla-eval", "report", out))]
    return steps


def _curve(exp: Experiment, o: Overrides) -> list[Step]:
    cmd = ["divla-eval", "curve", path(exp, "train"), "--task", exp.task]
    cells = select_cells(exp, o.cells)
    if cells != exp.cells:  # default: every split of the task
        cmd += [arg for c in cells for arg in ("--split", c.split)]
    cmd += ["--episodes", str(o.episodes or exp.curve_episodes)]
    cmd += ["--every", str(o.curve_every or exp.curve_every)]
    cmd += ["--workers", str(o.workers or exp.workers), "--threads", str(o.threads or 1), "--no-progress"]
    cmd += ["--out", path(exp, "curve")]
    return [Step(tuple(cmd))]


def plan(exp: Experiment, stage: str, o: Overrides = Overrides()) -> list[Step]:
    """The commands of one stage, as they would run now (the ship stage names the last snapshot
    there is, so it is planned when it runs, after any training of the same invocation)."""
    if stage not in exp.stages:
        raise DivlaEvalError(
            f"experiment {exp.name} has no stage {stage!r}; valid: {', '.join(exp.stages)}, all"
        )
    if stage == "collect":
        return _collect(exp, o)
    if stage == "train":
        return _train(exp, o)
    if stage == "ship":
        return _ship(exp, o)
    if stage == "curve":
        return _curve(exp, o)
    cells = select_cells(exp, o.cells)
    if stage == "eval":
        steps = _evaluate(exp, cells, o)
        return steps + [Step(("divla-eval", "summary", exp.summary))] if exp.summary else steps
    visual = [c for c in cells if not exp.visual_cells or c.name in exp.visual_cells]
    return _evaluate(exp, (replace(c, condition=cond) for cond in exp.conditions for c in visual), o)


def parse_stages(exp: Experiment, given: Iterable[str]) -> tuple[str, ...]:
    """`--stage` values (repeated or comma-separated; `all` or none: every stage), in the
    experiment's order; an unknown one is refused with the experiment's stages."""
    names = [s.strip() for text in given for s in text.split(",") if s.strip()]
    if not names or "all" in names:
        return exp.stages
    for name in names:
        if name not in exp.stages:
            raise DivlaEvalError(
                f"experiment {exp.name} has no stage {name!r}; valid: {', '.join(exp.stages)}, all"
            )
    return tuple(s for s in exp.stages if s in names)


# --- running -------------------------------------------------------------------------------------


def _argv(step: Step) -> list[str]:
    head, *rest = step.command
    if head == "divla-eval":
        return [sys.executable, "-m", "divla_eval.cli", *rest]
    if head == "python":
        return [sys.executable, *rest]
    raise ValueError(f"not a command to run in a process: {step}")


def _call(argv: list[str], capture: bool = False) -> tuple[int, list[str]]:
    """Run one command to its end; a SIGTERM to this process is passed on to it (a Ctrl-C at a
    terminal reaches it directly), and it decides how to stop. Returns its exit code and, with
    `capture`, its stdout lines (echoed as they come)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE if capture else None, text=True)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM)) if main else None
    lines: list[str] = []
    interrupted = False
    try:
        while True:
            try:
                if capture and proc.stdout is not None:
                    for line in proc.stdout:
                        print(line, end="", flush=True)
                        lines.append(line.rstrip("\n"))
                code = proc.wait()
                break
            except KeyboardInterrupt:
                interrupted = True  # the command got the Ctrl-C too: let it save what it finished
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    return (130 if interrupted and code == 0 else code), lines


def _rates_header(command: str) -> list[str]:
    """The head of the demos-per-hour table: the machine and its load before the collections."""
    from divla_eval.timing import cpu_name

    cpu = cpu_name()
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "unknown"
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return [
        "# Expert demonstrations per hour",
        "",
        f"`{command}` on {os.cpu_count()} cores ({cpu}), load average",
        f"{load} at the start, {today} UTC. One worker each; `--workers 2` roughly doubles",
        "on 2 cores. Each row is the rate line `divla-eval collect` prints.",
        "",
        "| task | split | collect output |",
        "|---|---|---|",
    ]


def _require_inputs(exp: Experiment, stage: str) -> None:
    """What a stage reads must be there before it starts (a dry run checks nothing)."""
    if stage == "train":
        missing = [d.file for d in exp.demos if not Path(d.file).is_file()]
        if missing:
            raise DivlaEvalError(
                f"missing {', '.join(missing)}: collect the demonstrations first "
                f"(divla-eval experiment {exp.name} --stage collect)"
            )
    if stage == "ship" and last_snapshot(exp) is None:
        raise DivlaEvalError(
            f"{path(exp, 'train')} has no snapshots yet: train first "
            f"(divla-eval experiment {exp.name} --stage train)"
        )


def _run_stage(exp: Experiment, stage: str, steps: list[Step], o: Overrides) -> int:
    _require_inputs(exp, stage)
    rates = []
    if stage == "collect" and exp.rates_table:
        episodes = f" --episodes {o.episodes}" if o.episodes else ""
        rates = _rates_header(f"divla-eval experiment {exp.name} --stage collect{episodes}")
    for step in steps:
        print(f"+ {step}", file=sys.stderr, flush=True)
        if step.command[0] == "cp":
            _, src, dst = step.command
            if not Path(src).is_file():
                raise DivlaEvalError(f"{src} is missing: nothing to copy to {dst}")
            from divla_eval.safe_io import atomic_output

            with atomic_output(Path(dst)) as tmp:  # a read-only or full target: one line, not a traceback
                shutil.copy2(src, tmp)
            continue
        code, lines = _call(_argv(step), capture=bool(step.rate_row))
        if code != 0:
            return code
        if step.rate_row:
            rate = [ln for ln in lines if "demos/hour" in ln]
            split = step.command[step.command.index("--split") + 1]
            rates.append(f"| {step.rate_row} | {split} | {rate[-1] if rate else ''} |")
    if rates:
        from divla_eval.safe_io import write_text

        write_text(Path(exp.rates_table), "\n".join(rates) + "\n")
        print(f"wrote {exp.rates_table}")
    return 0


def run(exp: Experiment, stages: Iterable[str], o: Overrides = Overrides(), dry_run: bool = False) -> int:
    """Run (or with `dry_run` print) the stages' commands in order; stops at the first that fails
    and returns its exit code (130: interrupted; what finished is kept, and rerunning resumes)."""
    try:
        for stage in stages:
            steps = plan(exp, stage, o)  # planned when it runs: ship names the last snapshot there is
            print(f"# {exp.name}: {stage}", flush=True)
            if dry_run:
                for step in steps:
                    print(step, flush=True)
                if stage == "collect" and exp.rates_table:
                    print(f"# then writes {exp.rates_table}: each collect's demos/hour line")
                continue
            code = _run_stage(exp, stage, steps, o)
            if code != 0:
                return code
    except KeyboardInterrupt:  # a SIGTERM or Ctrl-C between two commands
        print(f"\ninterrupted: rerun divla-eval experiment {exp.name} to resume", file=sys.stderr)
        return 130
    return 0


# --- the command line ----------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """`divla-eval experiment NAME [--stage S] [--dry-run] [overrides]` and `divla-eval experiment ls`."""
    p = subparsers.add_parser(
        "experiment",
        help="run a named experiment's stages (collect, train, curve, ship, eval, eval-visual); "
        "`experiment ls` lists them",
    )
    p.add_argument("name", nargs="?", help="experiment name; `ls` lists them with one line each")
    p.add_argument("--list", action="store_true", help="list the experiments with one line each")
    p.add_argument(
        "--stage",
        action="append",
        default=[],
        help="stage to run: " + ", ".join(STAGES) + " (those the experiment has) or all (default); "
        "repeat it or separate by commas; stages run in the experiment's order",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands it would run; run nothing")
    p.add_argument(
        "--cells",
        nargs="+",
        default=[],
        metavar="CELL",
        help="only these evaluation cells, named as in their run directories (e.g. easy-seen hard-mixed)",
    )
    p.add_argument(
        "--episodes",
        type=_positive_int,
        default=None,
        help="episodes per evaluation cell (curve: per cell and snapshot; an experiment without cells: "
        "per demo file); a larger number extends finished runs",
    )
    p.add_argument("--workers", type=_positive_int, default=None, help="simulator processes (collect, eval)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default 1)")
    p.add_argument("--steps", type=_positive_int, default=None, help="training steps (extends a training)")
    p.add_argument("--curve-every", type=_positive_int, default=None, help="curve: every k-th snapshot")
    p.add_argument(
        "--init-from",
        default=None,
        metavar="PATH",
        help="train: start a training whose runs/ directory was lost from this saved policy (e.g. its "
        "shipped copy in checkpoints/, weights only, a fresh optimiser) or run; a training that has "
        "its own checkpoint resumes from that instead",
    )
    return p


def list_lines() -> list[str]:
    rows = [(name, EXPERIMENTS.get(name), text) for name, text in EXPERIMENTS.describe()]
    width = max(len(name) for name, _, _ in rows)
    return [f"{name:<{width}}  [{' '.join(exp.stages)}] {text}" for name, exp, text in rows]


def run_command(args) -> int:
    """The `divla-eval experiment` handler."""
    if args.list or args.name == "ls":
        print("\n".join(list_lines()))
        return 0
    if args.name is None:
        raise DivlaEvalError(f"give an experiment (or --list); valid: {', '.join(EXPERIMENTS.names())}")
    exp = EXPERIMENTS.get(args.name)
    stages = parse_stages(exp, args.stage)
    cells = tuple(n for text in args.cells for n in text.replace(",", " ").split())
    overrides = Overrides(
        cells, args.episodes, args.workers, args.threads, args.steps, args.curve_every, args.init_from
    )
    select_cells(exp, cells)  # an unknown cell is refused before anything runs
    for flag, value, stage in (
        ("--steps", args.steps, "train"),
        ("--curve-every", args.curve_every, "curve"),
        ("--init-from", args.init_from, "train"),
    ):
        if value is not None and stage not in exp.stages:
            raise DivlaEvalError(f"{flag}: experiment {exp.name} has no {stage} stage")
    if args.init_from is not None and "train" not in stages:
        # the ship stage records the training's command: it must be the one that ran
        raise DivlaEvalError("--init-from: only the train stage uses it; add --stage train")
    return run(exp, stages, overrides, dry_run=args.dry_run)
