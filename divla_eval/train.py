"""`divla-eval train`: one training loop for every learned policy, on `divla-eval collect` demos.

Every policy trains the same way (same data, sampler, optimiser, schedule and step budget), so a
comparison between them measures the models, not the loops. A policy takes part by registering a
`Recipe`: how to build its model from a dataset, its loss on a batch, and how to save and load it.

The output directory is the policy checkpoint (loadable with `--checkpoint OUT`) plus:
    train_log.jsonl     one line per logged step (losses, learning rate, seconds)
    losses.png          the loss curves
    checkpoint/         the latest periodic checkpoint: raw and EMA weights, optimiser, trainer state.
    snapshots/step-N/   with `snapshot_every`: the saved policy (EMA weights) at every N steps, kept, for
                        learning curves (`divla-eval curve`).
Interrupting loses at most `checkpoint_every` steps: rerunning the same command resumes from
checkpoint/, with the data order derived from (seed, step) so the continuation is deterministic.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from divla_eval.errors import ConfigMismatchError, DivlaEvalError, InvalidValueError
from divla_eval.registry import Registry


@dataclass(frozen=True)
class Recipe:
    """How the shared loop trains one policy (all callables take/return torch objects)."""

    build: Callable[..., Any]
    """build(dataset, options: dict) -> model (an nn.Module with .cfg)."""
    loss: Callable[..., dict]
    """loss(model, batch, generator) -> {"loss": tensor, other named scalar tensors}."""
    save: Callable[..., None]
    """save(model, path, meta: dict) writes a loadable policy checkpoint."""
    load: Callable[..., Any]
    """load(path) -> model, to resume."""
    dataset_kwargs: Callable[..., dict]
    """dataset_kwargs(options) -> DemoDataset arguments (chunk, obs_horizon, cameras)."""
    config: type | None = None
    """The model's config dataclass: its fields are the `--model-option` names the policy takes."""

    def option_names(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self.config)} if self.config else set()


RECIPES: Registry = Registry("trainable policy")
RECIPES.register("divla", "divla_eval.divla.train:RECIPE", description="DiVLA (reasoning + diffusion head)")
RECIPES.register(
    "diffusion_policy",
    "divla_eval.baselines.diffusion_policy.train:RECIPE",
    description="Diffusion Policy (Chi et al. 2023): CNN encoders + 1-D diffusion UNet, no language",
)
RECIPES.register(
    "openvla",
    "divla_eval.baselines.openvla.train:RECIPE",
    description="OpenVLA (Kim et al. 2024): DiVLA's backbone, 256-bin action tokens decoded one by one",
)
RECIPES.register(
    "octo",
    "divla_eval.baselines.octo.train:RECIPE",
    description="Octo (2024): frozen MiniLM + patch tokens, block-causal transformer, diffusion MLP head",
)


def model_option_types(policy: str) -> dict[str, Any]:
    """The model config overrides a trainable policy takes (`--model-option KEY=VALUE`): the fields of
    its config dataclass and their annotations (none for a recipe without one)."""
    from divla_eval.schema import field_types

    RECIPES.check_name(policy)
    config = RECIPES.get(policy).config
    return dict(field_types(config)) if config is not None else {}


def parse_model_options(policy: str, options: dict) -> dict:
    """`--model-option` overrides for `policy`'s config, names checked and text converted to each
    field's declared type by the parser every kind of option shares (`divla_eval.options`); the
    model's own checks (`check_options`, its config's `__post_init__`) follow when it is built."""
    from divla_eval.options import parse_options

    types = model_option_types(policy)
    label = getattr(RECIPES.get(policy).config, "label", None) or policy
    return parse_options(options, types, kind=label)


def check_options(config_cls: type, options: dict, label: str) -> None:
    """Refuse `--model-option` overrides that name no field of a policy's config dataclass or have the
    wrong type, in one line, before a model is built (a typo must not silently train the default).
    The check is the one a checkpoint's config.json gets (`config_io.check_values`)."""
    from divla_eval.config_io import check_values

    check_values(config_cls, options, label, source="option")


def random_shift(images, generator, pad: int = 4):
    """Shift each image by up to `pad` pixels (replicate-padded, then cropped): the DrQ augmentation
    that image-based diffusion policies train with, so the head does not latch onto exact pixels."""
    import torch
    import torch.nn.functional as F

    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


