"""Reading a `divla-eval collect` demonstrations file: the one place that opens one and checks it.

Training trusts a file completely once it is read: a demo whose actions have another width trains a
model for another robot, one NaN in an action turns every weight into NaN within a step (and the run
still ends with exit 0), a mask naming a demo the file lacks ends in a KeyError deep inside the
dataset. So `DemoDataset` and `divla-eval train` read the file only through the functions here, which
check everything a training run uses: the metadata (`env_args`), the masks, and every demo's arrays,
by shape and type and, for the small per-step arrays read into memory anyway, every value (images
only by shape and dtype: they are uint8 and read per sample). Anything `divla-eval collect` could not
have written is one line naming the file, the demo, the field and what was expected.

h5py and numpy only: `train` checks its inputs before torch is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

import h5py
import numpy as np

from divla_eval.errors import CorruptFileError, DivlaEvalError, InvalidValueError
from divla_eval.schema import check_value, parse_json, short

COLLECT = "`divla-eval collect`"


class DemoFileError(CorruptFileError):
    """A demonstrations file that `divla-eval collect` did not write, or that was damaged since."""


class _EnvKwargs(TypedDict, total=False):
    task: str
    image_size: int
    cameras: list[str]


class _EnvArgsRequired(TypedDict):
    env_kwargs: _EnvKwargs


class EnvArgs(_EnvArgsRequired, total=False):
    """What training reads of a file's `data.attrs['env_args']` (collect writes more; it passes)."""

    format_version: int


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def open_demos(path) -> h5py.File:
    """The file, open for reading; a missing file, a directory or a file that is not HDF5 is one line."""
    path = Path(path)
    if not path.exists():
        raise DivlaEvalError(f"demonstrations file {path} does not exist (make one with {COLLECT})")
    if not path.is_file():
        raise DemoFileError(f"{path} is not a file (expected an HDF5 demonstrations file from {COLLECT})")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DemoFileError(f"{path} is not a readable HDF5 demonstrations file ({_one_line(exc)})") from None


def read_env_args(f: h5py.File, path) -> dict:
    """`data.attrs['env_args']`, checked: JSON text of an object, made in the format this version
    reads, naming a registered task, with the camera list and image size training relies on."""
    from divla_eval.data.collect import FORMAT_VERSION

    data = f.get("data")
    if not isinstance(data, h5py.Group) or "env_args" not in data.attrs:
        raise DemoFileError(f"{path} has no data/ group with env_args: not a {COLLECT} file")
    raw = data.attrs["env_args"]
    where = f"{path}: data.attrs['env_args']"
    if not isinstance(raw, (str, bytes)):
        raise DemoFileError(f"{where}: expected JSON text, got {type(raw).__name__}: not a {COLLECT} file")
    try:
        env_args = parse_json(raw)
        check_value(env_args, dict)
    except InvalidValueError as exc:
        raise DemoFileError(f"{where} is damaged: {exc}") from None
    version = env_args.get("format_version")
    if version != FORMAT_VERSION:
        raise DemoFileError(
            f"{path} was recorded in format {short(version)}; this version reads format {FORMAT_VERSION} "
            f"(the proprioception layout changed): collect it again with {COLLECT}"
        )
    try:
        check_value(env_args, EnvArgs)
    except InvalidValueError as exc:
        raise DemoFileError(f"{where}: {exc}: not a {COLLECT} file") from None
    task = env_args["env_kwargs"].get("task")
    if task is None:
        raise DemoFileError(f"{where}: field 'env_kwargs.task' is missing: not a {COLLECT} file")
    from divla_eval.errors import UnknownNameError
    from divla_eval.tasks import TASKS

    try:
        TASKS.check_name(task)
    except UnknownNameError as exc:
        raise DemoFileError(
            f"{path} holds demonstrations of a task this version does not have: {exc}"
        ) from None
    return env_args


def recorded_task(path) -> str:
    """The task a demonstrations file was collected on; refuses files `divla-eval collect` did not make."""
    with open_demos(path) as f:
        return read_env_args(f, path)["env_kwargs"]["task"]


