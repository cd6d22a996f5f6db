"""`divla-eval`: run | train | collect | list | report | summary | tables | compare | bench.

Every mistake a user can make on the command line ends in one line on stderr,
`divla-eval: error: <what is wrong and the valid choices>`, and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from pathlib import Path

from divla_eval.errors import DivlaEvalError
from divla_eval.options import positive_int as _positive_int

EXIT_USAGE = 2
LIST_KINDS = ("tasks", "policies", "perturbations", "objects")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(EXIT_USAGE, f"divla-eval: error: {message}\n")


def _path(text: str) -> Path:
    """A path argument; an empty one is refused, not read as the current directory (`Path("")` is
    `.`: `run --out ''` used to write the run's files among the user's own)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


def _dir_text(text: str) -> str:
    """A checkpoint directory kept as text (the runner records it as given); empty is refused."""
    return str(_path(text))


def _perturbation(text: str) -> tuple[str, int]:
    name, _, level = text.partition(":")
    try:
        return name, int(level or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME[:LEVEL] with an integer level, got {text!r}"
        ) from None


def _option(text: str) -> tuple[str, str]:
    """KEY=VALUE, kept as text: the value is converted to the declared type of the option it sets
    (`divla_eval.options`) once the command knows its task, policy or model."""
    from divla_eval.options import split_option

    try:
        return split_option(text)
    except DivlaEvalError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _DeprecatedAlias(argparse._AppendAction):
    """An old flag spelling kept working (hidden from --help): appends to the new flag's list and says
    once on stderr which flag replaces it."""

    def __init__(self, *args, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warned = namespace.__dict__.setdefault("_deprecated_warned", set())
        if option_string not in warned:
            warned.add(option_string)
            print(
                f"divla-eval: warning: {option_string} is deprecated; use {self.replacement}",
                file=sys.stderr,
            )
        super().__call__(parser, namespace, values, option_string)


_PERTURB_HELP = (
    "perturbation to apply, at severity LEVEL (default 1); repeat it to combine several "
    "(see `divla-eval list perturbations`)"
)


def _add_key_value_option(
    parser: argparse.ArgumentParser, flag: str, help: str, deprecated: str | None = None
) -> None:
    """A repeatable `flag KEY=VALUE` (`--task-option`, `--policy-option`, `--model-option`), and the
    old spelling `deprecated` as a hidden alias of it."""
    dest = flag.lstrip("-").replace("-", "_")
    parser.add_argument(flag, type=_option, action="append", default=[], metavar="KEY=VALUE", help=help)
    if deprecated is not None:
        parser.add_argument(
            deprecated,
            type=_option,
            action=_DeprecatedAlias,
            dest=dest,
            replacement=flag,
            metavar="KEY=VALUE",
            help=argparse.SUPPRESS,
        )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("divla-eval")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _add_device_argument(parser: argparse.ArgumentParser) -> None:
    """`--device`, the same on every command that runs a model (resolved by `divla_eval.device`, whose
    one-line error names the devices this machine has)."""
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps (default: auto)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="divla-eval", description="Simulation benchmark for vision-language-action policies."
    )
    parser.add_argument(
        "--version", action="version", version=f"divla-eval {_version()}", help="print the version and exit"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run_parser(sub)
    _add_list_parser(sub)
    _add_report_parser(sub)
    _add_summary_parser(sub)
    _add_tables_parser(sub)
    _add_compare_parser(sub)
    _add_collect_parser(sub)
    _add_train_parser(sub)
    _add_curve_parser(sub)
    _add_serve_parser(sub)
    _add_bench_parser(sub)
    from divla_eval.experiments import add_parser as add_experiment_parser

    add_experiment_parser(sub)  # `experiment`: its options and handler live in divla_eval/experiments.py
    from divla_eval.regression import add_parser as add_regression_parser

    add_regression_parser(sub)  # `regression`: its options and handler live in divla_eval/regression.py
    return parser


def _add_run_parser(sub) -> None:
    """`divla-eval run`."""
    run = sub.add_parser("run", help="evaluate a policy on a task")
    run.add_argument("--task", default="bin_picking", help="registered task (see `divla-eval list tasks`)")
    run.add_argument(
        "--objects",
        "--split",
        dest="split",
        default=None,
        help="split, e.g. seen|unseen (default: the task's own: unseen for bin_picking and sorting, seen "
        "for bussing, novel for novel_instruction; for multitask every sub-task in turn, one run "
        "directory each: name one, e.g. --split flip_pot, to run only that)",
    )
    run.add_argument(
        "--policy",
        default=None,
        help="registered policy (`divla-eval list policies`, plugins included) or package.module:factory "
        "(default: divla with the shipped checkpoint checkpoints/divla-TASK when the task has one, "
        "else the scripted expert; a note on stderr says which)",
    )
    run.add_argument(
        "--difficulty",
        default=None,
        help="task difficulty, e.g. easy|hard for sorting (default: the task's first, e.g. easy)",
    )
    run.add_argument(
        "--checkpoint", type=_dir_text, default=None, help="checkpoint directory for a learned policy"
    )
    run.add_argument("--episodes", type=_positive_int, default=None, help="episodes (default: task's own)")
    run.add_argument("--seed", type=int, default=0, help="run seed; every episode's seeds derive from it")
    run.add_argument(
        "--perturb",
        type=_perturbation,
        action="append",
        default=[],
        metavar="NAME[:LEVEL]",
        help=_PERTURB_HELP,
    )
    run.add_argument(
        "--matched-control",
        action="store_true",
        help="also run every episode without perturbations, so the report shows the drop",
    )
    _add_key_value_option(
        run,
        "--task-option",
        "task option, e.g. variant=named or num_objects=1 for bin_picking (repeat it; an unknown name "
        "lists the task's)",
        deprecated="--option",
    )
    _add_key_value_option(
        run,
        "--policy-option",
        "inference option of a learned policy, e.g. inference_steps=5, execute_steps=4, "
        "reasoning_every=4 (divla); an unknown name lists the policy's",
    )
    run.add_argument(
        "--out",
        type=_path,
        default=None,
        help="run directory (default: runs/TASK-[DIFFICULTY-]SPLIT-POLICY[-CHECKPOINT DIR NAME][-OPTIONS]-"
        "seedN; for several splits, OUT/SPLIT each)",
    )
    run.add_argument(
        "--video",
        action="store_true",
        help="write an H.264 MP4 of the front camera per episode (videos/TASK-SPLIT-epN.mp4; report.html)",
    )
    run.add_argument("--image-size", type=_positive_int, default=84, help="camera resolution (square)")
    run.add_argument("--max-steps", type=_positive_int, default=None, help="override the task's step limit")
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="parallel simulators: local processes, or Ray actors with --backend ray",
    )
    from divla_eval.backends import BACKENDS

    run.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="where episodes run: local processes (default) or ray actors (pip install 'divla-eval[ray]'; "
        "docs/ray.md); the records are the same",
    )
    run.add_argument(
        "--ray-address",
        default=None,
        metavar="HOST:PORT",
        help="with --backend ray: the Ray cluster's head (`ray start --head`), 'auto' or ray://HOST:PORT "
        "(default: RAY_ADDRESS, else a local cluster); recorded in the manifest",
    )
    run.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch threads per worker (default 1: a learned policy's results then depend on neither the "
        "worker count nor the machine's cores; recorded in the manifest)",
    )
    _add_device_argument(run)
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_list_parser(sub) -> None:
    """`divla-eval list`."""
    lst = sub.add_parser("list", help="list registered tasks, policies, perturbations or objects")
    lst.add_argument("kind", choices=LIST_KINDS, help="what to list: " + ", ".join(LIST_KINDS))
    lst.add_argument("--objects", "--split", dest="split", default=None, help="object split (for `objects`)")


