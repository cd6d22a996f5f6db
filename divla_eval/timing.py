"""The one inference-timing protocol, used for every policy (`divla-eval bench`).

Speed claims compare policies that execute different numbers of actions per call (DiVLA and
Diffusion Policy run 8 of a 16-action chunk, an autoregressive OpenVLA-style policy one), so calls per
second alone would flatter the one that calls most often. Every policy is therefore timed the same
way and reported in actions per second as well:

- the same observation: one scene of the task, rendered once, at each policy's cameras and size;
- batch 1, torch threads set explicitly (a busy or larger machine otherwise picks its own count);
- `warmup` untimed calls (lazy allocations, caches), then `reset` and `calls` timed calls, so the
  timed calls are an episode's first calls, as the runner makes them (a policy that does extra work
  at an episode's first call, or every k-th call, pays for it in proportion);
- per-call latency p50 / p95 / p99 / mean from `time.perf_counter`;
- actions per call = min(execute_steps, chunk length): what the runner executes before the next
  call; actions per second = total executed actions / total inference seconds.

`profile_policy` (`bench --profile`) splits the same calls into a policy's labelled stages
(`torch.profiler.record_function`, e.g. DiVLA's vision, reasoning generation, DDIM; see
`divla_eval.divla.model.STAGES`), as shares of the call's wall time.

Weight values do not change the time of a call, with one exception: DiVLA's reasoning phrase is
generated token by token until </s>, so an untrained model's phrase length (and time) differ from a
trained one's. Trained checkpoints are preferred; a table row says which weights it timed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from divla_eval.errors import DivlaEvalError
from divla_eval.policy import Observation, TimedPolicy

UNTRAINED = "untrained default config"


@dataclass(frozen=True)
class TimingRow:
    policy: str
    variant: str
    threads: int
    warmup: int
    calls: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    actions_per_call: float
    actions_per_s: float
    hz: float
    """Calls per second (1 / mean latency)."""
    params: int | None
    backbone_params: int | None
    """Vision encoder + language model (see `backbone_parameter_count`), the size the paper's speed
    comparison holds equal; None for a policy without them."""
    checkpoint: str
    settings: str = ""
    """Attribute values the variant set on the policy, e.g. `reasoning_every=4`."""


def _set_torch_threads(threads: int) -> None:
    try:
        import torch
    except ImportError:  # a policy without torch (random) has nothing to set
        return
    torch.set_num_threads(threads)


def parameter_count(policy) -> int | None:
    model = getattr(policy, "model", None)
    params = getattr(model, "parameters", None)
    if params is None:
        return None
    return int(sum(p.numel() for p in params()))


BACKBONE = ("vision", "mm_projector", "decoder", "lm_head")
"""Submodules that make up a VLA's vision-language backbone (DiVLA, OpenVLA-style): what remains is
the action head (DiVLA's diffusion UNet), which the paper's "equal backbone size" does not fix."""


def backbone_parameter_count(policy) -> int | None:
    model = getattr(policy, "model", None)
    if model is None or not all(hasattr(model, m) for m in ("vision", "decoder")):
        return None
    return int(sum(p.numel() for m in BACKBONE if hasattr(model, m) for p in getattr(model, m).parameters()))


def time_policy(
    policy,
    obs: Observation,
    *,
    name: str | None = None,
    variant: str = "default",
    settings: str = "",
    checkpoint: str | None = None,
    threads: int = 1,
    warmup: int = 5,
    calls: int = 50,
    seed: int = 0,
    timer: Callable[[], float] = time.perf_counter,
) -> TimingRow:
    """Time `calls` calls of `policy.infer(obs)` after `warmup` untimed ones (see the module doc)."""
    if calls < 1 or warmup < 0 or threads < 1:
        raise DivlaEvalError(f"need calls >= 1, warmup >= 0, threads >= 1; got {calls}, {warmup}, {threads}")
    _set_torch_threads(threads)
    policy.reset(obs.instruction, seed)
    for _ in range(warmup):
        policy.infer(obs)
    policy.reset(obs.instruction, seed)  # the timed calls are an episode's first `calls` calls
    k = max(1, policy.metadata.execute_steps)
    seconds = np.empty(calls)
    actions = np.empty(calls)
    for i in range(calls):
        t0 = timer()
        chunk = policy.infer(obs)
        seconds[i] = timer() - t0
        actions[i] = min(k, len(chunk.actions))
    ms = seconds * 1000.0
    mean_s = float(seconds.mean())
    return TimingRow(
        policy=name or policy.metadata.name,
        variant=variant,
        threads=threads,
        warmup=warmup,
        calls=calls,
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()),
        actions_per_call=float(actions.mean()),
        actions_per_s=float(actions.sum() / seconds.sum()),
        hz=1.0 / mean_s,
        params=parameter_count(policy),
        backbone_params=backbone_parameter_count(policy),
        checkpoint=checkpoint or UNTRAINED,
        settings=settings,
    )


def variants(policy, fixed=()) -> dict[str, dict]:
    """The settings a policy asks to be timed under (`timing_variants` on its class: label ->
    attribute values), or one default variant. Keeping the list on the policy means the bench
    knows no policy by name. A variant that sets one of the `fixed` names (inference options the
    user gave with --policy-option) is left out: the user's value wins."""
    found = dict(policy.timing_variants or {}) if isinstance(policy, TimedPolicy) else {}
    found = {label: attrs for label, attrs in found.items() if not set(attrs) & set(fixed)}
    return found or {"default": {}}


def time_variants(policy, obs: Observation, options: dict | None = None, **kw) -> list[TimingRow]:
    """One row per variant; the policy's attributes are restored afterwards. `options`: the
    inference options the policy was built with, named in each row's settings."""
    options = dict(options or {})
    rows = []
    for label, attrs in variants(policy, options).items():
        old = {a: getattr(policy, a) for a in attrs}
        try:
            for a, v in attrs.items():
                setattr(policy, a, v)
            settings = " ".join(f"{a}={v}" for a, v in {**options, **attrs}.items())
            rows.append(time_policy(policy, obs, variant=label, settings=settings, **kw))
        finally:
            for a, v in old.items():
                setattr(policy, a, v)
    return rows


# --- where a call's time goes ----------------------------------------------------------------------------
def current_variant(policy, fixed=()) -> str:
    """The label of the variant (see `variants`) whose settings the policy has now, else "as built"."""
    for label, attrs in variants(policy, fixed).items():
        if all(getattr(policy, a) == v for a, v in attrs.items()):
            return label
    return "as built"


def profile_policy(
    policy,
    obs: Observation,
    *,
    prefix: str | None = None,
    threads: int = 1,
    warmup: int = 5,
    calls: int = 50,
    seed: int = 0,
) -> pd.DataFrame:
    """Where `policy.infer(obs)`'s time goes: the same protocol as `time_policy` (threads, `warmup`
    untimed calls, `reset`, `calls` calls), with the timed calls run under `torch.profiler` (CPU
    activity only). Returns one row per `torch.profiler.record_function` label that starts with
    `prefix` (default: the policy's name and a dot, e.g. "divla."; see `divla_eval.divla.model.STAGES`),
    in order of first use, then "other" (the rest of the infer calls' wall time) and "total".

    Columns: label, calls (how many times the label ran over all `calls` infer calls), ms (its time per
    infer call), share (of the infer calls' wall time; the rows before "total" add up to 1). A label
    inside another label of the policy counts in its own row but not again in "other". A policy
    without labels gets only "total". Times include the profiler's own overhead per operator, so the
    total is somewhat above `time_policy`'s mean."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if calls < 1 or warmup < 0 or threads < 1:
        raise DivlaEvalError(f"need calls >= 1, warmup >= 0, threads >= 1; got {calls}, {warmup}, {threads}")
    prefix = f"{policy.metadata.name}." if prefix is None else prefix
    torch.set_num_threads(threads)
    policy.reset(obs.instruction, seed)
    for _ in range(warmup):
        policy.infer(obs)
    policy.reset(obs.instruction, seed)
    wall_s = 0.0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            t0 = time.perf_counter()
            policy.infer(obs)
            wall_s += time.perf_counter() - t0
    wall_us = wall_s * 1e6
    totals: dict[str, list] = {}  # label -> [count, microseconds]
    outermost_us = 0.0  # time inside labels that no other label of the policy encloses
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        if not ev.name.startswith(prefix):
            continue
        us = ev.time_range.elapsed_us()
        entry = totals.setdefault(ev.name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith(prefix):
            parent = parent.cpu_parent
        if parent is None:
            outermost_us += us
    rows = [(label, count, us / 1000 / calls, us / wall_us) for label, (count, us) in totals.items()]
    if rows:
        rest = wall_us - outermost_us
        rows.append(("other", calls, rest / 1000 / calls, rest / wall_us))
    rows.append(("total", calls, wall_us / 1000 / calls, 1.0))
    return pd.DataFrame(rows, columns=["label", "calls", "ms", "share"])


def display_profile(df: pd.DataFrame) -> pd.DataFrame:
    shown = df.rename(columns={"ms": "ms per infer call"}).copy()
    shown["ms per infer call"] = shown["ms per infer call"].map(lambda v: f"{v:.2f}")
    shown["share"] = shown["share"].map(lambda v: f"{100 * v:.1f}%")
    return shown


PROFILE_NOTES = """\
- Each policy as built (its first variant), same observation and protocol as speed.md: `warmup`
  untimed calls, then `reset` and `calls` calls under torch.profiler (CPU activity only).
- calls: how often the label ran over all timed infer calls; ms per infer call: its total time / infer
  calls; share: of the infer calls' wall time. other: the rest of `infer` (image conversion, greedy
  argmax, noise draw, ...). The profiler adds a little time per operator, which weighs most on stages
  of many small operators (DiVLA's DDIM loop): compare each total with the unprofiled mean above its
  table, and use this table for shares, not for speed claims.
- DiVLA's labels (`STAGES` in divla_eval/divla/model.py): vision, prompt, reasoning_prefix (the
  generation's pass over visual tokens + prompt), reasoning_token (one pass per generated token),
  action_pass (</s> + action tokens after the phrase), forced_pass (a reused phrase's single pass),
  condition (projector + proprioception), ddim (the denoising loop)."""


def write_profile(
    profiles: list[tuple[str, str, pd.DataFrame]],
    out: Path,
    command: str,
    threads: int,
    info: dict | None = None,
) -> Path:
    """profile.md: one stage table per (title, note, `profile_policy` table)."""
    from divla_eval.report import markdown_table
    from divla_eval.safe_io import ensure_dir, write_text

    ensure_dir(out, "--out directory")
    md = out / "profile.md"
    info = info or machine_info()
    load = f"; load average {info['load']:.1f} when it started" if "load" in info else ""
    lines = [
        "# Where inference time goes",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores{load}; torch {info['torch']}, {threads} thread(s); "
        f"device {info.get('device', 'cpu')}; "
        f"Python {info['python']}; {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
    ]
    for title, note, df in profiles:
        lines += [f"## {title}", "", f"{note}.", "", markdown_table(display_profile(df)), ""]
    lines += ["Notes:", "", PROFILE_NOTES, ""]
    write_text(md, "\n".join(lines))
    return md


# --- the fixed observation -----------------------------------------------------------------------------
class SceneObservations:
    """One episode's first state, rendered at each requested image size (once per size), so every
    policy is timed on the same scene. One env, hence one renderer, per process (DESIGN.md)."""

    def __init__(
        self, task: str = "bin_picking", split: str | None = None, episode_index: int = 0, seed: int = 0
    ):
        from divla_eval.tasks import make_env

        self.env = make_env(task, split=_split(task, split), cameras=(), run_seed=seed)
        self.env.reset(options={"episode_index": episode_index})
        self._cache: dict[tuple[tuple[str, ...], int], Observation] = {}

    def get(self, cameras: tuple[str, ...], image_size: int = 84) -> Observation:
        key = (tuple(cameras), int(image_size))
        if key not in self._cache:
            env = self.env
            if env.image_size != image_size:
                env.image_size = int(image_size)
                if env._renderer is not None:  # a renderer draws at one size: replace it
                    env._renderer.close()
                    env._renderer = None
            raw = env.observe(cameras=key[0])
            self._cache[key] = Observation(
                {c: raw[c] for c in key[0]}, raw["proprio"], raw["instruction"], env.embodiment
            )
        return self._cache[key]

    def close(self) -> None:
        self.env.close()


def _split(task: str, split: str | None) -> str:
    from divla_eval.tasks import get_task

    splits = get_task(task).splits
    if split is not None:
        return split
    return "unseen" if "unseen" in splits else splits[0]


def image_size_of(policy, default: int = 84) -> int:
    """The resolution a learned policy was built for (its config's `image_size`), else `default`."""
    cfg = getattr(getattr(policy, "model", None), "cfg", None)
    return int(getattr(cfg, "image_size", default) or default)


# --- building the policies ------------------------------------------------------------------------------
def _needs_checkpoint(name: str) -> bool:
    """Whether a registered policy needs a checkpoint: without one, the bench builds it untrained."""
    from divla_eval.policy import POLICIES, requires_checkpoint

    return requires_checkpoint(POLICIES.get(name))


def shipped_checkpoint(name: str, task: str) -> Path | None:
    """checkpoints/<policy>-<task>/ when the repository ships one."""
    from divla_eval.policy import REFERENCE_DIR

    path = REFERENCE_DIR / f"{name}-{task}"
    return path if (path / "model.safetensors").is_file() else None


def _trained_image_size(checkpoint: str | Path | None, default: int = 84) -> int:
    """config.json's image_size of a checkpoint directory (a damaged or absent one is for `validate`
    to report), else `default`."""
    try:
        size = json.loads((Path(checkpoint) / "config.json").read_text()).get("image_size")
    except (TypeError, OSError, ValueError, AttributeError):
        return default
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else default


def check_policy(
    name: str, task: str = "bin_picking", checkpoint: str | Path | None = None, options: dict | None = None
) -> str | None:
    """Validate a policy, its checkpoint and inference options the way `divla-eval run` does
    (one-line errors, nothing built); returns the checkpoint to use: the one given, else the
    shipped one, else None."""
    from divla_eval.policy import POLICIES
    from divla_eval.runner import RunConfig, validate
    from divla_eval.tasks import get_task

    POLICIES.check_name(name)
    checkpoint = checkpoint if checkpoint is not None else shipped_checkpoint(name, task)
    if checkpoint is None and _needs_checkpoint(name):
        return None  # built untrained: nothing on disk to check
    task_obj = get_task(task)
    validate(
        RunConfig(
            task=task,
            split=_split(task, None),
            policy=name,
            difficulty=task_obj.difficulties[0],
            checkpoint=None if checkpoint is None else str(checkpoint),
            # bench shows each policy images of its own size: validation must not hold it to 84 px
            image_size=_trained_image_size(checkpoint),
            policy_options=dict(options or {}),
        )
    )
    return None if checkpoint is None else str(checkpoint)


def build_policy(
    name: str,
    task: str = "bin_picking",
    checkpoint: str | Path | None = None,
    image_size: int = 84,
    workdir: Path | None = None,
    options: dict | None = None,
    model_options: dict | None = None,
    device: str | None = None,
):
    """(policy, checkpoint label). The checkpoint given, else the one the repository ships, else the
    policy's untrained default config built by its training recipe from one fresh expert demo.
    `options`: its inference options (`INFERENCE_OPTIONS`), as `divla-eval run --policy-option`.
    `model_options`: a model config (sizes) to build untrained instead, e.g. to time DiVLA and OpenVLA
    at a larger equal backbone than the shipped checkpoint's; every value is a training `--option`.
    `device`: a resolved torch device for learned policies (`make_policy`'s)."""
    from divla_eval.envs.gym_env import ACTION_DIM
    from divla_eval.policy import make_policy
    from divla_eval.tasks import get_task

    checkpoint = check_policy(name, task, checkpoint, options)
    action_dim = ACTION_DIM * len(get_task(task).robots)
    if model_options:
        if not _needs_checkpoint(name):
            raise DivlaEvalError(f"policy {name!r} has no model to size; --model-option does not apply")
        sizes = " ".join(f"{k}={v}" for k, v in model_options.items())
        untrained = _untrained(name, task, image_size, workdir, options, model_options, device)
        return untrained, f"{UNTRAINED}, {sizes}"
    if checkpoint is not None:
        policy = make_policy(name, checkpoint, action_dim=action_dim, options=options, device=device)
        return policy, _shown_path(checkpoint)
    if not _needs_checkpoint(name):
        policy = make_policy(name, None, action_dim=action_dim, options=options)
        server = policy.metadata.info.get("server")  # a remote policy: what the server says it runs
        if server:
            return policy, f"served {server.get('policy')} ({server.get('checkpoint_hash') or 'no weights'})"
        return policy, "no weights"
    return _untrained(name, task, image_size, workdir, options, device=device), UNTRAINED


def _shown_path(path: str | Path) -> str:
    """Relative to the working directory when inside it: tables are read on other machines."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _untrained(
    name: str,
    task: str,
    image_size: int,
    workdir: Path | None,
    options: dict | None = None,
    model_options: dict | None = None,
    device: str | None = None,
):
    from divla_eval.data.dataset import DemoDataset
    from divla_eval.policy import POLICIES, parse_policy_options
    from divla_eval.train import RECIPES

    if name not in RECIPES:
        raise DivlaEvalError(
            f"policy {name!r} has no shipped checkpoint and no training recipe to build an untrained one: "
            f"give --checkpoint {name}=DIR"
        )
    recipe = RECIPES.get(name)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="divla-bench-"))
    demos = _one_demo(task, image_size, workdir)
    dataset = DemoDataset(demos, **recipe.dataset_kwargs(dict(model_options or {})))
    model = recipe.build(dataset, dict(model_options or {}))
    out = workdir / f"{name}-untrained"
    recipe.save(model, out, meta={"note": f"{UNTRAINED}, for timing only"})
    # the same loading path as a trained checkpoint
    placed = {} if device is None else {"device": device}  # every recipe's policy takes one
    return POLICIES.get(name).from_pretrained(out, **parse_policy_options(name, options or {}), **placed)


def _one_demo(task: str, image_size: int, workdir: Path) -> Path:
    """An untrained model still needs a dataset: its tokenizer, action and proprioception statistics
    and image size come from demonstrations. One expert demo is enough for that."""
    from divla_eval.data.collect import CollectConfig, collect

    path = workdir / f"{task}-{image_size}px.hdf5"
    if path.is_file():
        return path
    for episodes in (1, 3):  # the expert can fail an episode; try a couple more
        cfg = CollectConfig(task=task, split="seen", episodes=episodes, image_size=image_size)
        if collect(cfg, path, progress=False).demos > 0:
            return path
    raise DivlaEvalError(f"the scripted expert produced no demo for {task}; cannot build an untrained model")


# --- the table -----------------------------------------------------------------------------------------
COLUMNS = {
    "policy": "policy",
    "variant": "variant",
    "settings": "settings",
    "params": "params",
    "backbone_params": "backbone",
    "checkpoint": "weights",
    "threads": "threads",
    "calls": "calls",
    "p50_ms": "p50 ms",
    "p95_ms": "p95 ms",
    "p99_ms": "p99 ms",
    "mean_ms": "mean ms",
    "hz": "calls/s",
    "actions_per_call": "actions/call",
    "actions_per_s": "actions/s",
}


def table(rows: list[TimingRow]) -> pd.DataFrame:
    df = pd.DataFrame([dataclasses.asdict(r) for r in rows])
    for col in ("params", "backbone_params"):  # counts stay integers beside missing values
        df[col] = df[col].astype("Int64")
    return df


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    shown = df[list(COLUMNS)].rename(columns=COLUMNS).copy()
    for col in ("p50 ms", "p95 ms", "p99 ms", "mean ms", "calls/s", "actions/s"):
        shown[col] = shown[col].map(lambda v: f"{v:.1f}")
    shown["settings"] = shown["settings"].fillna("").replace("", "-")
    shown["actions/call"] = shown["actions/call"].map(lambda v: f"{v:g}")
    shown["params"] = shown["params"].map(_params)
    shown["backbone"] = shown["backbone"].map(_params)
    return shown


def _params(n) -> str:
    if n is None or pd.isna(n):
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else str(int(n))


def headline_ratio(df: pd.DataFrame, num: str = "divla", den: str = "openvla") -> str | None:
    """The paper's headline (DiVLA-2B 82 Hz vs OpenVLA 3-6 Hz) in our terms: actions per second of
    DiVLA's first variant (reasoning every call, the paper's mode) over OpenVLA's, from one run.
    The sizes compared are the backbones' (vision + language model) when both have one."""
    a, b = df[df.policy == num], df[df.policy == den]
    if a.empty or b.empty:
        return None
    a, b = a.iloc[0], b.iloc[0]
    ratio = a.actions_per_s / b.actions_per_s
    what = "backbone parameters"
    size_a, size_b = a.get("backbone_params"), b.get("backbone_params")
    if size_a is None or size_b is None or pd.isna(size_a) or pd.isna(size_b):
        what, size_a, size_b = "parameters", a.params, b.params
    line = (
        f"{num} ({a.variant}) / {den} actions per second: {a.actions_per_s:.1f} / {b.actions_per_s:.1f} = "
        f"{ratio:.1f}x ({what} {_params(size_a)} vs {_params(size_b)}; all parameters "
        f"{_params(a.params)} vs {_params(b.params)})"
    )
    if size_a and size_b and not 0.8 <= size_a / size_b <= 1.25:
        line += f"; the {what} differ by more than 25%, so this is not an equal-size comparison"
    return line


def cpu_name() -> str:
    """The processor's model name (Linux), else what `platform` knows: every timing table names it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}
    if hasattr(os, "getloadavg"):  # other work on the machine is the main source of noise
        info["load"] = os.getloadavg()[0]
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


NOTES = """\
- actions/call = min(execute_steps, chunk length): actions the runner executes before the next call.
  actions/s = executed actions / inference seconds (the simulator's time is not counted).
- Every policy sees the same observation (one bin-picking scene rendered once at its cameras and
  size), batch 1, `threads` torch threads; `warmup` untimed calls, then `reset` and `calls` timed
  calls, i.e. an episode's first calls.
- DiVLA variants (`reasoning_every`, see DiVLAPolicy): *reasoning every call* generates the phrase
  token by token at every call (the paper's mode; the default). *every 4th call* generates it at
  calls 1, 5, 9, ... and in between feeds the last phrase's tokens back in the one decoder pass that
  the action tokens need anyway. *no reasoning generation after the first call* generates once per
  episode and reuses that phrase; the timed calls include that one generation. A call with no
  phrase at all would be faster still, but the checkpoint was not trained without one, so it is not
  timed as DiVLA.
- Weights do not change a call's time except DiVLA's phrase length (it generates until </s>):
  untrained rows say so.
- backbone = vision encoder + projector + language model (with its output layer): the size the
  paper's DiVLA vs OpenVLA speed comparison holds equal; params counts every weight, action head
  included."""


def write_outputs(df: pd.DataFrame, out: Path, command: str, info: dict | None = None) -> tuple[Path, Path]:
    """speed.csv and speed.md; `info` is `machine_info()` taken before the timing (its load average
    says how busy the machine was), else now."""
    from divla_eval.report import markdown_table
    from divla_eval.safe_io import atomic_output, ensure_dir, write_text

    ensure_dir(out, "--out directory")
    csv, md = out / "speed.csv", out / "speed.md"
    with atomic_output(csv) as tmp:  # a full disk keeps the previous table, never half of one
        df.to_csv(tmp, index=False)
    info = info or machine_info()
    threads = ", ".join(str(t) for t in sorted(df.threads.unique()))
    load = f"; load average {info['load']:.1f} when it started" if "load" in info else ""
    lines = [
        "# Inference speed",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores{load}; torch {info['torch']}, {threads} thread(s); "
        f"device {info.get('device', 'cpu')}; "
        f"Python {info['python']}; {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        markdown_table(display_table(df)),
        "",
    ]
    ratio = headline_ratio(df)
    if ratio:
        lines += [ratio, ""]
    lines += ["Notes:", "", NOTES, ""]
    write_text(md, "\n".join(lines))
    return csv, md
