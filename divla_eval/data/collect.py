"""Record successful scripted-expert episodes as robomimic-compatible HDF5 demonstrations.

Episodes are planned exactly as `divla-eval run` plans them (`runner.plan_episodes`): demo `demo_<i>` is
episode i of (task, split, difficulty, perturbations) under the collection seed. Collect with a seed
that no evaluation uses (the default, 1000, differs from `run`'s default 0): with the same seed, demo i
*is* evaluation episode i, same objects and same initial state, and a policy trained on it would be
tested on its training data.

Demo names keep the episode index, so an episode whose expert fails leaves a gap (robomimic sorts demos
by the number and does not need them contiguous); failed episodes are counted and named in the file's
attributes, never written as demos.

File layout (robomimic's, plus what a VLA needs):

    data/                    attrs: total, env_args (JSON), object_library_hash, git_commit, packages,
                             num_demos, num_episodes, num_failed, failed_episodes, sessions
    data/demo_<i>/           attrs: num_samples, instruction, episode_key, episode_index, object_ids,
                             seed (the scene seed), perturbations (their sampled parameters, JSON)
        actions   [T, 7 x arms] float32 OSC_POSE delta + gripper, the action taken at step t
        states    [T, S]       float64  MuJoCo state (time, qpos, qvel) before the action
        rewards   [T]          float64  1.0 on the step that succeeded
        dones     [T]          int64    1 at the last step
        reasoning [T]          utf-8    the expert's reasoning phrase at step t
        obs/front_image [T, H, W, 3] uint8   upright images drawn before the action
        obs/wrist_image [T, H, W, 3] uint8
        obs/proprio     [T, 11 x arms] float32 eef position, rotation (2 matrix columns), finger joints
    mask/train, mask/valid   demo names (bytes), a deterministic ~90/10 split

There is no `next_obs`: it would double the file for nothing a chunked policy uses; robomimic readers
set `hdf5_load_next_obs=False`.

Collection resumes: each demo is written and flushed as soon as its episode ends, and a rerun with the
same arguments skips every episode already decided (demo or failure; the expert is deterministic, so a
failure would fail again). A larger --episodes extends the file. A file made with other arguments is
refused, since mixing them would silently change what the demonstrations show. Ctrl-C closes the file
cleanly; a hard kill in the middle of an HDF5 write can leave it unreadable (HDF5 has no journal).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from divla_eval.errors import DivlaEvalError, raise_if_interrupted
from divla_eval.parallel import run_unordered

CAMERAS = ("front", "wrist")
DEFAULT_SEED = 1000
VALID_FRACTION = 0.1
FORMAT_VERSION = 2
"""2: proprioception holds the rotation as two matrix columns (1 held a sign-ambiguous quaternion)."""


def action_space(num_arms: int = 1) -> dict:
    """The action layout written into env_args: the env's per-arm action, robot 0 (the right arm) first.

    Bimanual files used to say `dim: 7` like single-arm ones while holding 14 columns; readers that
    size a model from this metadata would have built the wrong head.
    """
    from divla_eval.envs.gym_env import ARM_ACTION_NAMES

    dims = (
        list(ARM_ACTION_NAMES)
        if num_arms == 1
        else [f"{arm}_{d}" for arm in ("right", "left")[:num_arms] for d in ARM_ACTION_NAMES]
    )
    return {
        "type": "OSC_POSE delta + gripper" + ("" if num_arms == 1 else " per arm, right arm first"),
        "dim": len(dims),
        "low": -1.0,
        "high": 1.0,
        "dims": dims,
        "scale": "0.05 m and 0.5 rad per unit; gripper -1 open, +1 close",
    }


@dataclass(frozen=True)
class CollectConfig:
    task: str = "bin_picking"
    split: str = "seen"
    episodes: int = 20
    seed: int = DEFAULT_SEED
    difficulty: str | None = None
    """None: the task's first difficulty, as `divla-eval run` resolves it."""
    perturbations: tuple[tuple[str, int], ...] = ()
    image_size: int = 84
    max_steps: int | None = None
    task_options: dict = field(default_factory=dict)

    def run_config(self):
        """The equivalent evaluation config, so planning and validation are the runner's own."""
        from divla_eval.runner import RunConfig

        return RunConfig(
            task=self.task,
            split=self.split,
            policy="scripted",
            episodes=self.episodes,
            seed=self.seed,
            difficulty=self.difficulty,
            perturbations=tuple(self.perturbations),
            image_size=self.image_size,
            max_steps=self.max_steps,
            task_options=dict(self.task_options),
        )


