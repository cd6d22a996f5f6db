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

Collection resumes: each demo is saved in its own file (OUT.partial/demo_<i>.hdf5) as soon as its
episode ends, and a rerun with the same arguments skips every episode already decided (demo or failure;
the expert is deterministic, so a failure would fail again). A larger --episodes extends the file. A file
made with other arguments is refused, since mixing them would silently change what the demonstrations
show. OUT itself is never written in place (HDF5 has no journal: a kill or a full disk in the middle of
a write left files that could not be opened again): when a session ends, however it ends, the new OUT
is built beside the old one and renamed over it, and a session killed outright leaves its demos in
OUT.partial/ for the next run to merge. See `_Journal` and `_merge`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from divla_eval.backends import get_backend
from divla_eval.errors import DivlaEvalError, raise_if_interrupted

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
    crashed: bool = False
    """The process running it died (a lost Ray node, the OOM killer): not the expert's failure, so it is
    not journalled and the next session collects the episode again."""


def _resolve(cfg: CollectConfig) -> CollectConfig:
    return _resolve_with_task(cfg)[0]


def _resolve_with_task(cfg: CollectConfig):
    """(the config with its defaults filled in, its Task instance): the one build of the task, which
    planning, the file's metadata and every collecting process are handed."""
    from divla_eval.tasks import get_task, parse_task_options

    task = get_task(cfg.task, **cfg.task_options)
    resolved = dataclasses.replace(
        cfg,
        difficulty=cfg.difficulty if cfg.difficulty is not None else task.difficulties[0],
        perturbations=tuple((str(n), int(lvl)) for n, lvl in cfg.perturbations),
        task_options=parse_task_options(cfg.task, cfg.task_options),
    )
    return resolved, task