def _add_report_parser(sub) -> None:
    """`divla-eval report`."""
    rep = sub.add_parser(
        "report", help="write report.md, success.png and a self-contained report.html for a run directory"
    )
    rep.add_argument("run_dir", type=_path, help="a run directory (holds manifest.json and episodes.jsonl)")


def _add_summary_parser(sub) -> None:
    """`divla-eval summary`."""
    summ = sub.add_parser("summary", help="one success grid over every run directory under a folder")
    summ.add_argument("root", type=_path, help="folder holding run directories (searched recursively)")
    summ.add_argument("--out", type=_path, default=None, help="markdown file (default: ROOT/summary.md)")


def _add_tables_parser(sub) -> None:
    """`divla-eval tables`."""
    tab = sub.add_parser(
        "tables", help="the paper's result tables (every policy) from the runs under a folder"
    )
    tab.add_argument("root", type=_path, nargs="?", default=Path("results"), help="folder (default: results)")
    tab.add_argument(
        "--out",
        type=_path,
        default=None,
        help="markdown file (default: ROOT/paper_tables.md); the HTML page goes beside it as .html",
    )
    tab.add_argument(
        "--readme", type=_path, default=None, help="also rewrite the results table between its markers"
    )


def _add_compare_parser(sub) -> None:
    """`divla-eval compare`."""
    cmp_ = sub.add_parser("compare", help="two runs on the same episodes: paired rates and McNemar p")
    cmp_.add_argument("run_a", type=_path, help="the first run directory")
    cmp_.add_argument("run_b", type=_path, help="the second run directory (the same task, split and seed)")