@dataclass
class TrainConfig:
    policy: str
    demos: Path | tuple[Path, ...]
    """One demonstrations file, or several trained on together (e.g. one per multitask sub-task)."""
    out: Path
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 10
    schedule: str = "cosine"
    """Learning rate after the warm-up: "cosine" decays to 10% at `steps` (Diffusion Policy's and
    OpenVLA's shape; the budget is then part of the recipe, so a longer budget is another run);
    "constant" keeps `lr`, so that the snapshot at step s of a long run is the model an s-step run
    would have made, one run gives a whole learning curve, and it can be extended without restarting
    (the EMA of the weights does the averaging the decay would); "wsd" (warm-up, stable, decay) keeps
    `lr` and falls linearly to 0 over the last `decay_steps` steps. A wsd run is a constant run until
    its decay starts, so it can start from a constant run's checkpoint (`init_from`): one long constant
    run, with short decays branched off where wanted, gives both the curve and the decayed models
    (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations")."""
    decay_steps: int = 0
    """schedule "wsd": the steps of the final linear decay to lr 0 (the warm-up, when it is longer,
    still comes first)."""
    init_from: str = ""
    """A "constant" training run's directory: its checkpoint (weights, EMA, optimiser, step) and its
    log up to that step start this run, when this run has no checkpoint yet. Its settings must be this
    run's, and its step must be where this run is still at the constant lr (a wsd run's decay not
    begun), so this run is the one it would have been from step 0. Or a policy such a run saved (a
    snapshot, or its shipped fp16 copy): its weights start both the weights and their EMA, with a fresh
    optimiser, which is how a long run goes on after its runs/ directory was lost. Not part of the
    resume key."""
    snapshot_every: int = 0
    """Save the policy (EMA weights) to snapshots/step-N/ every N steps, kept for learning curves;
    0: none. Not part of the recipe: it changes what is kept, not what is trained."""
    ema_decay: float = 0.999
    """The saved policy is an exponential moving average of the weights (Diffusion Policy evaluates its
    EMA weights; raw weights sample noisier actions). 0 saves the raw weights."""
    threads: int = 2
    """torch threads. On a machine shared with other jobs use 1: with 2, every operation waits for
    the slower thread, and steps were many times slower here while a simulation held the other core."""
    grad_accum: int = 1
    """Micro-batches of `batch_size` whose gradients are summed before each optimiser step: an
    effective batch of batch_size * grad_accum (times the processes under `accelerate launch`) when
    one batch does not fit in memory. Part of the recipe when != 1 (another effective batch)."""
    device: str = "auto"
    """`divla_eval.device.resolve_device` spec: auto, cpu, cuda, cuda:N or mps. Where the steps run
    (bf16 autocast on CUDA), not what is trained: no part of the resume key, like `threads`."""
    options: dict[str, Any] = field(default_factory=dict)
    """Policy config overrides, e.g. {"reasoning_injection": False}."""

    def __post_init__(self):
        paths = self.demos if isinstance(self.demos, (list, tuple)) else (self.demos,)
        self.demos = tuple(Path(p) for p in paths)

    def resume_key(self) -> dict:
        """What must match to resume (steps may grow: training further is allowed)."""
        d = dataclasses.asdict(self)
        # threads and the device change the speed and snapshots what is kept, not the result's recipe
        for name in ("steps", "out", "threads", "snapshot_every", "device", "init_from"):
            d.pop(name)
        if d["schedule"] == "cosine":
            del d["schedule"]  # the default is left out, so runs started before the option still resume
        for name, default in (("grad_accum", 1), ("decay_steps", 0)):
            if d[name] == default:
                del d[name]  # likewise
        d["demos"] = self.demos_label(resolve=True)
        return json.loads(json.dumps(d, default=str))

    def demos_label(self, resolve: bool = False) -> str | list[str]:
        """The demos as recorded in keys and metadata: a path, or a list of them for several files
        (one file keeps the plain path, so runs started before several were allowed still resume)."""
        paths = [str(p.resolve() if resolve else p) for p in self.demos]
        return paths[0] if len(paths) == 1 else paths


def _recorded_task(demos: Path) -> str:
    """The task a demonstrations file was collected on; refuses files `divla-eval collect` did not make
    (read and checked by `divla_eval.data.demos`, like everything training reads of the file)."""
    from divla_eval.data.demos import recorded_task

    return recorded_task(demos)


def check_demos_task(demos: Path, task: str) -> None:
    """Refuse a demonstrations file recorded on another task than the one the user named."""
    from divla_eval.tasks import TASKS

    TASKS.check_name(task)
    recorded = _recorded_task(demos)
    if recorded != task:
        raise DivlaEvalError(f"{demos} holds demonstrations of task {recorded!r}, not {task!r}")