def demo_names(f: h5py.File, path, which: str | None = None) -> list[str]:
    """The demos of a file in index order: all of them (`which` None) or a mask's (`train`, `valid`).

    A mask must list demos the file holds, each once: a mask naming a missing demo is a damaged or
    hand-edited file, and a name listed twice would silently weigh that demo double."""
    data = f["data"]
    names = []
    for name in data.keys():
        if not name.startswith("demo_"):
            continue
        if not name[5:].isdigit():
            raise DemoFileError(
                f"{path}: data/{name} is not a demo name (demo_<index>): not a {COLLECT} file"
            )
        names.append(name)
    names.sort(key=lambda n: int(n[5:]))
    if which is None:
        return names
    mask = f.get(f"mask/{which}")
    if mask is None:
        available = sorted(f["mask"].keys()) if isinstance(f.get("mask"), h5py.Group) else []
        raise DemoFileError(f"{path} has no mask/{which}; available: {available}")
    where = f"{path}: mask/{which}"
    if not isinstance(mask, h5py.Dataset) or mask.ndim != 1:
        raise DemoFileError(f"{where}: expected a list of demo names")
    try:
        raw = mask[:]
    except (OSError, ValueError, TypeError) as exc:
        raise DemoFileError(f"{where} cannot be read ({_one_line(exc)})") from None
    listed = []
    for item in raw:
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise DemoFileError(f"{where}: a demo name is not UTF-8 text") from None
        if not isinstance(item, str):
            raise DemoFileError(f"{where}: expected demo names, got {short(item)}")
        listed.append(item)
    known = set(names)
    missing = [n for n in listed if n not in known]
    if missing:
        raise DemoFileError(
            f"{where} names demo(s) {missing[:5]} that data/ does not hold ({len(names)} demos): the file "
            f"was damaged or edited; rerun the same {COLLECT} command to rebuild its masks"
        )
    twice = sorted({n for n in listed if listed.count(n) > 1})
    if twice:
        raise DemoFileError(f"{where} lists demo(s) {twice[:5]} more than once")
    return listed


def expected_widths(env_args: dict) -> tuple[int, int]:
    """(action, proprioception) columns of the task's robot: what every demo of the file must hold
    and what a model trained on it will be built for."""
    from divla_eval.envs.gym_env import ACTION_DIM, PROPRIO_DIM
    from divla_eval.tasks import get_task

    arms = len(get_task(env_args["env_kwargs"]["task"]).robots)
    return ACTION_DIM * arms, PROPRIO_DIM * arms