def _add_collect_parser(sub) -> None:
    """`divla-eval collect`."""
    col = sub.add_parser("collect", help="record scripted-expert demonstrations to robomimic-style HDF5")
    col.add_argument("--task", default="bin_picking", help="registered task (see `divla-eval list tasks`)")
    col.add_argument(
        "--objects", "--split", dest="split", default="seen", help="object split (default: seen)"
    )
    col.add_argument("--difficulty", default=None, help="task difficulty, e.g. easy|hard for sorting")
    col.add_argument(
        "--perturb",
        type=_perturbation,
        action="append",
        default=[],
        metavar="NAME[:LEVEL]",
        help=_PERTURB_HELP,
    )
    _add_key_value_option(
        col, "--task-option", "task option, as for `run` (repeat it)", deprecated="--option"
    )
    col.add_argument("--episodes", type=_positive_int, required=True, help="episodes to attempt")
    col.add_argument("--out", type=_path, required=True, help="output .hdf5 file (rerun to resume)")
    col.add_argument(
        "--seed", type=int, default=1000, help="collection seed; keep it apart from evaluation seeds"
    )
    col.add_argument("--image-size", type=_positive_int, default=84, help="camera resolution (square)")
    col.add_argument("--max-steps", type=_positive_int, default=None, help="override the task's step limit")
    col.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="parallel simulators: local processes, or Ray actors with --backend ray",
    )
    from divla_eval.backends import BACKENDS

    col.add_argument(
        "--backend", choices=BACKENDS, default="local", help="where episodes run, as for `run` (docs/ray.md)"
    )
    col.add_argument(
        "--ray-address",
        default=None,
        metavar="HOST:PORT",
        help="with --backend ray: the cluster, as for `run`",
    )
    col.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_train_parser(sub) -> None:
    """`divla-eval train`."""
    tr = sub.add_parser("train", help="train a learned policy on `divla-eval collect` demonstrations")
    tr.add_argument("--policy", default="divla", help="trainable policy (default: divla)")
    tr.add_argument("--task", default=None, help="the task the demos must come from (checked when given)")
    tr.add_argument(
        "--demos",
        type=_path,
        action="append",
        required=True,
        help="demonstrations file (.hdf5); repeat it to train on several together (e.g. one per sub-task)",
    )
    tr.add_argument("--out", type=_path, required=True, help="checkpoint directory (rerun to resume)")
    tr.add_argument("--steps", type=_positive_int, default=2000, help="optimiser steps in total")
    tr.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        help="samples per (micro-)batch, shared among the processes of `accelerate launch`",
    )
    tr.add_argument("--lr", type=float, default=3e-4, help="peak learning rate, after warm-up (default 3e-4)")
    tr.add_argument(
        "--seed", type=int, default=0, help="training seed: weights, batches and noise derive from it"
    )
    tr.add_argument("--checkpoint-every", type=_positive_int, default=250, help="steps between checkpoints")
    tr.add_argument(
        "--schedule",
        default="cosine",
        help="learning rate after warm-up: cosine (decays to 10%% at --steps), constant (extendable: "
        "a longer run's snapshots equal shorter runs) or wsd (constant, then a linear decay to 0 over "
        "the last --decay-steps)",
    )
    tr.add_argument(
        "--decay-steps", type=_positive_int, default=0, help="--schedule wsd: steps of the final decay"
    )
    tr.add_argument(
        "--init-from",
        type=_path,
        default=None,
        metavar="RUN|CHECKPOINT",
        help="start from a constant-lr training run's checkpoint (exact), or from a policy it saved, e.g. "
        "a shipped snapshot (weights only, fresh optimiser); same settings, its step before this run's "
        "decay: a decay branched off a long run, or a long run continued on another machine",
    )
    tr.add_argument(
        "--snapshot-every",
        type=int,
        default=0,
        help="keep the policy every N steps in OUT/snapshots/step-N (learning curves; 0: none)",
    )
    tr.add_argument(
        "--ema-decay", type=float, default=0.999, help="EMA of the weights to save (0: the raw weights)"
    )
    tr.add_argument(
        "--threads", type=_positive_int, default=2, help="torch threads (1 when other jobs share the cores)"
    )
    tr.add_argument(
        "--grad-accum",
        type=_positive_int,
        default=1,
        help="micro-batches of --batch-size summed into each optimiser step (a larger effective batch)",
    )
    _add_device_argument(tr)
    _add_key_value_option(
        tr,
        "--model-option",
        "model config override (a field of the policy's config, e.g. divla_eval/divla/config.py), "
        "e.g. reasoning_injection=false or alpha=1 (repeat it; an unknown name lists the model's)",
        deprecated="--option",
    )
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_curve_parser(sub) -> None:
    """`divla-eval curve`."""
    cur = sub.add_parser(
        "curve", help="learning curve: evaluate a training run's snapshots on a fixed grid, plot success"
    )
    cur.add_argument("train_dir", type=_path, help="a `divla-eval train --snapshot-every N` output directory")
    cur.add_argument("--task", required=True, help="task whose cells are evaluated")
    cur.add_argument(
        "--split", action="append", default=[], help="cell (repeat it; default: every split of the task)"
    )
    cur.add_argument("--difficulty", default=None, help="task difficulty (default: the task's first)")
    cur.add_argument("--episodes", type=_positive_int, default=20, help="per cell and snapshot (default 20)")
    cur.add_argument("--seed", type=int, default=0, help="run seed: the same episodes for every snapshot")
    cur.add_argument("--every", type=_positive_int, default=1, help="every k-th snapshot (the last always)")
    cur.add_argument("--max-steps", type=_positive_int, default=None, help="cap each episode (a quick look)")
    cur.add_argument("--out", type=_path, required=True, help="folder for the runs, curve.md/.csv/.png")
    cur.add_argument("--workers", type=_positive_int, default=1, help="parallel simulator processes")
    cur.add_argument("--threads", type=_positive_int, default=None, help="torch threads per worker")
    cur.add_argument("--no-progress", action="store_true", help="no progress bar")
    cur.add_argument(
        "--table-only", action="store_true", help="only rebuild curve.md/.csv/.png from the runs"
    )
    _add_device_argument(cur)