def _check_inputs(cfg: TrainConfig) -> None:
    RECIPES.check_name(cfg.policy)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DivlaEvalError(f"--out {out} is a file, not a directory: pass a new or existing directory")
    for path in cfg.demos:
        _recorded_task(path)  # exists, is HDF5, was made by `divla-eval collect`
    if len(set(p.resolve() for p in cfg.demos)) < len(cfg.demos):
        raise DivlaEvalError("the same demonstrations file is given twice")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise DivlaEvalError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise DivlaEvalError("--steps and --batch-size must be >= 1")
    if cfg.schedule not in SCHEDULES:
        raise DivlaEvalError(f"unknown --schedule {cfg.schedule!r}; valid: {', '.join(SCHEDULES)}")
    if cfg.schedule == "wsd" and not 0 < cfg.decay_steps <= cfg.steps:
        raise DivlaEvalError(
            f"--schedule wsd needs --decay-steps between 1 and --steps ({cfg.steps}), got {cfg.decay_steps}"
        )
    if cfg.schedule != "wsd" and cfg.decay_steps:
        raise DivlaEvalError(f"--decay-steps is for --schedule wsd, not {cfg.schedule}")
    if cfg.init_from and cfg.schedule not in ("constant", "wsd"):
        raise DivlaEvalError(
            f"--init-from continues a constant-lr run: it needs --schedule constant or wsd, "
            f"not {cfg.schedule}"
        )
    if cfg.snapshot_every < 0:
        raise DivlaEvalError(f"--snapshot-every must be >= 0 (0: none), got {cfg.snapshot_every}")
    if cfg.grad_accum < 1:
        raise DivlaEvalError(f"--grad-accum must be >= 1, got {cfg.grad_accum}")
    from divla_eval.device import resolve_device

    resolve_device(cfg.device)  # a device this machine lacks: one line, before any data is read


SCHEDULES = ("cosine", "constant", "wsd")