def read_demo(f: h5py.File, path, name: str, env_args: dict, cameras: tuple[str, ...]) -> dict[str, Any]:
    """One demo's per-step arrays, checked: {"actions": float32 [T, A], "proprio": float32 [T, P],
    "reasoning": [T] str, "instruction": str}. Images of `cameras` are checked by shape and dtype
    only (read per sample later). Values must be finite: a NaN or inf action or proprioception would
    train a NaN model."""
    where = f"{path}: {name}"
    g = f["data"].get(name)
    if not isinstance(g, h5py.Group):
        raise DemoFileError(f"{where} is not a demo group")
    if "num_samples" not in g.attrs:
        raise DemoFileError(
            f"{where} is incomplete (its collection was interrupted): rerun the same {COLLECT} command "
            "to redo it"
        )
    action_dim, proprio_dim = expected_widths(env_args)
    actions = _numbers(g, where, "actions", action_dim, "action")
    steps = len(actions)
    proprio = _numbers(g, where, "obs/proprio", proprio_dim, "proprioception", steps)
    try:
        recorded = int(g.attrs["num_samples"])
    except (TypeError, ValueError):
        raise DemoFileError(f"{where}: attrs['num_samples'] is not an integer") from None
    if recorded != steps:
        raise DemoFileError(f"{where}: num_samples says {recorded} steps but actions holds {steps}")
    reasoning = _dataset(g, where, "reasoning", f"{steps} phrases")
    if reasoning.shape != (steps,) or h5py.check_string_dtype(reasoning.dtype) is None:
        raise DemoFileError(
            f"{where}/reasoning: expected {steps} phrases (strings), got shape {reasoning.shape} of "
            f"{reasoning.dtype}"
        )
    try:
        phrases = [str(p) for p in reasoning.asstr()[:]]
    except (OSError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise DemoFileError(f"{where}/reasoning cannot be read ({_one_line(exc)})") from None
    instruction = g.attrs.get("instruction")
    if isinstance(instruction, bytes):
        instruction = instruction.decode("utf-8", errors="replace")
    if not isinstance(instruction, str) or not instruction.strip():
        raise DemoFileError(
            f"{where}: attrs['instruction'] should be the instruction text, got {short(instruction)}"
        )
    size = env_args["env_kwargs"].get("image_size")
    for cam in cameras:
        images = _dataset(g, where, f"obs/{cam}_image", f"the {cam} camera's images")
        shape = (steps, size, size, 3) if isinstance(size, int) else None
        ok = images.ndim == 4 and images.shape[0] == steps and images.shape[3] == 3
        if not ok or (shape is not None and images.shape != shape) or images.dtype != np.uint8:
            want = f"uint8 {shape}" if shape else f"uint8 [{steps}, H, W, 3]"
            raise DemoFileError(
                f"{where}/obs/{cam}_image: expected {want}, got {images.dtype} {images.shape}"
            )
    return {"actions": actions, "proprio": proprio, "reasoning": phrases, "instruction": instruction}


def _dataset(g: h5py.Group, where: str, key: str, what: str) -> h5py.Dataset:
    try:
        ds = g.get(key)
    except (OSError, KeyError, ValueError) as exc:
        raise DemoFileError(f"{where}/{key} cannot be read ({_one_line(exc)})") from None
    if not isinstance(ds, h5py.Dataset):
        raise DemoFileError(f"{where} has no {key} (expected {what}): not a complete {COLLECT} demo")
    return ds


def _numbers(
    g: h5py.Group, where: str, key: str, width: int, what: str, steps: int | None = None
) -> np.ndarray:
    """A [steps, width] array of finite numbers, as float32."""
    ds = _dataset(g, where, key, f"{what}s, [steps, {width}]")
    rows = "steps" if steps is None else steps
    if ds.ndim != 2 or ds.shape[1] != width or (steps is not None and ds.shape[0] != steps):
        raise DemoFileError(
            f"{where}/{key}: expected [{rows}, {width}] ({width} {what} numbers per step for this task's "
            f"robot), got {list(ds.shape)}"
        )
    if ds.dtype.kind not in "fiu":
        raise DemoFileError(f"{where}/{key}: expected numbers, got {ds.dtype}")
    if ds.shape[0] == 0:
        raise DemoFileError(f"{where}/{key}: the demo has no steps")
    try:
        values = ds[:].astype(np.float32)
    except (OSError, ValueError, TypeError) as exc:
        raise DemoFileError(f"{where}/{key} cannot be read ({_one_line(exc)})") from None
    bad = ~np.isfinite(values)
    if bad.any():
        step = int(np.argwhere(bad)[0][0])
        raise DemoFileError(
            f"{where}/{key} holds NaN or inf (first at step {step}): a demonstration must hold finite "
            f"numbers; collect it again with {COLLECT}"
        )
    return values


def episode_calls(policy, demo: h5py.Group, steps: int | None = None, images_from=None, with_reasoning=False):
    """Walk a recorded demo as an episode shows it to `policy`: reset it, hand the steps just before
    each call to a history policy's `observe`, and yield (t, Observation) at every call step (one every
    `execute_steps`), for the caller's `infer`. The offline checks (scripts/openloop.py,
    scripts/probe.py) replay demos through this one schedule, which tests hold to the episode loop's.

    `steps`: the first steps only (default all). `images_from`: another demo whose camera images (of
    the same step, or its last) replace this one's. `with_reasoning`: the recorded phrase rides along
    as the expert's (what `oracle_reasoning` reads)."""
    from divla_eval.policy import HistoryPolicy, Observation

    meta = policy.metadata
    k = max(1, meta.execute_steps)
    horizon = max(1, meta.obs_horizon) if isinstance(policy, HistoryPolicy) else 1
    instruction = str(demo.attrs["instruction"])
    reasoning = demo["reasoning"].asstr()[:] if with_reasoning and "reasoning" in demo else None
    seen = images_from if images_from is not None else demo
    last = len(seen["actions"]) - 1
    policy.reset(instruction, int(demo.attrs.get("seed", 0)))
    for t in range(len(demo["actions"]) if steps is None else steps):
        images = {c: seen[f"obs/{c}_image"][min(t, last)] for c in meta.cameras}
        expert = str(reasoning[t]) if reasoning is not None else None
        obs = Observation(images, demo["obs/proprio"][t], instruction, "panda", expert_reasoning=expert)
        if t % k == 0:
            yield t, obs
        elif k - t % k < horizon:
            policy.observe(obs)