def _add_serve_parser(sub) -> None:
    """`divla-eval serve`."""
    srv = sub.add_parser(
        "serve", help="serve a policy over openpi's websocket protocol (evaluate it with --policy remote)"
    )
    srv.add_argument(
        "--policy", required=True, help="registered policy, e.g. divla, diffusion_policy, random"
    )
    srv.add_argument(
        "--checkpoint", type=_dir_text, default=None, help="checkpoint directory for a learned policy"
    )
    srv.add_argument(
        "--policy-option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="inference option, as for `run` (the server's defaults for every client)",
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed)")
    srv.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Api-Key KEY' (default: $DIVLA_EVAL_API_KEY); needed off loopback",
    )
    srv.add_argument(
        "--max-batch",
        type=_positive_int,
        default=1,
        help="stack up to N concurrent requests into one forward pass (policies with infer_batch)",
    )
    srv.add_argument("--max-wait-ms", type=float, default=0.0, help="wait this long for a batch to fill")
    srv.add_argument("--max-message-mb", type=float, default=64.0, help="largest message accepted")
    srv.add_argument("--action-dim", type=_positive_int, default=7, help="for policies without a checkpoint")
    srv.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: all)")
    _add_device_argument(srv)


def _add_bench_parser(sub) -> None:
    """`divla-eval bench`."""
    be = sub.add_parser("bench", help="time every policy's inference the same way (divla_eval.timing)")
    be.add_argument(
        "--policies",
        default="divla,diffusion_policy",
        help="comma-separated registered policies, e.g. divla,openvla,octo,diffusion_policy",
    )
    be.add_argument(
        "--checkpoint",
        type=_option,
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="checkpoint for a policy (default: checkpoints/NAME-TASK, else its untrained default config)",
    )
    be.add_argument("--task", default="bin_picking", help="task whose scene gives the observation")
    be.add_argument(
        "--policy-option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="inference option (as for `run`), given to every policy in --policies that accepts it",
    )
    be.add_argument(
        "--model-option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model config for untrained models timed instead of checkpoints, e.g. text_hidden=512, given "
        "to every policy in --policies that takes it (DiVLA and OpenVLA at a larger equal backbone)",
    )
    be.add_argument("--calls", type=_positive_int, default=50, help="timed calls per policy and variant")
    be.add_argument("--warmup", type=int, default=5, help="untimed calls before them")
    be.add_argument("--threads", type=_positive_int, default=1, help="torch threads (set explicitly)")
    _add_device_argument(be)
    be.add_argument("--image-size", type=_positive_int, default=84, help="for policies without their own")
    be.add_argument("--out", type=_path, default=Path("results/bench"), help="writes speed.csv and speed.md")
    be.add_argument(
        "--profile",
        action="store_true",
        help="also time each policy's stages under torch.profiler (its record_function labels, e.g. "
        "divla.*); prints them and writes profile.md",
    )
    be.add_argument("--no-progress", action="store_true", help="no progress bar")


def _checkpoint_tag(checkpoint: str) -> str:
    """A checkpoint's part of a default run directory's name: its directory's name (`runs/train/mine`
    -> `mine`), so that evaluating another checkpoint is another run, not a refused resume."""
    import os

    return Path(os.path.abspath(checkpoint)).name or "root"


def _default_run_dir(cfg, task) -> Path:
    """runs/TASK-[DIFFICULTY-]SPLIT-POLICY[-CHECKPOINT][-OPTIONS]-seedN: what makes it another run is
    in the name (other inference options, another checkpoint, another difficulty)."""
    parts = [cfg.task]
    if task.difficulties != (None,):
        parts.append(str(cfg.difficulty))
    parts += [cfg.split, cfg.policy]
    if cfg.checkpoint is not None:
        parts.append(_checkpoint_tag(cfg.checkpoint))
    options = "".join(f"-{k}{v}" for k, v in sorted(cfg.policy_options.items()))
    name = "-".join(parts) + f"{options}-seed{cfg.seed}"
    # a URL (remote) or module:factory name must not nest directories or need quoting
    return Path("runs") / re.sub(r"[^A-Za-z0-9._=+-]+", "_", name)