def _stable_until(cfg: TrainConfig) -> int:
    """The step where the lr stops being constant (a constant run: never within `steps`)."""
    return cfg.steps - cfg.decay_steps if cfg.schedule == "wsd" else cfg.steps


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% (Diffusion Policy's and OpenVLA's shape), constant, or
    constant and a linear decay to 0 over the last `decay_steps` (wsd)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or (cfg.schedule == "wsd" and step < _stable_until(cfg)):
        return cfg.lr
    if cfg.schedule == "wsd":
        return cfg.lr * (cfg.steps - step) / cfg.decay_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _batches(dataset, cfg: TrainConfig, start_step: int, rank: int = 0, world: int = 1):
    """An endless stream of shuffled batches; epoch e's order comes from (seed, e), so a resumed run
    sees the same batches it would have seen. `start_step` counts batches (micro-batches when
    gradients accumulate). With `world` processes (DDP), each draws the same order and loads only its
    share of every batch (rows rank, rank + world, ...): together they train on the batches one
    process would."""
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    from divla_eval.data.dataset import collate

    per_epoch = max(1, len(dataset) // cfg.batch_size)
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        if world == 1:
            loader = DataLoader(
                dataset,
                batch_size=cfg.batch_size,
                shuffle=True,
                drop_last=True,
                generator=g,
                collate_fn=collate,
            )
        else:  # the sampler that shuffle=True builds, each batch cut to this process's rows
            order = BatchSampler(RandomSampler(dataset, generator=g), cfg.batch_size, drop_last=True)
            shard = _Shard(order, rank, world)
            loader = DataLoader(dataset, batch_sampler=shard, generator=g, collate_fn=collate)
        for i, batch in enumerate(loader):
            if i < skip:
                continue
            yield batch
        epoch, skip = epoch + 1, 0


class _Shard:
    """A batch sampler's batches, each cut to one process's rows (see `_batches`)."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self):
        for batch in self.batches:
            yield batch[self.rank :: self.world]

    def __len__(self) -> int:
        return len(self.batches)


def _accelerator(cfg: TrainConfig):
    """The `accelerate.Accelerator` of a training run: it places the model, autocasts (bf16 on CUDA),
    scales and accumulates gradients and, under `accelerate launch` with several processes, wraps the
    model in DistributedDataParallel. On the CPU in one process it changes no number: float32, no
    wrapper, the same optimiser steps as a plain loop."""
    import os

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from divla_eval.device import mixed_precision, resolve_device

    device = resolve_device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and ":" in device:
        raise DivlaEvalError(
            f"--device {cfg.device}: under `accelerate launch` every process takes its own GPU; "
            "pass --device auto or cuda (choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if device.startswith("cuda:"):  # one chosen GPU: accelerate places models on the current one
        torch.cuda.set_device(device)
    return Accelerator(
        cpu=device == "cpu",
        mixed_precision=mixed_precision(device),
        gradient_accumulation_steps=cfg.grad_accum,
        # a recipe may leave parameters out of a step (another robot's head): DDP must not wait for them
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


class _Distributed:
    """What a recipe's `loss` gets under DDP: calling it runs the DDP wrapper (whose backward averages
    the gradients across processes); attributes (`cfg`, helpers such as Octo's `encode_text`) are the
    model's own, so recipes need not know about the wrapper."""

    def __init__(self, wrapped, model):
        self._wrapped, self._model = wrapped, model

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Train (or resume); returns a summary dict (steps, seconds, final losses, paths, and
    `main_process`: False in the other processes of a multi-process run, which write nothing)."""
    import torch

    _check_inputs(cfg)
    recipe: Recipe = RECIPES.get(cfg.policy)
    acc = _accelerator(cfg)  # before the thread count: a multi-CPU launch sets its own
    if cfg.batch_size % acc.num_processes:
        raise DivlaEvalError(
            f"--batch-size {cfg.batch_size} must divide among the {acc.num_processes} processes"
        )
    torch.set_num_threads(cfg.threads)
    with contextlib.ExitStack() as stack:
        if acc.is_main_process:  # the one process that writes; the others of a DDP run only read
            stack.enter_context(_locked(Path(cfg.out)))
        return _train_locked(cfg, recipe, acc, progress)


@contextlib.contextmanager
def _locked(out: Path):
    """Hold the run directory's lock (`runner.exclusive`, the one `divla-eval run` takes) while
    training: two `train` processes into one --out would both run, interleave train_log.jsonl and
    overwrite each other's checkpoints."""
    from divla_eval.runner import exclusive

    lock = exclusive(out)
    try:
        lock.__enter__()
    except DivlaEvalError as exc:
        if isinstance(exc.__context__, BlockingIOError):  # held: say what holds it in train's words
            raise DivlaEvalError(
                f"another divla-eval process is writing into {out} (training?): wait for it to finish "
                "or pass another --out"
            ) from None
        raise
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _train_locked(cfg: TrainConfig, recipe: Recipe, acc, progress: bool) -> dict:
    from divla_eval.data.dataset import DemoDataset

    if cfg.init_from:
        if acc.is_main_process:
            _start_from(cfg)
        if acc.num_processes > 1:
            acc.wait_for_everyone()  # the others load the checkpoint the main process copied

    ds_kwargs = recipe.dataset_kwargs(cfg.options)
    splits = {_split(p) for p in cfg.demos}  # each file's `train` mask, when every file has one
    try:
        dataset = DemoDataset(list(cfg.demos), demos="train" if splits == {"train"} else None, **ds_kwargs)
    except ValueError as exc:  # files that cannot be trained on together
        raise DivlaEvalError(str(exc)) from exc
    if len(dataset) < cfg.batch_size:
        raise DivlaEvalError(
            f"{dataset.path} has {len(dataset)} samples, fewer than one batch of {cfg.batch_size}"
        )
    try:
        return _train_on(dataset, cfg, recipe, progress, acc)
    finally:
        dataset.close()  # the files can be written again once training is over
        if acc.num_processes > 1:
            acc.end_training()  # leaves the process group cleanly


def _train_on(dataset, cfg: TrainConfig, recipe: Recipe, progress: bool, acc) -> dict:
    """The loop. Weights are built or loaded on the CPU and then moved to `acc.device`; random numbers
    (noise, timesteps, image shifts) are drawn from a CPU generator and moved, so a run draws the same
    ones on any device. Only the main process writes files."""
    import torch
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    state_path = ckpt / "trainer_state.json"
    start, fresh = 0, False
    torch.manual_seed(cfg.seed)
    if state_path.is_file():
        state = read_trainer_state(state_path)
        stored = {k: v for k, v in state["key"].items() if k != "threads"}  # older states kept it
        if stored != cfg.resume_key():
            diff = sorted(k for k in stored if stored.get(k) != cfg.resume_key().get(k))
            raise ConfigMismatchError(
                f"{out} holds training with other settings ({', '.join(diff)} differ); use another --out"
            )
        model = recipe.load(ckpt)
        start = int(state["step"])
        # started from saved weights alone (`_from_weights`) and no checkpoint of its own saved since
        fresh = state.get("optimizer") == FRESH and not (ckpt / "optimizer.pt").is_file()
        ema = recipe.load(ckpt / "ema") if (ckpt / "ema").is_dir() else None
    else:
        model = recipe.build(dataset, dict(cfg.options))
        ema = None
    model = model.to(acc.device)
    if cfg.ema_decay > 0 and ema is None:
        ema = copy.deepcopy(model)
    if ema is not None:
        ema.to(acc.device).eval().requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if start and not fresh:  # load_state_dict moves the state to the parameters' device
        _load_optimizer(opt, ckpt)
    main = acc.is_main_process
    if start >= cfg.steps:
        if main:
            print(f"{out}: already trained for {start} >= {cfg.steps} steps; nothing to do")
        return _finish(cfg, recipe, model, ema, start, 0.0, dataset, acc=acc)

    wrapped = model if acc.num_processes == 1 else acc.prepare_model(model, device_placement=False)
    net = model if wrapped is model else _Distributed(wrapped, model)
    log_path = out / "train_log.jsonl"
    # `seconds` is training time since step 0, summed over sessions (a resumed run continues the count)
    offset = _truncate_log(log_path, start) if main else 0.0
    # each process its own noise (process 0's is a one-process run's)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + start + (acc.process_index << 32))
    batches = _batches(dataset, cfg, start * cfg.grad_accum, acc.process_index, acc.num_processes)
    show = progress and main
    bar = tqdm(total=cfg.steps, initial=start, disable=not show, desc=f"train {cfg.policy}", unit="step")
    t0 = time.perf_counter()
    last_saved = start  # the step of the checkpoint a rerun would resume from (0: none)
    try:
        with open(log_path if main else os.devnull, "a") as log:
            for step in range(start, cfg.steps):
                for group in opt.param_groups:
                    group["lr"] = _lr_at(cfg, step)
                opt.zero_grad(set_to_none=True)
                parts = []
                for _ in range(cfg.grad_accum):  # accelerate scales each backward by 1 / grad_accum
                    batch = _on_device(next(batches), acc.device)
                    with acc.accumulate(wrapped):  # DDP averages the gradients at the last one only
                        with acc.autocast():
                            losses = recipe.loss(net, batch, gen)
                        acc.backward(losses["loss"])
                    parts.append({k: v.detach() for k, v in losses.items()})
                norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                if not _finite(parts, norm, acc):  # before the update: the weights stay good
                    bar.close()
                    raise _diverged(cfg, parts, step, last_saved)
                opt.step()
                if ema is not None:
                    _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
                if step % cfg.log_every == 0 or step == cfg.steps - 1:
                    row = _mean_losses(parts, acc)
                    seconds = round(offset + time.perf_counter() - t0, 2)
                    row.update(step=step, lr=_lr_at(cfg, step), seconds=seconds)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if is_loss(k)})
                bar.update(1)
                done = step + 1
                if main and cfg.snapshot_every and done % cfg.snapshot_every == 0:
                    _save_snapshot(cfg, recipe, ema if ema is not None else model, done, dataset)
                if main and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    _save_checkpoint(cfg, recipe, model, ema, opt, done)
                    last_saved = done
    except KeyboardInterrupt:
        bar.close()
        raise
    bar.close()
    return _finish(cfg, recipe, model, ema, cfg.steps, time.perf_counter() - t0, dataset, opt, acc=acc)