@dataclass
class CollectSummary:
    path: Path
    planned: int
    skipped: int
    """Episodes already decided in the file before this call."""
    ran: int
    demos: int
    """Demos in the file (all sessions)."""
    episodes: int
    """Episodes decided in the file (demos + failures)."""
    failed: dict[str, str]
    """Episode key -> why its expert failed (all sessions)."""
    samples: int
    new_demos: int = 0
    """Demos written by this call."""
    seconds: float = 0.0
    """Wall time of this call: with `new_demos` it gives the collection rate (demos per hour)."""


@dataclass
class _Outcome:
    spec: object
    data: dict | None
    """Per-step arrays and attributes of a successful episode; None when it failed."""
    reason: str | None = None


def _resolve(cfg: CollectConfig) -> CollectConfig:
    from divla_eval.tasks import get_task, parse_task_options

    task = get_task(cfg.task, **cfg.task_options)
    return dataclasses.replace(
        cfg,
        difficulty=cfg.difficulty if cfg.difficulty is not None else task.difficulties[0],
        perturbations=tuple((str(n), int(lvl)) for n, lvl in cfg.perturbations),
        task_options=parse_task_options(cfg.task, cfg.task_options),
    )


def env_args(cfg: CollectConfig) -> dict:
    """robomimic's env metadata: `env_kwargs` rebuild the env with `DivlaEnv(**env_kwargs)`.

    Everything here decides what the demonstrations contain, so a resumed collection must match it
    exactly; the code revision and package versions are kept beside it, not in it, because they may
    legitimately move between sessions.
    """
    from divla_eval.envs import ENV_IDS
    from divla_eval.envs.layout import CONTROL_FREQ, FRONT_CAMERA, WRIST_CAMERA
    from divla_eval.envs.objects import library_hash
    from divla_eval.tasks import get_task, task_options

    task = get_task(cfg.task, **cfg.task_options)
    env_name = next((k for k, v in ENV_IDS.items() if v == cfg.task), cfg.task)
    return {
        "env_name": env_name,
        "type": 2,  # robomimic's EnvType.GYM_TYPE
        "env_kwargs": {
            "task": cfg.task,
            "split": cfg.split,
            "difficulty": cfg.difficulty,
            "perturbations": [list(p) for p in cfg.perturbations],
            "cameras": list(CAMERAS),
            "image_size": cfg.image_size,
            "max_steps": cfg.max_steps,
            "task_options": dict(cfg.task_options),
            "run_seed": cfg.seed,
        },
        "task": cfg.task,
        "task_version": task.version,
        "task_settings": {k: getattr(task, k) for k in task_options(cfg.task)},
        "split": cfg.split,
        "difficulty": cfg.difficulty,
        "perturbations": [list(p) for p in cfg.perturbations],
        "options": dict(cfg.task_options),
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "control_freq": CONTROL_FREQ,
        "action_space": action_space(len(task.robots)),
        "camera_names": list(CAMERAS),
        "mujoco_camera_names": {"front": FRONT_CAMERA, "wrist": WRIST_CAMERA},
        "object_library_hash": library_hash(),
        "policy": "scripted",
        "format_version": FORMAT_VERSION,
    }


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def record_episode(env, spec) -> _Outcome:
    """Run the expert on one episode, keeping each step's observation, state, action and reasoning.

    Cameras are drawn before the action, so every stored image is the one the action was chosen from.
    """
    env.reset(options={"episode": spec})
    episode = env.episode
    steps: dict[str, list] = {k: [] for k in ("states", "front", "wrist", "proprio", "actions", "reasoning")}
    rewards: list[float] = []
    terminated = truncated = False
    info = {"success": False}
    while not (terminated or truncated):
        steps["states"].append(env.get_state())
        steps["front"].append(env.camera_image("front"))
        steps["wrist"].append(env.camera_image("wrist"))
        steps["proprio"].append(env.sim.proprio())
        expert = episode.expert(env.sim)
        action = np.asarray(expert.action, dtype=np.float32)
        steps["actions"].append(action)
        steps["reasoning"].append(expert.reasoning)
        terminated, truncated, info = env.advance(action)
        rewards.append(1.0 if terminated else 0.0)
    if not info["success"]:
        return _Outcome(spec, None, episode.failure_mode(env.sim))
    dones = np.zeros(len(rewards), dtype=np.int64)
    dones[-1] = 1
    return _Outcome(
        spec,
        {
            "actions": np.stack(steps["actions"]).astype(np.float32),
            "states": np.stack(steps["states"]).astype(np.float64),
            "rewards": np.asarray(rewards, dtype=np.float64),
            "dones": dones,
            "reasoning": list(steps["reasoning"]),
            "obs/front_image": np.stack(steps["front"]).astype(np.uint8),
            "obs/wrist_image": np.stack(steps["wrist"]).astype(np.uint8),
            "obs/proprio": np.stack(steps["proprio"]).astype(np.float32),
            "attrs": {
                "instruction": episode.instruction,
                "episode_key": spec.key,
                "episode_index": spec.episode_index,
                "object_ids": json.dumps(list(episode.object_ids)),
                "seed": spec.seed("scene"),
                "perturbations": json.dumps(getattr(env, "perturbation_params", []), default=str),
            },
        },
    )