def _cmd_run(args) -> int:
    import dataclasses

    from divla_eval.metrics import wilson_interval
    from divla_eval.policy import default_policy, parse_policy_options
    from divla_eval.records import policy_label
    from divla_eval.runner import Run, RunConfig, run, validate
    from divla_eval.tasks import get_task, parse_task_options

    note = None
    if args.policy is None:
        args.policy, default_checkpoint, note = default_policy(args.task)
        args.checkpoint = args.checkpoint or default_checkpoint
    if ":" in args.policy and "" not in sys.path and str(Path.cwd()) not in sys.path:
        # `--policy mypkg.policies:MyPolicy` finds mypkg in the current directory, as `python -m` would
        # (a console script's path lacks it); appended, so it shadows nothing installed
        sys.path.append(str(Path.cwd()))
    task_options = parse_task_options(args.task, dict(args.task_option))
    task = get_task(args.task, **task_options)  # the one build of the task; every run below is handed it
    splits = [args.split] if args.split is not None else list(task.default_splits)
    base = RunConfig(
        task=args.task,
        split=splits[0],
        policy=args.policy,
        difficulty=args.difficulty if args.difficulty is not None else task.difficulties[0],
        episodes=args.episodes,
        seed=args.seed,
        perturbations=tuple(args.perturb),
        checkpoint=args.checkpoint,
        image_size=args.image_size,
        max_steps=args.max_steps,
        task_options=task_options,
        matched_control=args.matched_control,
        policy_options=parse_policy_options(args.policy, dict(args.policy_option)),
    )
    # several splits (multitask's sub-tasks): one run each, every one checked before the first starts
    runs = [validate(Run.resolve(dataclasses.replace(base, split=split), task)) for split in splits]
    from divla_eval.device import resolve_device

    device = resolve_device(args.device)
    if note:
        print(note, file=sys.stderr)
    if len(runs) > 1:
        print(
            f"note: {args.task} without --split runs each of its splits in turn ({', '.join(splits)}), one "
            "run directory each; --split NAME runs one",
            file=sys.stderr,
        )
    for resolved in runs:
        cfg = resolved.cfg
        if args.out is None:
            out = _default_run_dir(cfg, task)
        else:
            out = args.out / cfg.split if len(runs) > 1 else args.out
        try:
            summary = run(
                resolved,
                out,
                progress=not args.no_progress,
                video=args.video,
                workers=args.workers,
                threads=args.threads,
                device=device,
                backend=args.backend,
                ray_address=args.ray_address,
            )
        except KeyboardInterrupt:
            print(
                f"\ninterrupted: finished episodes are saved in {out}; rerun the same command to resume",
                file=sys.stderr,
            )
            return 130
        n = len(summary.records)
        k = sum(r.success for r in summary.records)
        lo, hi = wilson_interval(k, n)
        cell = cfg.split if task.difficulties == (None,) else f"{cfg.difficulty}, {cfg.split}"
        print(
            f"{cfg.task} [{cell}] policy={policy_label(cfg.policy, cfg.policy_options)}: "
            f"success {k}/{n} = {k / n:.1%} "
            f"(95% CI {lo:.1%}-{hi:.1%}); ran {summary.ran}, resumed past {summary.skipped}, "
            f"errors {summary.errors}"
        )
        print(f"results: {out / 'episodes.jsonl'}  (report: divla-eval report {out})")
    if len(runs) > 1 and args.out is not None:
        print(f"all {len(runs)} splits in one grid: divla-eval summary {args.out}")
    return 0


def _cmd_list(args) -> int:
    if args.kind == "tasks":
        from divla_eval.tasks import TASKS

        rows = TASKS.describe()
    elif args.kind == "policies":
        from divla_eval.policy import POLICIES

        rows = POLICIES.describe()
    elif args.kind == "perturbations":
        from divla_eval.envs.perturbations import PERTURBATIONS

        rows = PERTURBATIONS.describe()
        if not rows:
            print("(no perturbations registered yet)")
    else:
        from divla_eval.envs.objects import SPLITS, objects

        splits = [args.split] if args.split else list(SPLITS)
        for split in splits:
            objs = objects(split)
            print(f"# {split}: {len(objs)} objects")
            for o in objs:
                print(f"{o.id:24s} {o.category:9s} {o.name}")
        return 0
    width = max((len(n) for n, _ in rows), default=0)
    for name, description in rows:
        print(f"{name:{width}s}  {description}")
    return 0


