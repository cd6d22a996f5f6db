"""Runs policies on planned episodes and writes one JSONL record per finished episode.

The plan is a pure function of the run config: episode i of (task, split, difficulty, perturbations)
always gets the same scene and policy-noise seeds. Rerunning into the same directory skips episodes
already recorded, so an interrupted run resumes without duplicates. A policy exception or simulator
fault marks that episode `error` (counted as a failure, with its traceback) and the run goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from divla_eval.errors import DivlaEvalError, raise_if_interrupted
from divla_eval.reasoning import reasoning_scores
from divla_eval.records import (
    EpisodeRecord,
    EpisodeStore,
    check_manifest_compatible,
    environment_info,
    read_manifest,
    write_manifest,
)


@dataclass(frozen=True)
class RunConfig:
    task: str = "bin_picking"
    split: str = "unseen"
    policy: str = "scripted"
    episodes: int | None = None
    """None: the task's natural count (for bin picking, one episode per object of the split)."""
    seed: int = 0
    difficulty: str | None = None
    perturbations: tuple[tuple[str, int], ...] = ()
    checkpoint: str | None = None
    image_size: int = 84
    max_steps: int | None = None
    task_options: dict = field(default_factory=dict)
    matched_control: bool = False
    """Also run every episode without perturbations (same scene and seeds), to measure the drop."""
    policy_options: dict = field(default_factory=dict)
    """Inference options of a learned policy (`--policy-option KEY=VALUE`, see the policy's
    `INFERENCE_OPTIONS`), passed to its `from_pretrained`; part of the resume key."""

    def resolved_episodes(self) -> int:
        if self.episodes is not None:
            return self.episodes
        from divla_eval.tasks import get_task

        return get_task(self.task, **self.task_options).default_episodes(self.split)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["episodes"] = self.resolved_episodes()
        d["perturbations"] = [list(p) for p in self.perturbations]
        if not self.policy_options:
            # recorded only when set, so run directories made before the option existed (whose
            # manifests lack the key) still resume; an absent key means the checkpoint's defaults
            del d["policy_options"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """The config a manifest's `config` (an `as_dict`) was written from: same episodes and seeds."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["perturbations"] = tuple((str(n), int(lvl)) for n, lvl in d.get("perturbations", []))
        return cls(**kwargs)


def plan_episodes(cfg: RunConfig):
    from divla_eval.tasks.base import EpisodeSpec

    variants = [cfg.perturbations]
    if cfg.matched_control and cfg.perturbations:
        variants.append(())
    return [
        EpisodeSpec(cfg.task, cfg.split, i, cfg.seed, cfg.difficulty, perturbations)
        for i in range(cfg.resolved_episodes())
        for perturbations in variants
    ]


def validate(cfg: RunConfig, policy=None) -> None:
    """Check names and values before anything heavy is imported or any file is written.

    `policy`: a policy object given instead of a name (`divla_eval.evaluate`); it is checked against
    the protocol, and `cfg.policy` is then only the name its records carry."""
    from divla_eval.policy import check_policy, parse_policy_options, policy_factory
    from divla_eval.tasks import get_task

    task = get_task(cfg.task, **cfg.task_options)
    task.validate(cfg.split, cfg.difficulty)
    _validate_values(cfg)
    if policy is not None:
        check_policy(policy, "the policy object")
        if cfg.checkpoint is not None or cfg.policy_options:
            raise DivlaEvalError(
                "a policy object is already built: load its checkpoint and set its inference options "
                "when making it, not with checkpoint= or policy_options="
            )
        return
    factory = policy_factory(cfg.policy)  # a built-in, a plugin or a module:factory path
    options = parse_policy_options(cfg.policy, cfg.policy_options)  # names and types
    check = getattr(factory, "check_options", None)  # e.g. remote: a ws:// URL is given
    if check is not None and cfg.checkpoint is None:
        check(options)
    if cfg.checkpoint is None and getattr(factory, "requires_checkpoint", False):
        raise DivlaEvalError(
            f"policy {cfg.policy!r} needs --checkpoint DIR (train one with "
            f"`divla-eval train --policy {cfg.policy} --demos FILE.hdf5 --out DIR`)"
        )
    if cfg.checkpoint is not None:
        if not hasattr(factory, "from_pretrained"):
            raise DivlaEvalError(
                f"policy {cfg.policy!r} takes no checkpoint (got --checkpoint {cfg.checkpoint})"
            )
        if not Path(cfg.checkpoint).is_dir():
            raise DivlaEvalError(f"checkpoint directory {cfg.checkpoint} does not exist")
        check = getattr(factory, "check_checkpoint", None)
        if check is not None:  # a cheap look (no torch) at the files and the robot they were made for
            from divla_eval.envs.gym_env import PROPRIO_DIM

            config = check(cfg.checkpoint, task.embodiment, proprio_dim=PROPRIO_DIM * len(task.robots))
            check_options = getattr(factory, "check_inference_options", None)
            if options and check_options is not None:  # ranges, against the checkpoint's config
                check_options(options, config)


def _validate_values(cfg: RunConfig) -> None:
    """The checks of `validate` that do not concern the policy."""
    from divla_eval.envs.perturbations import LEVELS, PERTURBATIONS

    for name, level in cfg.perturbations:
        PERTURBATIONS.check_name(name)
        if level not in LEVELS:
            raise DivlaEvalError(f"perturbation level {name}:{level} unknown; valid levels: 1, 2, 3")
    if cfg.matched_control and not cfg.perturbations:
        raise DivlaEvalError("--matched-control needs at least one --perturb NAME:LEVEL")
    if cfg.episodes is not None and cfg.episodes <= 0:
        raise DivlaEvalError(f"--episodes must be a positive integer, got {cfg.episodes}")
    if cfg.image_size < 16:
        raise DivlaEvalError(f"--image-size must be at least 16, got {cfg.image_size}")


def _latency_stats(latencies: list[float]) -> dict:
    if not latencies:
        return {}
    arr = np.array(latencies) * 1000.0
    return {
        "n": len(arr),
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
    }


def run_episode(env, spec, policy, video_path: Path | None = None) -> dict:
    """Run one episode; returns the outcome fields of its record (no I/O but the optional video)."""
    from divla_eval.policy import Observation

    env.reset(options={"episode": spec})
    episode = env.episode
    policy.reset(episode.instruction, spec.seed("policy"))
    if policy.metadata.privileged:
        policy.bind(env.sim, episode)
    cams = policy.metadata.cameras
    k = max(1, policy.metadata.execute_steps)
    history = max(1, policy.metadata.obs_horizon)
    # A learned policy's reasoning is scored against the scripted expert's phrase for the same state.
    # The expert runs in the shadow every step (its phase timers count steps), its actions discarded.
    shadow = policy.metadata.reasoning and not policy.metadata.privileged
    expert_text: str | None = None
    latencies: list[float] = []
    reasoning: list[dict] = []
    frames: list[np.ndarray] = []
    chunk, j = None, 0
    info = {"success": False, "partial_score": 0.0}
    terminated = truncated = False
    while not (terminated or truncated):
        if shadow:
            expert_text = _shadow_reasoning(episode, env)
        if chunk is None or j >= min(k, len(chunk.actions)):
            obs = env.observe(cameras=cams)
            images = {c: obs[c] for c in cams}
            t0 = time.perf_counter()
            oracle = expert_text if policy.metadata.oracle_reasoning else None
            chunk = policy.infer(
                Observation(images, obs["proprio"], obs["instruction"], env.embodiment, oracle)
            )
            latencies.append(time.perf_counter() - t0)
            j = 0
            # A learned policy's text is kept for every call (it is what gets scored); the expert,
            # called every step, only when its phrase changes.
            changed = not reasoning or reasoning[-1]["text"] != chunk.reasoning
            if chunk.reasoning is not None and (changed or not policy.metadata.privileged):
                entry = {"step": env.steps, "text": chunk.reasoning}
                if expert_text is not None:
                    entry["expert"] = expert_text
                reasoning.append(entry)
        terminated, truncated, info = env.advance(chunk.actions[j])
        j += 1
        # A policy conditioned on several consecutive steps (as it was trained) sees the steps just
        # before its next call too, not only the calls `execute_steps` apart.
        if history > 1 and not (terminated or truncated) and 0 < min(k, len(chunk.actions)) - j < history:
            obs = env.observe(cameras=cams)
            policy.observe(
                Observation({c: obs[c] for c in cams}, obs["proprio"], obs["instruction"], env.embodiment)
            )
        if video_path is not None:
            frames.append(_captioned(env.camera_image("front"), reasoning[-1]["text"] if reasoning else ""))
    if video_path is not None:
        _write_video(video_path, frames)
    scores = reasoning_scores(reasoning)
    return {
        "success": bool(info["success"]),
        "partial_score": float(info["partial_score"]),
        "failure_mode": None if info["success"] else episode.failure_mode(env.sim),
        "steps": env.steps,
        "latency_ms": _latency_stats(latencies),
        "reasoning_trace": reasoning,
        "reasoning_accuracy": scores["exact"] if scores else None,
        "reasoning_scores": scores,
        "object_ids": list(episode.object_ids),
        "instruction": episode.instruction,
        "perturbations": list(env.perturbation_params),
        "extra": dict(getattr(episode, "extra", {})),
    }


def _shadow_reasoning(episode, env) -> str | None:
    """The expert's phrase for the current state, or None when the task has no expert or it fails
    (scoring must never end an episode)."""
    try:
        return episode.expert(env.sim).reasoning
    except Exception as exc:
        raise_if_interrupted(exc)
        return None


VIDEO_WIDTH = 320


def _captioned(frame: np.ndarray, text: str) -> np.ndarray:
    """The frame scaled up to VIDEO_WIDTH (nearest neighbour: policy images are tiny) with the current
    reasoning phrase written in a strip under it."""
    import cv2

    h, w = frame.shape[:2]
    scale = max(1, VIDEO_WIDTH // w)
    big = cv2.resize(frame, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    strip = np.full((24, big.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(strip, text[:60], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([big, strip], axis=0)


def _write_video(path: Path, frames: list[np.ndarray], fps: int = 20) -> None:
    import cv2

    if not frames:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


@dataclass
class RunSummary:
    run_dir: Path
    planned: int
    skipped: int
    ran: int
    successes: int
    errors: int
    records: list[EpisodeRecord]


LOCK_FILE = ".divla-eval.lock"


def _make_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise DivlaEvalError(f"cannot write to output directory {run_dir}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def exclusive(run_dir: Path) -> Iterator[None]:
    """Hold an advisory lock on the run directory while episodes run. Two processes resuming the same
    directory would each run the missing episodes and append every one of them twice."""
    _make_writable(run_dir)
    with open(run_dir / LOCK_FILE, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DivlaEvalError(
                f"another divla-eval process is running episodes into {run_dir}: wait for it to finish "
                "or pass another --out"
            ) from None
        yield


def policy_info(cfg: RunConfig, policy=None) -> dict:
    """What the manifest says about the policy beyond its name and options: for a remote policy, the
    server's metadata, read once here (this also waits for a server that is still starting, and ends
    the run with one line when none answers). `policy`: a policy object (its metadata's `info`)."""
    from divla_eval.policy import POLICIES, parse_policy_options

    if policy is not None:
        return dict(policy.metadata.info)
    describe = getattr(POLICIES.get(cfg.policy), "describe", None)
    if describe is None or cfg.checkpoint is not None:
        return {}
    return describe(**parse_policy_options(cfg.policy, cfg.policy_options))


def prepare_run_dir(cfg: RunConfig, run_dir: Path, policy=None) -> None:
    """Check that `run_dir` (made writable by `exclusive`, which holds it) belongs to this config and
    task version, and write its manifest if it has none. `policy`: a policy object, as for `run`."""
    from divla_eval.device import DEVICE_ENV, describe_device
    from divla_eval.envs.objects import library_hash
    from divla_eval.tasks import get_task, task_options

    config = cfg.as_dict()
    manifest = read_manifest(run_dir)
    planned = (manifest or {}).get("config", {}).get("episodes")
    # A larger --episodes extends a run: an episode's scene and seeds come from its index alone, so
    # the first N episodes of a longer run are the N already recorded. Fewer is still a mismatch.
    extends = isinstance(planned, int) and config["episodes"] > planned
    check_manifest_compatible(run_dir, {**config, "episodes": planned} if extends else config)
    task = get_task(cfg.task, **cfg.task_options)
    if manifest is not None and manifest.get("task_version", task.version) != task.version:
        # A changed task (a fixed expert, a new scene) is another experiment: one directory, one
        # report, must not mix its episodes with the old version's.
        raise DivlaEvalError(
            f"{run_dir} holds episodes of {cfg.task} version {manifest['task_version']}, but this "
            f"divla-eval runs version {task.version}: pass another --out to keep them apart"
        )
    if manifest is None:
        extra = {
            "policy_info": policy_info(cfg, policy),
            "run_id": uuid.uuid4().hex[:12],
            "task_version": task.version,
            "task_settings": {k: getattr(task, k) for k in task_options(cfg.task)},  # defaults included
            # the budget episodes actually get (it can depend on the split and the difficulty)
            "episode_max_steps": cfg.max_steps or task.max_steps_for(cfg.split, cfg.difficulty),
            # where the policy ran (an execution detail, like threads: no part of the resume key)
            "device": describe_device(os.environ.get(DEVICE_ENV, "cpu")),
            "object_library_hash": library_hash(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **environment_info(Path(__file__).resolve().parent),  # the harness's own git revision
        }
        write_manifest(run_dir, config, extra)
    elif extends:
        extra = {k: v for k, v in manifest.items() if k != "config"}
        extra["extended"] = [
            *manifest.get("extended", []),
            {
                "episodes": [planned, config["episodes"]],
                "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "git_commit": environment_info(Path(__file__).resolve().parent)["git_commit"],
            },
        ]
        write_manifest(run_dir, config, extra)


class EpisodeWorker:
    """Owns one env and one policy and runs episodes one at a time, in the main process or a worker.

    Each worker process has its own simulator and renderer (DESIGN.md: one MuJoCo renderer per process).
    `policy`: a policy object to use instead of building `cfg.policy`, or in a worker process its
    pickled bytes (`policy_for_workers`), so that each worker has its own copy.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, video: bool, policy=None):
        from divla_eval.device import DEVICE_ENV
        from divla_eval.envs.gym_env import ACTION_DIM
        from divla_eval.errors import UnknownNameError
        from divla_eval.policy import make_policy
        from divla_eval.tasks import get_task

        self.cfg, self.run_dir, self.video = cfg, run_dir, video
        arms = len(get_task(cfg.task, **cfg.task_options).robots)
        if isinstance(policy, bytes):
            policy = _unpickle_policy(policy)
        if policy is not None:
            self.policy = policy
        else:
            try:
                self.policy = make_policy(
                    cfg.policy,
                    cfg.checkpoint,
                    action_dim=ACTION_DIM * arms,
                    options=cfg.policy_options,
                    device=os.environ.get(DEVICE_ENV),  # set by `run`, like the thread share
                )
            except UnknownNameError as exc:
                import multiprocessing

                if multiprocessing.parent_process() is None:
                    raise
                raise DivlaEvalError(  # the parent knew the name: it was registered at run time
                    f"{exc}. In a worker process: a policy registered by a script must be registered at "
                    'its top level, outside `if __name__ == "__main__":` (workers re-run the script '
                    "without that block), or pass the policy object to divla_eval.evaluate"
                ) from exc
        self.env = self._make_env()

    def _make_env(self):
        from divla_eval.envs.gym_env import DivlaEnv

        cfg = self.cfg
        return DivlaEnv(
            task=cfg.task,
            split=cfg.split,
            difficulty=cfg.difficulty,
            cameras=tuple(self.policy.metadata.cameras),
            image_size=cfg.image_size,
            max_steps=cfg.max_steps,
            task_options=cfg.task_options,
            run_seed=cfg.seed,
        )

    def run(self, spec) -> dict:
        """Run one episode; a policy or simulator fault fails this episode (status "error"), not the run."""
        t0 = time.perf_counter()
        video_path = self.run_dir / "videos" / (spec.key.replace("/", "__") + ".mp4") if self.video else None
        try:
            outcome = run_episode(self.env, spec, self.policy, video_path)
            outcome.update(status="ok", error=None)
        except Exception as exc:
            raise_if_interrupted(exc)
            if getattr(exc, "fatal", False):  # e.g. the policy server is gone: stop, keep what finished
                raise
            episode = self.env.episode
            outcome = {
                "success": False,
                "partial_score": 0.0,
                "failure_mode": "error",
                "steps": self.env.steps,
                "latency_ms": {},
                "reasoning_trace": [],
                "object_ids": list(episode.object_ids) if episode else [],
                "instruction": episode.instruction if episode else "",
                "perturbations": [{"name": n, "level": lvl} for n, lvl in spec.perturbations],
                "status": "error",
                "error": traceback.format_exc(),
            }
            self.env.close()
            self.env = self._make_env()  # the old simulator may be in a broken state
        outcome["wall_time_s"] = time.perf_counter() - t0
        outcome["checkpoint_hash"] = self.policy.metadata.checkpoint_hash
        outcome["policy_info"] = dict(self.policy.metadata.info)
        return outcome

    def close(self) -> None:
        self.env.close()
        close = getattr(self.policy, "close", None)  # e.g. a remote policy's connection
        if close is not None:
            close()


def run(
    cfg: RunConfig,
    run_dir: Path,
    progress: bool = True,
    video: bool = False,
    workers: int = 1,
    threads: int | None = None,
    policy=None,
    device: str = "auto",
) -> RunSummary:
    """Run (or resume) every planned episode of `cfg`, appending records to run_dir/episodes.jsonl.

    Results do not depend on `workers`: every episode's seeds come from its name, and each record is
    written by this process as soon as its episode finishes. `threads`: torch threads per worker
    process; by default each worker gets its share of the cores. `policy`: a policy object to run
    instead of building `cfg.policy` (which then only names it in the records); with several workers
    each gets its own pickled copy. `device`: where learned policies run (`divla_eval.device`), like
    `threads` an execution detail: recorded in the manifest, no part of the resume key.
    """
    from divla_eval.device import DEVICE_ENV, resolve_device
    from divla_eval.policy import TORCH_THREADS_ENV

    # Learned policies run torch: give each worker process its share of the cores, not all of them
    # (oversubscribed threads made one DiVLA call several times slower here). Other jobs on the machine
    # are invisible to that share: an OpenVLA run with 2 threads beside another 2-thread run on 2 cores
    # took 190-550 ms per call instead of 11-14 ms, hence `threads` (`run --threads 1`).
    if threads is None:
        os.environ.setdefault(TORCH_THREADS_ENV, str(max(1, (os.cpu_count() or 1) // workers)))
    elif threads < 1:
        raise DivlaEvalError(f"--threads must be a positive integer, got {threads}")
    else:
        os.environ[TORCH_THREADS_ENV] = str(threads)
    os.environ[DEVICE_ENV] = resolve_device(device)  # every worker process builds its policy there

    validate(cfg, policy)
    if workers < 1:
        raise DivlaEvalError(f"--workers must be a positive integer, got {workers}")
    sent = policy
    if workers > 1:
        from divla_eval.parallel import check_spawn_safe

        check_spawn_safe()  # before the run directory is touched
        if policy is not None:
            sent = policy_for_workers(policy)
    with exclusive(run_dir):
        return _run_locked(cfg, run_dir, progress, video, workers, policy, sent)


def policy_for_workers(policy) -> bytes:
    """A policy object as worker processes receive it. cloudpickle sends a class defined in a script's
    `__main__`, a notebook or `python -c` by value (plain pickle names it `__main__.X`, which a worker
    of a notebook cannot find: it died unpickling it) and an importable one by reference."""
    import cloudpickle

    try:
        return cloudpickle.dumps(policy)
    except Exception as exc:
        raise DivlaEvalError(
            f"the policy object cannot be sent to worker processes ({type(exc).__name__}: {exc}): use "
            "workers=1, or give a 'package.module:factory' name so that each worker builds its own"
        ) from exc


def _unpickle_policy(data: bytes):
    import pickle

    try:
        return pickle.loads(data)
    except Exception as exc:
        raise DivlaEvalError(
            f"a worker process could not rebuild the policy object ({type(exc).__name__}: {exc}): use "
            "workers=1, or give a 'package.module:factory' name so that each worker builds its own"
        ) from exc


def _run_locked(
    cfg: RunConfig,
    run_dir: Path,
    progress: bool,
    video: bool,
    workers: int,
    policy=None,
    sent: object = None,
) -> RunSummary:
    from tqdm import tqdm

    from divla_eval.parallel import run_unordered
    from divla_eval.tasks import get_task

    prepare_run_dir(cfg, run_dir, policy)
    manifest = read_manifest(run_dir)
    store = EpisodeStore(run_dir / "episodes.jsonl")
    existing = store.load()
    done = {r.episode_key for r in existing}
    plan = plan_episodes(cfg)
    todo = [s for s in plan if s.key not in done]
    task = get_task(cfg.task, **cfg.task_options)
    new_records: list[EpisodeRecord] = []
    successes = sum(r.success for r in existing)
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), disable=not progress, unit="ep", desc=cfg.task)
    try:
        outcomes = run_unordered(EpisodeWorker, (cfg, run_dir, video, sent), todo, workers, "episodes")
        for spec, outcome in outcomes:
            record = EpisodeRecord(
                run_id=manifest["run_id"],
                task=cfg.task,
                task_version=task.version,
                split=cfg.split,
                difficulty=cfg.difficulty,
                episode_index=spec.episode_index,
                episode_key=spec.key,
                seed=spec.seed("scene"),
                policy=cfg.policy,
                policy_options=dict(cfg.policy_options),
                **outcome,
            )
            store.append(record)
            new_records.append(record)
            successes += record.success
            bar.update(1)
            bar.set_postfix(success=f"{successes / (len(existing) + len(new_records)):.0%}")
    finally:
        bar.close()
    return RunSummary(
        run_dir=run_dir,
        planned=len(plan),
        skipped=len(plan) - len(todo),
        ran=len(new_records),
        successes=successes,
        errors=sum(r.status == "error" for r in new_records),
        records=existing + new_records,
    )
