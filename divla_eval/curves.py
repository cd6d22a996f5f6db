"""`divla-eval curve`: success against training steps, the number that tells an under-trained model
from a broken one.

A training run started with `--snapshot-every N` keeps the policy every N steps (train.py,
snapshots/step-N/). This evaluates each snapshot on one fixed grid (the same cells, the same episodes
and seeds for every snapshot, so two points differ only by the weights), then tabulates and plots
success with Wilson 95% intervals beside the training loss at that step.

Everything is resumable: each (snapshot, cell) is an ordinary run directory under OUT/step-N/CELL, so a
rerun skips finished episodes, and a rerun while training goes on adds the snapshots saved since.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from divla_eval.errors import DivlaEvalError
from divla_eval.safe_io import atomic_output, ensure_dir, save_figure, write_text


@dataclass(frozen=True)
class CurveConfig:
    train_dir: Path
    """A `divla-eval train --snapshot-every N` output directory."""
    task: str
    out: Path
    splits: tuple[str, ...] = ()
    """The grid's cells; empty: every split of the task."""
    difficulty: str | None = None
    episodes: int = 20
    """Per cell and snapshot; the same episode indices (scenes and seeds) for every snapshot."""
    seed: int = 0
    every: int = 1
    """Evaluate every k-th snapshot only (the last one always)."""
    max_steps: int | None = None
    """Cap every episode's steps (a quick look); None: the task's budget."""
    workers: int = 1
    threads: int | None = None
    device: str = "auto"


def trained_policy(train_dir: Path) -> str:
    """The policy a training run trains (its trainer state records the recipe)."""
    from divla_eval.train import read_trainer_state

    state = Path(train_dir) / "checkpoint" / "trainer_state.json"
    if not state.is_file():
        raise DivlaEvalError(f"{train_dir} is not a `divla-eval train` directory (no {state.name})")
    policy = read_trainer_state(state)["key"].get("policy")
    if not isinstance(policy, str):
        raise DivlaEvalError(f"{state}: field 'key.policy': expected the trained policy's name")
    return policy


def _cells(cfg: CurveConfig, task=None) -> list[str]:
    from divla_eval.tasks import get_task

    task = task or get_task(cfg.task)
    splits = list(cfg.splits) or list(task.splits)
    for split in splits:
        task.validate(split, cfg.difficulty if cfg.difficulty is not None else task.difficulties[0])
    return splits


def _snapshots(cfg: CurveConfig) -> list[tuple[int, Path]]:
    from divla_eval.train import snapshot_dirs

    found = snapshot_dirs(cfg.train_dir)
    if not found:
        raise DivlaEvalError(
            f"{cfg.train_dir} has no snapshots: train with --snapshot-every N to keep the policy "
            "along the way"
        )
    if cfg.every < 1:
        raise DivlaEvalError(f"--every must be >= 1, got {cfg.every}")
    chosen = found[:: cfg.every]
    if chosen[-1] != found[-1]:
        chosen.append(found[-1])
    return chosen


def cell_dir(cfg: CurveConfig, step: int, split: str) -> Path:
    return cfg.out / f"step-{step:07d}" / split


def evaluate(cfg: CurveConfig, progress: bool = True) -> None:
    """Run (or resume) every snapshot on every cell."""
    from tqdm import tqdm

    from divla_eval.checkpoint import read_config
    from divla_eval.runner import Run, RunConfig, run
    from divla_eval.tasks import get_task

    policy = trained_policy(cfg.train_dir)
    task = get_task(cfg.task)  # built once, handed to every run
    cells = _cells(cfg, task)
    snaps = _snapshots(cfg)
    difficulty = cfg.difficulty if cfg.difficulty is not None else task.difficulties[0]
    bar = tqdm(total=len(snaps) * len(cells), disable=not progress, unit="cell", desc="curve")
    for step, snapshot in snaps:
        # the camera resolution the model was trained at (every learned policy's config records it)
        image_size = read_config(snapshot).get("image_size", 84)  # all of it is checked when run loads it
        if isinstance(image_size, bool) or not isinstance(image_size, int):
            raise DivlaEvalError(f"{snapshot / 'config.json'}: field 'image_size': expected int")
        for split in cells:
            run_cfg = RunConfig(
                task=cfg.task,
                split=split,
                policy=policy,
                checkpoint=str(snapshot),
                episodes=cfg.episodes,
                seed=cfg.seed,
                difficulty=difficulty,
                image_size=image_size,
                max_steps=cfg.max_steps,
            )
            out = cell_dir(cfg, step, split)
            run(
                Run.resolve(run_cfg, task),
                out,
                progress=False,
                workers=cfg.workers,
                threads=cfg.threads,
                device=cfg.device,
            )
            bar.update(1)
    bar.close()