class _Collector:
    """One env per process (DESIGN.md: one MuJoCo renderer per process)."""

    def __init__(self, cfg: CollectConfig):
        self.cfg = cfg
        self.env = self._make_env()

    def _make_env(self):
        from divla_eval.envs.gym_env import DivlaEnv

        cfg = self.cfg
        return DivlaEnv(
            task=cfg.task,
            split=cfg.split,
            difficulty=cfg.difficulty,
            perturbations=cfg.perturbations,
            cameras=CAMERAS,
            image_size=cfg.image_size,
            max_steps=cfg.max_steps,
            task_options=cfg.task_options,
            run_seed=cfg.seed,
        )

    def run(self, spec) -> _Outcome:
        """A simulator fault or expert crash fails this episode, not the collection (as in the runner)."""
        try:
            return record_episode(self.env, spec)
        except Exception as exc:
            raise_if_interrupted(exc)
            reason = "error: " + traceback.format_exc().strip().splitlines()[-1]
            self.env.close()
            self.env = self._make_env()  # the old simulator may be in a broken state
            return _Outcome(spec, None, reason)

    def close(self) -> None:
        self.env.close()


# --- the file ------------------------------------------------------------------------------------------
def demo_name(episode_index: int) -> str:
    return f"demo_{episode_index}"


def split_demos(names: list[str]) -> tuple[list[str], list[str]]:
    """(train, valid): the ~10% of demos with the smallest name hashes are held out.

    Hashing names rather than taking every tenth keeps a demo on the same side as a file grows (only a
    few demos cross over when `round` moves), and ignores the order in which workers finished.
    """
    if len(names) < 2:
        return sorted(names, key=_demo_number), []
    n_valid = max(1, round(len(names) * VALID_FRACTION))
    ranked = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    valid = set(ranked[:n_valid])
    train = [n for n in names if n not in valid]
    return sorted(train, key=_demo_number), sorted(valid, key=_demo_number)


def _demo_number(name: str) -> int:
    return int(name.split("_", 1)[1])


def _open(path: Path, args: dict):
    """Open (or create) the file for appending, refusing one made with other arguments."""
    import h5py

    if path.is_dir():
        raise DivlaEvalError(f"--out {path} is a directory; give an .hdf5 file path")
    exists = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DivlaEvalError(
            f"cannot create {path}: {path.parent} is not a usable directory ({exc.strerror or exc})"
        ) from None
    try:
        f = h5py.File(path, "a")
    except OSError as exc:
        what = "open" if exists else "create"
        text = str(exc)
        detail = re.search(r"error message = '([^']*)'", text)
        if "unable to lock file" in text:
            reason = "it is open in another process (is another collect writing it?)"
        elif detail:
            reason = detail.group(1)
        elif exists and exc.errno in (None, 0):
            # HDF5 without SWMR cannot survive a kill in the middle of a write (Ctrl-C is handled)
            reason = f"not a readable HDF5 file ({text}); if a collection was killed, use a new --out"
        else:
            reason = exc.strerror or text
        raise DivlaEvalError(f"cannot {what} {path}: {reason}") from None
    try:
        data = f.get("data")
        if data is None:
            if len(f.keys()):
                raise DivlaEvalError(f"{path} is an HDF5 file but not a demonstration file (no data/ group)")
            data = f.create_group("data")
            data.attrs["env_args"] = json.dumps(args, sort_keys=True)
            _stamp_environment(data)
            return f
        if "env_args" not in data.attrs:
            raise DivlaEvalError(f"{path} has no data.attrs['env_args']; not made by divla-eval collect")
        old = json.loads(data.attrs["env_args"])
        new = json.loads(json.dumps(args, sort_keys=True))
        diffs = _diff(old, new)
        if diffs:
            raise DivlaEvalError(
                f"{path} was collected with different arguments ({'; '.join(diffs)}); use another --out file"
            )
        return f
    except BaseException:
        f.close()
        raise


def _stamp_environment(data) -> None:
    from divla_eval.records import environment_info

    env = environment_info(Path(__file__).resolve().parent)
    data.attrs["git_commit"] = env["git_commit"] or ""
    data.attrs["git_dirty"] = bool(env["dirty"])
    data.attrs["packages"] = json.dumps(env["packages"], sort_keys=True)
    data.attrs["environment"] = json.dumps(env, sort_keys=True)
    data.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _complete_demos(data) -> list[str]:
    """Demos whose writing finished (`num_samples` is the last thing written); others are dropped."""
    done = []
    for name in list(data.keys()):
        if not name.startswith("demo_"):
            continue
        if "num_samples" in data[name].attrs:
            done.append(name)
        else:
            del data[name]  # torn by an interrupted write: redo the episode
    return sorted(done, key=_demo_number)