class TrainingDivergedError(DivlaEvalError):
    """The loss or the gradients became NaN or infinite: stopped before the update that would have
    spread it into every weight (and into the EMA and the checkpoints)."""


def _finite(parts: list[dict], norm, acc) -> bool:
    """Whether this step's losses and its gradient norm are finite. One host sync per step (the
    check must come before the update); in a multi-process run the verdict is shared, so that every
    process stops at the same step instead of the others waiting for it in a collective."""
    import torch

    values = torch.stack([p["loss"].detach().float().reshape(()) for p in parts] + [norm.float().reshape(())])
    bad = (~torch.isfinite(values)).any().float()
    if acc.num_processes > 1:
        bad = acc.reduce(bad.reshape(1), reduction="sum")
    return not bool(bad.item())


def _diverged(cfg: TrainConfig, parts: list[dict], step: int, last_saved: int) -> TrainingDivergedError:
    loss = [float(p["loss"]) for p in parts]
    shown = ", ".join(f"{v:g}" for v in loss) if len(loss) > 1 else f"{loss[0]:g}"
    ckpt = Path(cfg.out) / "checkpoint"
    kept = (
        f"the last good checkpoint (step {last_saved}) stays in {ckpt}"
        if last_saved
        else "no checkpoint had been saved yet"
    )
    return TrainingDivergedError(
        f"training diverged at step {step}: loss {shown} (or its gradients) is not finite; stopped before "
        f"the update, {kept}; train into another --out with a lower --lr, or check the demonstrations"
    )


class _TrainerState(typing.TypedDict):
    step: int
    key: dict


def read_trainer_state(path: Path) -> dict:
    """checkpoint/trainer_state.json, checked: an object with the step reached (an integer >= 0)
    and the settings it was trained with (an object). Anything else is one line naming the file and
    saying how to start over, instead of a KeyError at resume."""
    from divla_eval.checkpoint import CheckpointError
    from divla_eval.schema import check_value, read_json

    how = f"delete {path.parent} to train again from step 0, or pass another --out"
    try:
        state = read_json(path, CheckpointError)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {how}") from None
    try:
        check_value(state, _TrainerState)
        if state["step"] < 0:
            raise InvalidValueError(f"field 'step': expected an integer >= 0, got {state['step']}")
    except InvalidValueError as exc:
        raise CheckpointError(f"{path}: {exc}; {how}") from None
    return state