def _cmd_report(args) -> int:
    from divla_eval.report import write_report

    path = write_report(args.run_dir)
    print(f"wrote {path}")
    print(f"wrote {path.with_name('report.html')} (open it in a browser; no server needed)")
    return 0


def _cmd_summary(args) -> int:
    from divla_eval.report import write_summary

    path = write_summary(args.root, args.out)
    print(f"wrote {path}")
    return 0


def _cmd_tables(args) -> int:
    from divla_eval.paper import write_paper_tables
    from divla_eval.readme_table import read_readme, update_readme

    if args.readme is not None:
        read_readme(args.readme)  # a missing marker is refused before the runs are read
    from divla_eval.html_report import tables_html_path

    path = write_paper_tables(args.root, args.out)
    print(f"wrote {path}")
    print(f"wrote {tables_html_path(path)}")
    if args.readme is not None:
        print(f"updated the results table in {update_readme(args.readme, args.root)}")
    return 0


def _cmd_compare(args) -> int:
    from divla_eval.report import compare_runs

    print(compare_runs(args.run_a, args.run_b))
    return 0


def _cmd_train(args) -> int:
    from divla_eval.train import TrainConfig, check_demos_task, is_loss, parse_model_options, train

    cfg = TrainConfig(
        policy=args.policy,
        demos=args.demos,
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        schedule=args.schedule,
        decay_steps=args.decay_steps,
        init_from=str(args.init_from) if args.init_from else "",
        snapshot_every=args.snapshot_every,
        ema_decay=args.ema_decay,
        threads=args.threads,
        grad_accum=args.grad_accum,
        device=args.device,
        options=parse_model_options(args.policy, dict(args.model_option)),
    )
    if args.task is not None:
        for path in cfg.demos:
            check_demos_task(path, args.task)
    try:
        s = train(cfg, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: the last checkpoint is in {args.out}/checkpoint; rerun to resume",
            file=sys.stderr,
        )
        return 130
    if not s.get("main_process", True):  # another process of `accelerate launch`: the main one reports
        return 0
    losses = ", ".join(f"{k} {v:.4f}" for k, v in s["final"].items() if is_loss(k))
    print(f"trained {cfg.policy} for {s['steps']} steps ({s['seconds']:.0f} s this session): {losses}")
    task = f" --task {args.task}" if args.task is not None else ""
    evaluate = f"divla-eval run{task} --policy {cfg.policy} --checkpoint {s['out']}"
    print(f"checkpoint: {s['out']}  (evaluate: {evaluate})")
    return 0