def curve_table(cfg: CurveConfig):
    """One row per evaluated snapshot: step, training hours, loss, each cell's successes, and the pooled
    rate with its Wilson interval. Cells still running count what they recorded."""
    import pandas as pd

    from divla_eval.metrics import wilson_interval
    from divla_eval.records import EpisodeStore

    log = _train_log(cfg.train_dir)
    rows = []
    # evaluated snapshots stay rows when the run that kept them is gone (runs/ lost with a machine, the
    # run continued from a shipped snapshot: `divla-eval train --init-from`)
    for step in sorted({s for s, _ in _snapshots(cfg)} | _evaluated_steps(cfg.out)):
        row: dict = {"step": step}
        before = log[log["step"] < step] if not log.empty else log
        if not before.empty:
            row["train_hours"] = round(float(before["seconds"].iloc[-1]) / 3600, 2)
            row["loss"] = round(float(before["loss"].tail(50).mean()), 4)  # the last 500 steps
        k = n = 0
        for split in _cells(cfg):
            path = cell_dir(cfg, step, split) / "episodes.jsonl"
            records = EpisodeStore(path).load() if path.is_file() else []
            ks, ns = sum(r.success for r in records), len(records)
            row[split] = f"{ks}/{ns}"
            k, n = k + ks, n + ns
        if n == 0:
            continue
        lo, hi = wilson_interval(k, n)
        row.update(successes=k, episodes=n, rate=k / n, ci_low=lo, ci_high=hi)
        rows.append(row)
    return pd.DataFrame(rows), log


def _evaluated_steps(out: Path) -> set[int]:
    return {int(d.name[5:]) for d in Path(out).glob("step-*") if d.is_dir() and d.name[5:].isdigit()}


def _started_from(train_dir: Path) -> str:
    """A sentence for curve.md when the run started from another run or from saved weights."""
    from divla_eval.schema import read_json
    from divla_eval.train import INIT_FROM

    path = Path(train_dir) / INIT_FROM
    if not path.is_file():
        return ""
    record = read_json(path)
    if not isinstance(record, dict):
        return ""
    step = record.get("step")
    if "checkpoint" in record:
        return (
            f" The run started at step {step} from the weights saved in `{record['checkpoint']}` with a "
            "fresh optimiser (`--init-from`): rows before it come from the run that saved them."
        )
    fresh = " (its optimiser fresh)" if record.get("optimizer") == "fresh" else ""
    return f" The run started at step {step} from `{record.get('run')}`'s checkpoint{fresh} (`--init-from`)."


def _model_options(train_dir: Path) -> str:
    """A sentence for curve.md naming the run's `--model-option`s: two curves of one policy and task
    (a recipe variant beside the reference) differ only there. The trainer state is there and checked
    (`trained_policy` read it first)."""
    from divla_eval.train import read_trainer_state

    options = read_trainer_state(Path(train_dir) / "checkpoint" / "trainer_state.json")["key"].get("options")
    if not isinstance(options, dict) or not options:
        return ""
    shown = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in options.items())
    return f" Model options of the run: `{shown}`."


def _train_log(train_dir: Path):
    import pandas as pd

    from divla_eval.train import read_log  # unreadable rows dropped with a warning, as train does

    rows = read_log(Path(train_dir) / "train_log.jsonl")
    df = pd.DataFrame(rows)
    for column in ("step", "loss", "seconds"):  # a log without them (hand-made, emptied) plots nothing
        if column not in df:
            df[column] = pd.Series(dtype=float)
    return df


def plot_curve(table, log, path: Path, title: str) -> None:
    """Success (pooled, with its 95% interval) and training loss against steps, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    if not table.empty:
        ax.errorbar(
            table["step"],
            table["rate"] * 100,
            yerr=[(table["rate"] - table["ci_low"]) * 100, (table["ci_high"] - table["rate"]) * 100],
            marker="o",
            capsize=3,
        )
    ax.set_ylim(-2, 102)
    ax.set_xlabel("training step")
    ax.set_ylabel("success % (Wilson 95% CI)")
    ax.set_title("success")
    if not log.empty:
        bx.plot(log["step"], log["loss"], alpha=0.25, lw=0.7)
        bx.plot(log["step"], log["loss"].rolling(50, min_periods=1).mean(), lw=1.5)
        bx.set_yscale("log")
    bx.set_xlabel("training step")
    bx.set_title("training loss")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=100)  # atomic: never a 0-byte plot on a full disk
    finally:
        plt.close(fig)


def write_curve(cfg: CurveConfig, command: str) -> tuple[Path, Path]:
    """curve.md (the table, with the command that made it), curve.csv and curve.png in OUT."""
    from divla_eval.report import markdown_table, rate_text

    table, log = curve_table(cfg)
    ensure_dir(cfg.out, "--out directory")
    policy = trained_policy(cfg.train_dir)
    title = f"{policy} on {cfg.task}: {cfg.episodes} episodes per cell and snapshot"
    png = cfg.out / "curve.png"
    plot_curve(table, log, png, title)
    with atomic_output(cfg.out / "curve.csv") as tmp:
        table.to_csv(tmp, index=False)
    shown = table.copy()
    if not shown.empty:
        shown["success"] = [rate_text(k, n) for k, n in zip(shown["successes"], shown["episodes"])]
        shown = shown.drop(columns=["successes", "episodes", "rate", "ci_low", "ci_high"])
    md = cfg.out / "curve.md"
    write_text(
        md,
        f"# Learning curve: {title}\n\n"
        f"Made by `{command}` from `{cfg.train_dir}`. Loss: mean of the logged losses over the 500 steps "
        "before the snapshot. Success: Wilson 95% interval over every cell's episodes."
        + _started_from(cfg.train_dir)
        + _model_options(cfg.train_dir)
        + "\n\n"
        + markdown_table(shown)
        + "\n\n![curve](curve.png)\n",
    )
    return md, png