def _load_optimizer(opt, ckpt: Path) -> None:
    """The optimiser's state from checkpoint/optimizer.pt (tensors only: `weights_only`); a damaged
    file, or one saved for other parameters, is a CheckpointError saying how to start over."""
    import torch

    from divla_eval.checkpoint import CheckpointError

    path = ckpt / "optimizer.pt"
    try:
        opt.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, KeyError, ...
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(
            f"{path} is damaged ({reason}); delete {ckpt} to train again from step 0, or pass another --out"
        ) from None


class _LogRow(typing.TypedDict):
    step: int


def read_log(path: Path) -> list[dict]:
    """train_log.jsonl's rows, oldest first. A row that is not a JSON object with an integer `step`
    and numeric values is dropped with one warning: a kill in the middle of a write tears the last
    row, and the log only feeds the loss plot and the resumed run's clock, where a lost row costs
    nothing and refusing to train would."""
    import warnings

    from divla_eval.schema import check_value, parse_json

    if not path.is_file():
        return []
    rows, dropped = [], 0
    for raw in path.read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            row = parse_json(raw)
            check_value(row, _LogRow)
            check_value(row, dict[str, float])
        except InvalidValueError:
            dropped += 1
            continue
        rows.append(row)
    if dropped:
        warnings.warn(f"{path}: ignored {dropped} unreadable row(s) (an interrupted write?)", stacklevel=2)
    return rows


def _on_device(batch: dict, device) -> dict:
    """A collated batch on the training device (left as it is on the CPU)."""
    if device.type == "cpu":
        return batch
    from accelerate.utils import send_to_device

    return send_to_device(batch, device)


def _mean_losses(parts: list[dict], acc) -> dict[str, float]:
    """A step's logged losses: the mean over its micro-batches and, in a multi-process run, over the
    processes (every process calls this at the same steps: the mean is a collective)."""
    values = [sum(float(p[k]) for p in parts) / len(parts) for k in parts[0]]
    if acc.num_processes > 1:
        import torch

        values = acc.reduce(torch.tensor(values, device=acc.device), reduction="mean").tolist()
    return {k: round(v, 6) for k, v in zip(parts[0], values)}


def _ema_update(ema, model, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model; buffers (normalisation statistics) are copied. The
    decay warms up as (1 + step) / (10 + step), so early averages do not hold on to the random init."""
    import torch

    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            if p.requires_grad:  # frozen weights (a pretrained backbone) equal their average already
                e.lerp_(p, 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def is_loss(key: str) -> bool:
    """Whether a logged key is a loss term (the rest are step, lr, seconds)."""
    return key == "loss" or key.startswith("l_")


def _open_demos(path):
    from divla_eval.data.demos import open_demos

    return open_demos(path)


def _split(path) -> str | None:
    """Train on the file's `train` mask when it has one (the `valid` demos stay unseen). The mask's
    contents are checked when the dataset reads it (`divla_eval.data.demos.demo_names`)."""
    import h5py

    with _open_demos(path) as f:
        mask = f.get("mask/train")
        if mask is None:
            return None
        if not isinstance(mask, h5py.Dataset) or mask.ndim != 1:
            return "train"  # not a list of names: demo_names refuses it with the file's name
        return "train" if len(mask) else None


def _truncate_log(path: Path, start: int) -> float:
    """Drop log rows past the resumed step (they came from work lost with the interruption); returns
    the training seconds of the last row kept, where the resumed run's clock continues."""
    if not path.is_file():
        return 0.0
    kept = [r for r in read_log(path) if r["step"] < start]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return float(kept[-1].get("seconds", 0.0)) if kept else 0.0


INIT_FROM = "init_from.json"


def _start_from(cfg: TrainConfig) -> None:
    """Start `cfg.out` from `cfg.init_from` (see `TrainConfig.init_from`), once: a run that has its own
    checkpoint resumes from it. The source is a training run (its checkpoint is copied: the exact
    continuation) or a saved policy, e.g. a shipped snapshot (its weights only: see `_from_weights`)."""
    out, src = Path(cfg.out), Path(cfg.init_from)
    if (out / "checkpoint" / "trainer_state.json").is_file():
        return
    if src.resolve() == out.resolve():
        raise DivlaEvalError(f"--init-from {src} is this run's own --out: pass the run to start from")
    if (src / "checkpoint" / "trainer_state.json").is_file():
        _from_run(cfg, out, src)
    elif (src / "config.json").is_file():
        _from_weights(cfg, out, src)
    else:
        raise DivlaEvalError(
            f"--init-from {src}: neither a training run (no checkpoint/trainer_state.json) nor a saved "
            "policy (no config.json)"
        )


def _check_prefix(cfg: TrainConfig, src: Path, key: dict, step: int) -> None:
    """A source trained with `key` up to `step` is a prefix of this run: a constant-lr run with this
    run's settings (but the schedule), not past where this run's decay starts."""
    theirs = {k: v for k, v in key.items() if k != "threads"}
    if theirs.get("schedule") != "constant":
        raise DivlaEvalError(
            f"--init-from {src} was trained with schedule {theirs.get('schedule', 'cosine')!r}: only a "
            "constant-lr run is a prefix of another run"
        )
    mine = {k: v for k, v in cfg.resume_key().items() if k not in ("schedule", "decay_steps")}
    theirs.pop("schedule")
    # the demos by file name: a shipped checkpoint records the absolute paths of the machine it was
    # trained on, and a checkout elsewhere collects the same files under its own data/
    for d in (mine, theirs):
        if "demos" in d:
            d["demos"] = [Path(x).name for x in ([d["demos"]] if isinstance(d["demos"], str) else d["demos"])]
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        raise ConfigMismatchError(
            f"--init-from {src} was trained with other settings ({', '.join(diff)} differ)"
        )
    if step > _stable_until(cfg):
        raise DivlaEvalError(
            f"--init-from {src} is at step {step}, past step {_stable_until(cfg)} where this run's "
            f"decay starts: raise --steps to at least {step + cfg.decay_steps}"
        )


def _from_run(cfg: TrainConfig, out: Path, src: Path) -> None:
    """Copy a run's checkpoint (weights, EMA, optimiser) and log: this run is then the one it would have
    been from step 0. The source's lock is held while copying, so a training still writing there is
    refused rather than copied half-saved."""
    import shutil

    from divla_eval.runner import exclusive

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive(src))
        except DivlaEvalError:
            raise DivlaEvalError(
                f"--init-from {src}: a divla-eval process is writing there (training?); start from it "
                "when it stops"
            ) from None
        state = read_trainer_state(src / "checkpoint" / "trainer_state.json")
        step = int(state["step"])
        _check_prefix(cfg, src, state["key"], step)
        # a source that itself started from weights and has not saved an optimiser since passes that on
        fresh = state.get("optimizer") == FRESH and not (src / "checkpoint" / "optimizer.pt").is_file()
        tmp = _fresh_tmp(out)
        shutil.copytree(src / "checkpoint", tmp)
        record = {"run": str(src.resolve()), "step": step, **({"optimizer": FRESH} if fresh else {})}
        _commit_start(cfg, out, tmp, src / "train_log.jsonl", step, record, fresh)