def _cmd_curve(args) -> int:
    import shlex

    from divla_eval.curves import CurveConfig, evaluate, write_curve
    from divla_eval.device import resolve_device

    resolve_device(args.device)  # a device that is not there fails before any snapshot is read

    cfg = CurveConfig(
        train_dir=args.train_dir,
        task=args.task,
        out=args.out,
        splits=tuple(args.split),
        difficulty=args.difficulty,
        episodes=args.episodes,
        seed=args.seed,
        every=args.every,
        max_steps=args.max_steps,
        workers=args.workers,
        threads=args.threads,
        device=args.device,
    )
    command = "divla-eval " + shlex.join(args.argv)
    try:
        if not args.table_only:
            evaluate(cfg, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished episodes are saved in {cfg.out}; rerun to resume", file=sys.stderr)
        return 130
    md, png = write_curve(cfg, command)
    print(f"wrote {md} and {png}")
    return 0


def _cmd_serve(args) -> int:
    import logging
    import os

    from divla_eval.policy import (
        POLICIES,
        TORCH_THREADS_ENV,
        ChecksCheckpoint,
        LoadsCheckpoint,
        PrivilegedPolicy,
        make_policy,
        parse_policy_options,
        requires_checkpoint,
    )
    from divla_eval.remote.client import API_KEY_ENV
    from divla_eval.remote.server import PolicyServer

    POLICIES.check_name(args.policy)
    factory = POLICIES.get(args.policy)
    if isinstance(factory, PrivilegedPolicy):  # its class binds to the simulator
        raise DivlaEvalError(
            f"policy {args.policy!r} cannot be served: the scripted expert reads the simulator's state, "
            "which a client does not send; serve a learned policy or random"
        )
    if args.policy == "remote":
        raise DivlaEvalError("policy 'remote' is a client; serve the policy itself where it runs")
    if args.checkpoint is None and requires_checkpoint(factory):
        raise DivlaEvalError(f"policy {args.policy!r} needs --checkpoint DIR")
    if args.checkpoint is not None:
        if not isinstance(factory, LoadsCheckpoint):
            raise DivlaEvalError(
                f"policy {args.policy!r} takes no checkpoint (got --checkpoint {args.checkpoint})"
            )
        from divla_eval.runner import check_weights_file
        from divla_eval.safe_io import require_dir

        require_dir(Path(args.checkpoint), "checkpoint directory")  # a file is not "missing"
        if isinstance(factory, ChecksCheckpoint):
            factory.check_checkpoint(args.checkpoint)
            check_weights_file(Path(args.checkpoint) / "model.safetensors")
    if not 0 <= args.port <= 65535:
        raise DivlaEvalError(f"--port must be in 0..65535, got {args.port}")
    if args.threads is not None:
        os.environ[TORCH_THREADS_ENV] = str(args.threads)
    options = parse_policy_options(args.policy, dict(args.policy_option))
    from divla_eval.device import resolve_device

    device = resolve_device(args.device)
    policy = make_policy(
        args.policy, args.checkpoint, action_dim=args.action_dim, options=options, device=device
    )
    server = PolicyServer(
        policy,
        args.policy,
        host=args.host,
        port=args.port,
        options=options,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_message_mb=args.max_message_mb,
    )
    server.metadata["device"] = device
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    server.start()
    print(
        f"serving {args.policy} on {server.url} (health: http://{args.host}:{server.port}/healthz); "
        f"evaluate it with: divla-eval run --policy remote --policy-option url={server.url}",
        flush=True,
    )
    try:
        server.wait()
    except KeyboardInterrupt:
        print("stopping the server", file=sys.stderr)
    finally:
        server.stop()
    return 0


def _cmd_collect(args) -> int:
    from divla_eval.data.collect import CollectConfig, collect
    from divla_eval.tasks import parse_task_options

    cfg = CollectConfig(
        task=args.task,
        split=args.split,
        episodes=args.episodes,
        seed=args.seed,
        difficulty=args.difficulty,
        perturbations=tuple(args.perturb),
        image_size=args.image_size,
        max_steps=args.max_steps,
        task_options=parse_task_options(args.task, dict(args.task_option)),
    )
    try:
        s = collect(
            cfg,
            args.out,
            progress=not args.no_progress,
            workers=args.workers,
            backend=args.backend,
            ray_address=args.ray_address,
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished demos are saved in {args.out} (or in {args.out}.partial/ until a "
            "rerun merges them); rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    failed = ""
    if s.failed:
        keys = sorted(s.failed)
        shown = ", ".join(f"{k} ({s.failed[k]})" for k in keys[:10])
        failed = f": {shown}{', ...' if len(keys) > 10 else ''}"
    print(f"collected {s.demos} demos from {s.episodes} episodes ({len(s.failed)} failed{failed})")
    print(f"{s.samples} samples in {s.path}; ran {s.ran}, resumed past {s.skipped}")
    if s.new_demos and s.seconds > 0:
        rate = s.new_demos / s.seconds * 3600
        workers = f"{args.workers} {'Ray actors' if args.backend == 'ray' else 'workers'}"
        print(f"rate: {s.new_demos} new demos in {s.seconds:.0f} s = {rate:.0f} demos/hour ({workers})")
    return 0


def _cmd_bench(args) -> int:
    import shlex
    import tempfile

    from tqdm import tqdm

    from divla_eval.policy import POLICIES, PrivilegedPolicy
    from divla_eval.tasks import TASKS

    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    if not names:
        raise DivlaEvalError("--policies needs at least one registered policy name")
    TASKS.check_name(args.task)
    for name in names:  # every name is checked before anything heavy is imported or built
        POLICIES.check_name(name)
    checkpoints = dict(args.checkpoint)
    for name, path in checkpoints.items():
        if name not in names:
            raise DivlaEvalError(f"--checkpoint {name}={path}: {name!r} is not in --policies {args.policies}")
    if args.warmup < 0:
        raise DivlaEvalError(f"--warmup must be >= 0, got {args.warmup}")
    from divla_eval.policy import inference_options, parse_policy_options

    raw = dict(args.policy_option)
    accepted = {name: inference_options(name) for name in names}
    for key in raw:
        if not any(key in valid for valid in accepted.values()):
            valid = sorted({k for v in accepted.values() for k in v})
            raise DivlaEvalError(
                f"--policy-option {key}: no policy in --policies {args.policies} takes it; "
                f"valid: {', '.join(valid) if valid else 'none'}"
            )
    options = {  # each policy gets the options it accepts, typed
        name: parse_policy_options(name, {k: v for k, v in raw.items() if k in accepted[name]})
        for name in names
    }

    from divla_eval.timing import (
        SceneObservations,
        build_policy,
        check_policy,
        current_variant,
        display_profile,
        display_table,
        headline_ratio,
        image_size_of,
        machine_info,
        profile_policy,
        table,
        time_variants,
        write_outputs,
        write_profile,
    )

    model_raw = dict(args.model_option)
    if model_raw and checkpoints:
        raise DivlaEvalError("--model-option builds untrained models of that size; it excludes --checkpoint")
    model_options = {name: {} for name in names}
    if model_raw:
        from divla_eval.train import RECIPES

        takes = {n: RECIPES.get(n).option_names() if n in RECIPES else set() for n in names}
        for key in model_raw:
            if not any(key in t for t in takes.values()):
                valid = sorted(set().union(*takes.values()))
                raise DivlaEvalError(
                    f"--model-option {key}: no policy in --policies {args.policies} takes it; "
                    f"valid: {', '.join(valid) if valid else 'none (no policy here has a model to size)'}"
                )
        from divla_eval.train import parse_model_options

        model_options = {  # each policy gets the fields it has, typed by its own config
            n: parse_model_options(n, {k: v for k, v in model_raw.items() if k in takes[n]})
            if takes[n]
            else {}
            for n in names
        }
    for name in names:  # checkpoint directories too, before the first model is built
        check_policy(name, args.task, checkpoints.get(name), options[name])
    from divla_eval.device import describe_device, resolve_device
    from divla_eval.safe_io import check_writable_dir

    device = resolve_device(args.device)  # a bad device is refused before anything is written
    check_writable_dir(args.out, "--out directory")  # before minutes of timing, not after

    progress = not args.no_progress
    machine = machine_info()  # before any work of ours: its load average is the other jobs'
    machine["device"] = describe_device(device)
    built = []
    with tempfile.TemporaryDirectory(prefix="divla-bench-") as work:
        # every policy is built before the scene's renderer exists: building an untrained model
        # collects a demo, with its own renderer (one renderer per process)
        for name in tqdm(names, desc="build", disable=not progress):
            ckpt = checkpoints.get(name)
            policy, label = build_policy(
                name,
                args.task,
                ckpt,
                args.image_size,
                Path(work),
                options[name],
                model_options[name],
                device=device,
            )
            built.append((name, policy, label))
    scene = SceneObservations(args.task)
    rows, profiles = [], []
    try:
        for name, policy, label in tqdm(built, desc="time", disable=not progress):
            obs = scene.get(policy.metadata.cameras, image_size_of(policy, args.image_size))
            if isinstance(policy, PrivilegedPolicy):  # the expert reads the scene's simulator, as in runs
                policy.bind(scene.env.sim, scene.env.episode)
            timed = time_variants(
                policy,
                obs,
                name=name,
                checkpoint=label,
                threads=args.threads,
                warmup=args.warmup,
                calls=args.calls,
                options=options[name],
            )
            rows += timed
            if args.profile:  # the policy as built: its first variant unless an option changed it
                variant = current_variant(policy, options[name])
                shown = [variant] + [f"{k}={v}" for k, v in options[name].items()]
                title = f"{name} ({', '.join(shown)}), {label}"
                kw = dict(threads=args.threads, warmup=args.warmup, calls=args.calls)
                prof = profile_policy(policy, obs, prefix=f"{name}.", **kw)
                note = f"{args.calls} calls under torch.profiler: {prof.ms.iloc[-1]:.1f} ms per call"
                unprofiled = [r.mean_ms for r in timed if r.variant == variant]
                if unprofiled:
                    note += f"; the speed table's unprofiled mean: {unprofiled[0]:.1f} ms"
                profiles.append((title, note, prof))
    finally:
        scene.close()
    df = table(rows)
    command = "divla-eval " + shlex.join(args.argv)
    csv, md = write_outputs(df, args.out, command, machine)
    print(display_table(df).to_string(index=False))
    ratio = headline_ratio(df)
    if ratio:
        print(ratio)
    print(f"wrote {csv} and {md}")
    if args.profile:
        for title, note, prof in profiles:
            print(f"\n{title}: stages of one infer call ({note})")
            print(display_profile(prof).to_string(index=False))
        print(f"wrote {write_profile(profiles, args.out, command, args.threads, machine)}")
    return 0


def _cmd_regression(args) -> int:
    from divla_eval.regression import cmd_regression

    return cmd_regression(args)


def _cmd_experiment(args) -> int:
    from divla_eval.experiments import run_command

    return run_command(args)


def _stop_like_ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # `bench` writes the exact command into its results
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:
        # `kill`, a batch scheduler or a closing session stops with SIGTERM: end as Ctrl-C does, so
        # the commands' interrupt handling saves what finished and says how to resume. Background
        # jobs of a script cannot be sent SIGINT at all (the shell ignores it for them).
        previous = signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    try:
        return {
            "run": _cmd_run,
            "list": _cmd_list,
            "report": _cmd_report,
            "summary": _cmd_summary,
            "compare": _cmd_compare,
            "tables": _cmd_tables,
            "collect": _cmd_collect,
            "train": _cmd_train,
            "bench": _cmd_bench,
            "serve": _cmd_serve,
            "curve": _cmd_curve,
            "experiment": _cmd_experiment,
            "regression": _cmd_regression,
        }[args.command](args)
    except DivlaEvalError as exc:
        print(f"divla-eval: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