def _write_demo(data, out: _Outcome) -> int:
    import h5py

    name = demo_name(out.spec.episode_index)
    if name in data:
        del data[name]
    d = out.data
    g = data.create_group(name)
    t = len(d["actions"])
    for key in ("actions", "states", "rewards", "dones", "obs/proprio"):
        g.create_dataset(key, data=d[key])
    for key in ("obs/front_image", "obs/wrist_image"):
        arr = d[key]
        # one frame per chunk: a training sample reads a frame without decompressing its neighbours
        g.create_dataset(key, data=arr, chunks=(1, *arr.shape[1:]), compression="gzip", compression_opts=4)
    g.create_dataset("reasoning", data=np.array(d["reasoning"], dtype=object), dtype=h5py.string_dtype())
    for key, value in d["attrs"].items():
        g.attrs[key] = value
    g.attrs["num_samples"] = t  # last: marks the demo complete
    return t


def _update_index(f, failed: dict[str, str]) -> tuple[list[str], int]:
    """Recompute totals, counts and the train/valid masks from what the file holds."""
    data = f["data"]
    names = _complete_demos(data)
    total = int(sum(int(data[n].attrs["num_samples"]) for n in names))
    data.attrs["total"] = total
    data.attrs["num_demos"] = len(names)
    data.attrs["num_failed"] = len(failed)
    data.attrs["num_episodes"] = len(names) + len(failed)
    data.attrs["failed_episodes"] = json.dumps(failed, sort_keys=True)
    mask = f.require_group("mask")
    for key, subset in zip(("train", "valid"), split_demos(names)):
        if key in mask:
            del mask[key]
        mask.create_dataset(key, data=np.array([n.encode() for n in subset], dtype="S"))
    return names, total


def collect(cfg: CollectConfig, out: Path, progress: bool = True, workers: int = 1) -> CollectSummary:
    """Record (or resume recording) every planned episode of `cfg` into `out`."""
    from tqdm import tqdm

    from divla_eval.runner import plan_episodes, validate

    out = Path(out)
    if workers < 1:
        raise DivlaEvalError(f"--workers must be a positive integer, got {workers}")
    cfg = _resolve(cfg)
    run_cfg = cfg.run_config()
    validate(run_cfg)
    plan = plan_episodes(run_cfg)
    args = env_args(cfg)
    with _open(out, args) as f:
        data = f["data"]
        failed: dict[str, str] = json.loads(data.attrs.get("failed_episodes", "{}"))
        names, _ = _update_index(f, failed)
        done_keys = {data[n].attrs["episode_key"] for n in names} | set(failed)
        todo = [s for s in plan if s.key not in done_keys]
        session = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "planned": len(plan), "ran": 0}
        sessions = json.loads(data.attrs.get("sessions", "[]"))
        decided_in_plan = len(plan) - len(todo)
        bar = tqdm(
            total=len(plan),
            initial=decided_in_plan,
            disable=not progress,
            unit="ep",
            desc=f"collect {cfg.task}",
        )
        n_demos, ran = len(names), 0
        start = time.perf_counter()
        try:
            for _spec, outcome in run_unordered(_Collector, (cfg,), todo, workers, "demos"):
                if outcome.data is None:
                    failed[outcome.spec.key] = outcome.reason or "unknown"
                else:
                    _write_demo(data, outcome)
                    n_demos += 1
                ran += 1
                _update_index(f, failed)
                f.flush()  # each finished demo survives an interrupted collection
                bar.update(1)
                bar.set_postfix(demos=n_demos, failed=len(failed))
        finally:
            bar.close()
            from divla_eval.records import environment_info

            env = environment_info(Path(__file__).resolve().parent)
            seconds = time.perf_counter() - start
            session.update(
                ran=ran,
                new_demos=n_demos - len(names),
                seconds=round(seconds, 1),
                workers=workers,
                git_commit=env["git_commit"],
                packages=env["packages"],
            )
            data.attrs["sessions"] = json.dumps([*sessions, session], sort_keys=True)
        names, total = _update_index(f, failed)
    return CollectSummary(
        path=out,
        planned=len(plan),
        skipped=decided_in_plan,
        ran=ran,
        demos=len(names),
        episodes=len(names) + len(failed),
        failed=failed,
        samples=total,
        new_demos=session["new_demos"],
        seconds=seconds,
    )