class _SavedMeta(typing.TypedDict):
    steps: int
    train_config: dict


def _from_weights(cfg: TrainConfig, out: Path, src: Path) -> None:
    """Start from a saved policy's weights (a snapshot, or its fp16 shipped copy in checkpoints/, which
    survives the machine when runs/ does not): both the trained weights and their EMA begin at them and
    the optimiser starts empty; the data order and noise continue as the source run's would. Not the
    exact continuation (that needs the optimiser state, which is not shipped), so init_from.json and
    the saved metadata say `optimizer: fresh`."""
    from divla_eval.checkpoint import CheckpointError
    from divla_eval.policy import POLICIES
    from divla_eval.schema import check_value, read_json

    meta_path = src / POLICIES.get(cfg.policy).meta_file
    if not meta_path.is_file():
        raise DivlaEvalError(
            f"--init-from {src}: not a {cfg.policy} policy saved by training (no {meta_path.name})"
        )
    meta = read_json(meta_path, CheckpointError)
    try:
        check_value(meta, _SavedMeta)
    except InvalidValueError as exc:
        raise CheckpointError(f"{meta_path}: {exc}") from None
    step = int(meta["steps"])
    if step < 0:
        raise CheckpointError(f"{meta_path}: field 'steps': expected an integer >= 0, got {step}")
    _check_prefix(cfg, src, meta["train_config"], step)
    recipe = RECIPES.get(cfg.policy)
    model = recipe.load(src)  # fp16 weights widen to fp32
    tmp = _fresh_tmp(out)
    recipe.save(model, tmp, {"step": step})
    if cfg.ema_decay > 0:
        recipe.save(model, tmp / "ema", {"step": step})
    record = {
        "checkpoint": str(src.resolve()),
        "step": step,
        "weights": meta.get("weights", "raw"),
        "dtype": meta.get("dtype", "float32"),
        "optimizer": FRESH,
    }
    # a snapshot has no log of its own: its run's (snapshots/step-N/ inside the run directory)
    log = src / "train_log.jsonl"
    if not log.is_file() and src.parent.name == SNAPSHOTS:
        log = src.parent.parent / "train_log.jsonl"
    _commit_start(cfg, out, tmp, log, step, record, fresh=True)