def env_args(cfg: CollectConfig, task=None) -> dict:
    """robomimic's env metadata: `env_kwargs` rebuild the env with `divla_eval.tasks.make_env(**env_kwargs)`
    (`task`: the config's Task instance when already built).

    Everything here decides what the demonstrations contain, so a resumed collection must match it
    exactly; the code revision and package versions are kept beside it, not in it, because they may
    legitimately move between sessions.
    """
    from divla_eval.envs.layout import CONTROL_FREQ, FRONT_CAMERA, WRIST_CAMERA
    from divla_eval.envs.objects import library_hash
    from divla_eval.tasks import ENV_IDS, get_task, task_options

    task = task or get_task(cfg.task, **cfg.task_options)
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
    step = None
    while step is None or not step.done:
        steps["states"].append(env.get_state())
        steps["front"].append(env.camera_image("front"))
        steps["wrist"].append(env.camera_image("wrist"))
        steps["proprio"].append(env.sim.proprio())
        expert = episode.expert(env.sim)
        action = np.asarray(expert.action, dtype=np.float32)
        steps["actions"].append(action)
        steps["reasoning"].append(expert.reasoning)
        step = env.advance(action)
        rewards.append(1.0 if step.terminated else 0.0)
    if not step.success:
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

    def __init__(self, cfg: CollectConfig, task=None):
        from divla_eval.tasks import get_task

        self.cfg = cfg
        self.task = task if task is not None else get_task(cfg.task, **cfg.task_options)
        self.env = self._make_env()

    def _make_env(self):
        from divla_eval.envs.gym_env import DivlaEnv

        cfg = self.cfg
        return DivlaEnv(
            self.task,
            split=cfg.split,
            difficulty=cfg.difficulty,
            perturbations=cfg.perturbations,
            cameras=CAMERAS,
            image_size=cfg.image_size,
            max_steps=cfg.max_steps,
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


def _h5_error(path: Path, exc: OSError, what: str) -> DivlaEvalError:
    """One line for an HDF5 file that cannot be opened or created, in the words a user can act on."""
    text = str(exc)
    detail = re.search(r"error message = '([^']*)'", text)
    if "unable to lock file" in text:
        reason = "it is open in another process (is another collect writing it?)"
    elif detail:
        reason = detail.group(1)
    elif what == "open" and exc.errno in (None, 0):
        reason = (
            f"not a readable HDF5 file ({text}); one left by an older divla-eval that was killed "
            "cannot be resumed: use a new --out"
        )
    else:
        reason = exc.strerror or text
    return DivlaEvalError(f"cannot {what} {path}: {reason}")


def _check_existing(path: Path, args: dict) -> None:
    """Refuse an --out that is a directory, not a demonstration file, or made with other arguments.
    Read-only: nothing is written before the arguments are known to be good."""
    import h5py

    if path.is_dir():
        raise DivlaEvalError(f"--out {path} is a directory; give an .hdf5 file path")
    if not path.exists():
        return
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise _h5_error(path, exc, "open") from None
    with f:
        data = f.get("data")
        if data is None:
            if len(f.keys()):
                raise DivlaEvalError(f"{path} is an HDF5 file but not a demonstration file (no data/ group)")
            return
        if "env_args" not in data.attrs:
            raise DivlaEvalError(f"{path} has no data.attrs['env_args']; not made by divla-eval collect")
        old = json.loads(data.attrs["env_args"])
        new = json.loads(json.dumps(args, sort_keys=True))
        diffs = _diff(old, new)
        if diffs:
            raise DivlaEvalError(
                f"{path} was collected with different arguments ({'; '.join(diffs)}); use another --out file"
            )


def _stamp_environment(data) -> None:
    from divla_eval.records import environment_info

    env = environment_info(Path(__file__).resolve().parent)
    data.attrs["git_commit"] = env["git_commit"] or ""
    data.attrs["git_dirty"] = bool(env["dirty"])
    data.attrs["packages"] = json.dumps(env["packages"], sort_keys=True)
    data.attrs["environment"] = json.dumps(env, sort_keys=True)
    data.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _complete_demos(data, drop: bool = True) -> list[str]:
    """Demos whose writing finished (`num_samples` is the last thing written); torn ones (left in files
    written in place by older versions) are dropped when `drop`, else only left out."""
    done = []
    for name in list(data.keys()):
        if not name.startswith("demo_"):
            continue
        if "num_samples" in data[name].attrs:
            done.append(name)
        elif drop:
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


# --- crash safety: a journal of finished demos, merged into --out atomically -------------------------
PARTS_SUFFIX = ".partial"
"""`OUT.partial/` holds the demos and failures of a collection not yet merged into OUT."""


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + PARTS_SUFFIX)


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the new name survives a power cut, not only a kill)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Journal:
    """The demos and failures of this and earlier, unmerged sessions, one file per demo in OUT.partial/.

    HDF5 has no journal: a process killed (or a disk filling) in the middle of writing into a file
    leaves it unreadable, and every demo in it was lost (h5py even segfaulted opening one). So the
    output file is never written in place. Each finished demo goes to its own small file, written under
    a temporary name, fsynced and renamed; a failure is a fsynced line in failed.jsonl. At the end of a
    session (normal, Ctrl-C or error) `_merge` builds the new OUT beside the old one and renames it
    over it. A session killed outright leaves its demos here, and the next run with the same arguments
    counts them as done and merges them. A lock file keeps two collections from sharing a journal."""

    def __init__(self, out: Path, args: dict):
        self.out, self.dir = out, parts_dir(out)
        self.args = json.loads(json.dumps(args, sort_keys=True))
        self._lock = None

    def open(self) -> None:
        import fcntl

        from divla_eval.safe_io import ensure_dir, reason

        ensure_dir(self.dir, "the journal directory")
        try:
            self._lock = open(self.dir / ".lock", "w")
        except OSError as exc:
            raise DivlaEvalError(f"cannot create {self.dir / '.lock'}: {reason(exc)}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise DivlaEvalError(
                f"another divla-eval collect is writing {self.out} (it holds {self.dir / '.lock'}): wait "
                "for it to finish or pass another --out"
            ) from None
        args_file = self.dir / "env_args.json"
        if args_file.is_file():
            try:
                old = json.loads(args_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = None  # torn by a kill before its rename could not happen; rewritten below
            if old is not None and old != self.args:
                diffs = _diff(old, self.args)
                raise DivlaEvalError(
                    f"{self.dir} holds unmerged demos collected with other arguments ({'; '.join(diffs)}): "
                    f"rerun those arguments to merge them into {self.out}, or pass another --out"
                )
            if old is not None:
                return
        from divla_eval.safe_io import write_text

        write_text(args_file, json.dumps(self.args, sort_keys=True))

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def demo_files(self) -> dict[str, Path]:
        """Demo name -> its file: only complete ones exist under that name (they arrive by rename)."""
        files = {p.stem: p for p in self.dir.glob("demo_*.hdf5")}
        return dict(sorted(files.items(), key=lambda kv: _demo_number(kv[0])))

    def failures(self) -> dict[str, str]:
        path = self.dir / "failed.jsonl"
        if not path.is_file():
            return {}
        failed = {}
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                failed[str(row["key"])] = str(row["reason"])
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a kill: that episode is simply run again
        return failed

    def demo_keys(self) -> dict[str, int]:
        """Episode key -> samples of each journalled demo (its attrs, a few KB read per file)."""
        import h5py

        keys = {}
        for name, path in self.demo_files().items():
            try:
                with h5py.File(path, "r") as f:
                    g = f["data"][name]
                    keys[str(g.attrs["episode_key"])] = int(g.attrs["num_samples"])
            except (OSError, KeyError):
                path.unlink(missing_ok=True)  # unreadable (not ours, or a disk error): run it again
        return keys

    def add_demo(self, outcome: _Outcome) -> None:
        """Write one demo to its own file; on a full disk, one line (earlier demos are all kept)."""
        import h5py

        from divla_eval.safe_io import OutputError, reason

        name = demo_name(outcome.spec.episode_index)
        final = self.dir / f"{name}.hdf5"
        tmp = self.dir / f".{name}.hdf5.tmp"
        try:
            with h5py.File(tmp, "w") as f:
                _write_demo(f.create_group("data"), outcome)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.dir)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            saved = len(self.demo_files())
            raise OutputError(
                f"cannot write {name} of {self.out}: {reason(exc)}; the {saved} demo(s) finished before it "
                f"are kept (in {self.out}, or in {self.dir} until merged), rerun the same command to resume"
            ) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def add_failure(self, key: str, why: str) -> None:
        from divla_eval.safe_io import OutputError, reason

        try:
            with open(self.dir / "failed.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "reason": why}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise OutputError(f"cannot record failed episode {key} in {self.dir}: {reason(exc)}") from None

    def clear(self) -> None:
        """Remove the journal once its content is in the output file."""
        for path in [*self.dir.glob("demo_*.hdf5"), *self.dir.glob(".demo_*.tmp")]:
            path.unlink(missing_ok=True)
        for name in ("failed.jsonl", "env_args.json", ".lock"):
            (self.dir / name).unlink(missing_ok=True)
        self.close()
        try:
            self.dir.rmdir()
        except OSError:
            pass  # something else was put there: leave it


def _merge(out: Path, args: dict, journal: _Journal, session: dict) -> tuple[list[str], int, dict]:
    """Build the new output file from the old one plus the journal, beside it, and rename it over it.

    The old file is copied (an in-kernel copy; the cost of never writing it in place: ~1 s for 300 MB),
    the journalled demos are copied in group by group (raw chunks, nothing recompressed), the index and
    the session are updated, and only a complete, fsynced file replaces the old one. A full disk is
    found before the copy starts and leaves everything as it was, with one line."""
    import shutil
    import tempfile

    import h5py

    from divla_eval.safe_io import OutputError, reason

    parts = journal.demo_files()
    failures = journal.failures()
    need = (out.stat().st_size if out.exists() else 0) + sum(p.stat().st_size for p in parts.values())
    free = shutil.disk_usage(out.parent).free
    kept = (
        f"the {len(parts)} unmerged demo(s) are kept in {journal.dir}; rerun the same command to merge them"
    )
    if free < need + (1 << 20):
        raise OutputError(
            f"cannot update {out}: it needs {need / 2**20:.1f} MiB free to be rewritten safely and "
            f"{free / 2**20:.1f} MiB are (free some space); {kept}"
        )
    try:
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot update {out}: {reason(exc)}; {kept}") from None
    tmp = Path(tmp_name)
    try:
        if out.exists():
            shutil.copyfile(out, tmp)
        with h5py.File(tmp, "a" if out.exists() else "w") as f:
            data = f.get("data")
            if data is None:
                data = f.create_group("data")
                data.attrs["env_args"] = json.dumps(args, sort_keys=True)
                _stamp_environment(data)
            failed: dict[str, str] = json.loads(data.attrs.get("failed_episodes", "{}"))
            failed.update(failures)
            for name, path in parts.items():
                if name in data:
                    del data[name]
                with h5py.File(path, "r") as part:
                    part.copy(part["data"][name], data, name=name)
            sessions = json.loads(data.attrs.get("sessions", "[]"))
            data.attrs["sessions"] = json.dumps([*sessions, session], sort_keys=True)
            names, total = _update_index(f, failed)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; demonstrations are meant to be shared
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot update {out}: {reason(exc)}; {kept}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    journal.clear()
    return names, total, failed


def _read_done(out: Path) -> tuple[dict[str, int], dict[str, str]]:
    """(episode key -> samples of each complete demo, failures) already in the output file."""
    import h5py

    if not out.exists():
        return {}, {}
    with h5py.File(out, "r") as f:
        data = f.get("data")
        if data is None:
            return {}, {}
        demos = {
            str(data[n].attrs["episode_key"]): int(data[n].attrs["num_samples"])
            for n in _complete_demos(data, drop=False)
        }
        return demos, json.loads(data.attrs.get("failed_episodes", "{}"))


def collect(
    cfg: CollectConfig,
    out: Path,
    progress: bool = True,
    workers: int = 1,
    backend="local",
    ray_address: str | None = None,
) -> CollectSummary:
    """Record (or resume recording) every planned episode of `cfg` into `out`.

    Nothing is lost or duplicated whatever stops it: finished demos are journalled one file each (see
    `_Journal`) and merged into `out` atomically when the session ends; a killed session's demos are
    merged by the next run with the same arguments."""
    from tqdm import tqdm

    from divla_eval.runner import Run, validate
    from divla_eval.safe_io import check_writable_dir

    out = Path(out)
    backend = get_backend(backend, address=ray_address)  # an unknown name, or Ray missing: one line
    cfg, task = _resolve_with_task(cfg)
    plan = validate(Run.resolve(cfg.run_config(), task)).plan()
    # the worker count, and an unreachable cluster: one line, before anything is written
    backend.connect(workers)
    args = env_args(cfg, task)
    _check_existing(out, args)
    try:
        check_writable_dir(out.parent, "directory")
    except DivlaEvalError as exc:
        raise DivlaEvalError(f"cannot create {out}: {exc}") from None
    journal = _Journal(out, args)
    journal.open()
    try:
        demos, failed = _read_done(out)
        before = len(demos)
        demos.update(journal.demo_keys())
        failed.update(journal.failures())
        todo = [s for s in plan if s.key not in demos and s.key not in failed]
        decided_in_plan = len(plan) - len(todo)
        bar = tqdm(
            total=len(plan),
            initial=decided_in_plan,
            disable=not progress,
            unit="ep",
            desc=f"collect {cfg.task}",
        )
        session = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "planned": len(plan), "ran": 0}
        n_demos, ran = len(demos), 0
        start, seconds = time.perf_counter(), [0.0]

        def close_session() -> dict:
            from divla_eval.records import environment_info

            env = environment_info(Path(__file__).resolve().parent)
            seconds[0] = time.perf_counter() - start
            session.update(
                ran=ran,
                new_demos=n_demos - before,
                seconds=round(seconds[0], 1),
                workers=workers,
                git_commit=env["git_commit"],
                packages=env["packages"],
            )
            return session

        try:
            # "local" processes or "ray" actors (`divla_eval.backends`): the demos are the same either way
            outcomes = backend.run_unordered(
                _Collector,
                (cfg, task),
                todo,
                workers,
                "demos",
                on_crash=lambda spec, why: _Outcome(spec, None, f"error: {why}", crashed=True),
            )
            for _spec, outcome in outcomes:
                if outcome.crashed:
                    print(f"{outcome.spec.key}: {outcome.reason}; left for the next run", file=sys.stderr)
                elif outcome.data is None:
                    journal.add_failure(outcome.spec.key, outcome.reason or "unknown")
                    failed[outcome.spec.key] = outcome.reason or "unknown"
                else:
                    journal.add_demo(outcome)
                    n_demos += 1
                ran += 1
                bar.update(1)
                bar.set_postfix(demos=n_demos, failed=len(failed))
        except BaseException:
            bar.close()
            # Merge what finished (Ctrl-C included); if that fails too, the first error is the one to
            # report, and the journal keeps the demos for the next run.
            with contextlib.suppress(DivlaEvalError, OSError):
                _merge(out, args, journal, close_session())
            raise
        bar.close()
        names, total, failed = _merge(out, args, journal, close_session())
    finally:
        journal.close()
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
        seconds=seconds[0],
    )