def _fresh_tmp(out: Path) -> Path:
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _commit_start(
    cfg: TrainConfig, out: Path, tmp: Path, log: Path, step: int, record: dict, fresh: bool = False
) -> None:
    """Write the source's log up to `step`, the provenance record and the trainer state (`fresh`: no
    optimiser state to load at `step`), then rename the checkpoint into place, last: until then a
    rerun starts over."""
    import shutil

    rows = [r for r in read_log(log) if r["step"] < step] if log.is_file() else []
    (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / INIT_FROM).write_text(json.dumps(record, indent=2) + "\n")
    state = {"step": step, "key": cfg.resume_key(), **({"optimizer": FRESH} if fresh else {})}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(out / "checkpoint", ignore_errors=True)  # a first save killed before its trainer state
    tmp.replace(out / "checkpoint")


FRESH = "fresh"
"""trainer_state.json's `optimizer` when a run starts from saved weights: there is no optimiser state to
load at that step. The first checkpoint the run saves (optimizer.pt and a state without it) ends it."""


def _provenance(cfg: TrainConfig) -> dict:
    """The run a training started from (`init_from`), for the saved policy's metadata."""
    from divla_eval.schema import read_json

    path = Path(cfg.out) / INIT_FROM
    return {"init_from": read_json(path)} if path.is_file() else {}


def _save_checkpoint(cfg: TrainConfig, recipe: Recipe, model, ema, opt, step: int) -> None:
    import torch

    ckpt = Path(cfg.out) / "checkpoint"
    recipe.save(model, ckpt, {"step": step})
    if ema is not None:
        recipe.save(ema, ckpt / "ema", {"step": step})
    tmp = ckpt / "optimizer.pt.tmp"
    torch.save(opt.state_dict(), tmp)
    tmp.replace(ckpt / "optimizer.pt")
    state = {"step": step, "key": cfg.resume_key()}
    (ckpt / "trainer_state.json.tmp").write_text(json.dumps(state, indent=2))
    (ckpt / "trainer_state.json.tmp").replace(ckpt / "trainer_state.json")


SNAPSHOTS = "snapshots"


def snapshot_dirs(out: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every snapshot a training run kept, in step order."""
    found = []
    for d in (Path(out) / SNAPSHOTS).glob("step-*"):
        if d.is_dir() and d.name[5:].isdigit():
            found.append((int(d.name[5:]), d))
    return sorted(found)


def _save_snapshot(cfg: TrainConfig, recipe: Recipe, model, step: int, dataset) -> None:
    """The policy as it stands at `step` (EMA weights), written beside the run and kept: the points of
    a learning curve. Written to a temporary name and renamed, so a half-written one is never read."""
    import shutil

    final = Path(cfg.out) / SNAPSHOTS / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    meta = {
        "policy": cfg.policy,
        "steps": step,
        "demos": cfg.demos_label(),
        "env_args": dataset.env_args,
        "train_config": cfg.resume_key(),
        "weights": "ema" if cfg.ema_decay > 0 else "raw",
        **_provenance(cfg),
    }
    was_training = model.training
    model.eval()
    recipe.save(model, tmp, meta)
    model.train(was_training)
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)


def _finish(
    cfg: TrainConfig, recipe: Recipe, model, ema, step: int, seconds: float, dataset, opt=None, acc=None
) -> dict:
    out = Path(cfg.out)
    if acc is not None and not acc.is_main_process:  # the main process writes the results
        return {"out": str(out), "steps": step, "seconds": seconds, "final": {}, "main_process": False}
    meta = {
        "policy": cfg.policy,
        "steps": step,
        "demos": cfg.demos_label(),
        "env_args": dataset.env_args,
        "train_config": cfg.resume_key(),
        "train_seconds_this_session": round(seconds, 1),
        "weights": "ema" if ema is not None else "raw",
        **_provenance(cfg),
    }
    if acc is not None:  # where this session ran: a record, not part of the recipe
        from divla_eval.device import describe_device

        meta["device"] = describe_device(str(acc.device))
        meta["processes"] = acc.num_processes
        meta["mixed_precision"] = acc.mixed_precision
    model.eval()
    recipe.save(ema if ema is not None else model, out, meta)
    if opt is not None:
        _save_checkpoint(cfg, recipe, model, ema, opt, step)
    log_path = out / "train_log.jsonl"
    rows = read_log(log_path)
    if rows:
        names = " + ".join(p.name for p in cfg.demos)
        plot_losses(rows, out / "losses.png", title=f"{cfg.policy} on {names}")
    final = rows[-1] if rows else {}
    return {"out": str(out), "steps": step, "seconds": seconds, "final": final, "main_process": True}


def plot_losses(rows: list[dict], path: Path, title: str = "") -> None:
    """One panel per loss term, raw and smoothed (log scale: diffusion losses span decades)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows)
    keys = [k for k in df.columns if is_loss(k)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.plot(df["step"], df[k], alpha=0.3, lw=0.8)
        ax.plot(df["step"], df[k].rolling(10, min_periods=1).mean(), lw=1.5)
        ax.set_yscale("log")
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
