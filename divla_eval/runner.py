"""Runs policies on planned episodes and writes one JSONL record per finished episode.

The plan is a pure function of the run config: episode i of (task, split, difficulty, perturbations)
always gets the same scene and policy-noise seeds. Rerunning into the same directory skips episodes
already recorded, so an interrupted run resumes without duplicates. A policy exception or simulator
fault marks that episode `error` (counted as a failure, with its traceback) and the run goes on; so does
a policy that calls `sys.exit` during an episode (SystemExit is no Exception, and used to end the whole
run without a word: it is that episode's fault, the next episode may well finish). What can be checked
before the first episode is checked in `validate`, so that a user's mistake (an image size the
checkpoint was not trained on, damaged weights, absurd counts) is one line and exit code 2, never
episodes counted as the policy's failures.
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
from typing import TYPE_CHECKING

from divla_eval.episode import EpisodeOutcome, run_episode, video_name
from divla_eval.errors import DivlaEvalError, raise_if_interrupted
from divla_eval.records import (
    EpisodeRecord,
    EpisodeStore,
    check_manifest_compatible,
    environment_info,
    read_manifest,
    write_manifest,
)

if TYPE_CHECKING:
    from divla_eval.tasks.base import EpisodeSpec, Task

__all__ = ["EpisodeOutcome", "Run", "RunConfig", "run", "run_episode", "validate"]


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

    def resolve(self) -> Run:
        """This config with its task built (once) and checked: what the rest of a run is handed."""
        return Run.resolve(self)

    def as_dict(self) -> dict:
        """The manifest's `config` (see `Run.as_dict`)."""
        return self.resolve().as_dict()

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """The config a manifest's `config` (an `as_dict`) was written from: same episodes and seeds."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["perturbations"] = tuple((str(n), int(lvl)) for n, lvl in d.get("perturbations", []))
        return cls(**kwargs)


@dataclass(frozen=True)
class Run:
    """A `RunConfig` resolved once, before anything runs: its Task instance (built from the name and
    options here and nowhere else below the CLI), its episode count and so its plan. It is what
    `validate`, the run directory's manifest, the episode workers and their envs are handed."""

    cfg: RunConfig
    task: Task
    episodes: int

    @classmethod
    def resolve(cls, cfg: RunConfig, task: Task | None = None) -> Run:
        """Build the task (unknown names and options: one line) and check the split and difficulty.
        `task`: the config's task, already built (the CLI builds it once for several splits)."""
        from divla_eval.tasks import get_task

        if task is None:
            task = get_task(cfg.task, **cfg.task_options)
        elif task.name != cfg.task:
            raise ValueError(f"task {task.name!r} given for a config of task {cfg.task!r}")
        task.validate(cfg.split, cfg.difficulty)
        episodes = cfg.episodes if cfg.episodes is not None else task.default_episodes(cfg.split)
        return cls(cfg, task, episodes)

    def plan(self) -> list[EpisodeSpec]:
        """Every planned episode, in order (with `matched_control`, each also without perturbations)."""
        cfg = self.cfg
        variants = [cfg.perturbations]
        if cfg.matched_control and cfg.perturbations:
            variants.append(())
        return [
            self.task.spec(cfg.split, i, cfg.seed, cfg.difficulty, perturbations)
            for i in range(self.episodes)
            for perturbations in variants
        ]

    def as_dict(self) -> dict:
        """The manifest's `config`: what a resumed run must match (`RunConfig.from_dict` reads it)."""
        d = dataclasses.asdict(self.cfg)
        d["episodes"] = self.episodes
        d["perturbations"] = [list(p) for p in self.cfg.perturbations]
        if not self.cfg.policy_options:
            # recorded only when set, so run directories made before the option existed (whose
            # manifests lack the key) still resume; an absent key means the checkpoint's defaults
            del d["policy_options"]
        return d

    @property
    def max_steps(self) -> int:
        """The budget episodes actually get (it can depend on the split and the difficulty)."""
        return self.cfg.max_steps or self.task.max_steps_for(self.cfg.split, self.cfg.difficulty)


def plan_episodes(cfg: RunConfig | Run) -> list[EpisodeSpec]:
    """The planned episodes of a config (resolving it) or of a resolved run."""
    return (cfg if isinstance(cfg, Run) else cfg.resolve()).plan()


MAX_EPISODES = 100_000
"""More planned episodes than this is a typo: planning builds the whole list first (10^12 hung silently
before the first episode), and 10^5 episodes at a few seconds each are already weeks."""
MAX_IMAGE_SIZE = 512
"""Square camera images above this are refused: `collect` keeps an episode's frames in memory (two
cameras x steps x size^2 x 3 bytes: 100000 px asked for 28 GiB), and every policy here sees 84-224 px."""
MAX_STEPS = 100_000
"""An episode budget above this is a typo (the longest task allows 3000 steps)."""


def max_workers() -> int:
    """More simulator processes than 4 per core only slows every one of them (each holds ~600 MB)."""
    return 4 * max(1, os.cpu_count() or 1)


def check_parallelism(workers: int, threads: int | None = None) -> None:
    """One line for a worker or thread count that cannot be meant (each worker is a ~600 MB process)."""
    cores = os.cpu_count() or 1
    if workers < 1:
        raise DivlaEvalError(f"--workers must be a positive integer, got {workers}")
    if workers > max_workers():
        raise DivlaEvalError(
            f"--workers {workers} is more than 4 per core ({cores} cores here; each worker is a simulator "
            f"process of ~600 MB): use at most {max_workers()}"
        )
    if threads is not None and threads < 1:
        raise DivlaEvalError(f"--threads must be a positive integer, got {threads}")
    if threads is not None and threads > max_workers():
        raise DivlaEvalError(f"--threads {threads} is more than 4 per core ({cores} cores here)")


def validate(cfg: RunConfig | Run, policy=None) -> Run:
    """Check names and values before anything heavy is imported or any file is written; returns the
    resolved run (the one place its task is built).

    `policy`: a policy object given instead of a name (`divla_eval.evaluate`); it is checked against
    the protocol, and `cfg.policy` is then only the name its records carry."""
    from divla_eval.policy import (
        BuiltFromOptions,
        ChecksCheckpoint,
        LoadsCheckpoint,
        check_policy,
        parse_policy_options,
        policy_factory,
        requires_checkpoint,
    )

    resolved = cfg if isinstance(cfg, Run) else Run.resolve(cfg)
    cfg, task = resolved.cfg, resolved.task
    _validate_values(cfg)
    if policy is not None:
        check_policy(policy, "the policy object")
        if cfg.checkpoint is not None or cfg.policy_options:
            raise DivlaEvalError(
                "a policy object is already built: load its checkpoint and set its inference options "
                "when making it, not with checkpoint= or policy_options="
            )
        return resolved
    factory = policy_factory(cfg.policy)  # a built-in, a plugin or a module:factory path
    options = parse_policy_options(cfg.policy, cfg.policy_options)  # names and types
    if isinstance(factory, BuiltFromOptions) and cfg.checkpoint is None:
        factory.check_options(options)  # e.g. remote: a ws:// URL is given
    if cfg.checkpoint is None and requires_checkpoint(factory):
        raise DivlaEvalError(
            f"policy {cfg.policy!r} needs --checkpoint DIR (train one with "
            f"`divla-eval train --policy {cfg.policy} --demos FILE.hdf5 --out DIR`)"
        )
    if cfg.checkpoint is not None:
        if not isinstance(factory, LoadsCheckpoint):
            raise DivlaEvalError(
                f"policy {cfg.policy!r} takes no checkpoint (got --checkpoint {cfg.checkpoint})"
            )
        from divla_eval.safe_io import require_dir

        require_dir(Path(cfg.checkpoint), "checkpoint directory")
        if isinstance(factory, ChecksCheckpoint):  # a cheap look (no torch) at the files and the robot
            from divla_eval.envs.gym_env import PROPRIO_DIM

            config = factory.check_checkpoint(
                cfg.checkpoint, task.embodiment, proprio_dim=PROPRIO_DIM * len(task.robots)
            )
            if options:  # ranges, against the checkpoint's config
                factory.check_inference_options(options, config)
            check_image_size(cfg.checkpoint, config, cfg.image_size)
            check_weights_file(Path(cfg.checkpoint) / "model.safetensors")
    return resolved


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
    if cfg.episodes is not None and cfg.episodes > MAX_EPISODES:
        raise DivlaEvalError(f"--episodes {cfg.episodes} is more than the {MAX_EPISODES} a run can plan")
    if cfg.image_size < 16:
        raise DivlaEvalError(f"--image-size must be at least 16, got {cfg.image_size}")
    if cfg.image_size > MAX_IMAGE_SIZE:
        raise DivlaEvalError(f"--image-size must be at most {MAX_IMAGE_SIZE}, got {cfg.image_size}")
    if cfg.max_steps is not None and not 1 <= cfg.max_steps <= MAX_STEPS:
        raise DivlaEvalError(f"--max-steps must be in 1..{MAX_STEPS}, got {cfg.max_steps}")


def check_image_size(checkpoint: str | Path, config: dict, image_size: int) -> None:
    """Refuse an image size other than the checkpoint's, before the run starts. Found inside an episode
    it was an `error` in every record, counted against the policy in the success rate, and the run
    directory was already made under the wrong key. Every learned policy's config.json has image_size."""
    trained = config.get("image_size") if isinstance(config, dict) else None
    if isinstance(trained, int) and not isinstance(trained, bool) and trained != image_size:
        raise DivlaEvalError(
            f"{checkpoint} was trained on {trained} px images, not {image_size} px: run with "
            f"--image-size {trained}"
        )


def check_weights_file(path: Path) -> None:
    """Read a safetensors file's header (a few KB, no torch) and check that the file is as long as it
    says: a truncated or overwritten weights file is then one line before the run, not a failure of
    every worker after the manifest is written. A missing file is the policy's own check to report."""
    import json
    import struct

    path = Path(path)
    if not path.is_file():
        return
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(size - 8, 100 << 20):
                raise ValueError("no safetensors header")
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        expected = 8 + n + max(ends, default=0)
    except OSError as exc:
        raise DivlaEvalError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise DivlaEvalError(f"{path} is damaged: not a safetensors file ({exc})") from None
    if size != expected:
        raise DivlaEvalError(
            f"{path} is damaged: {size} bytes where its header describes {expected} (truncated copy?)"
        )


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
    """Create the run directory and prove it writable, or say in one line why not (a file in the way
    is named as such: "File exists" sent users looking for a directory that was not there)."""
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            if not path.is_dir():
                what = "it" if path == run_dir else str(path)
                raise DivlaEvalError(
                    f"cannot write to output directory {run_dir}: {what} is a file, not a directory"
                )
            break
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
    from divla_eval.policy import POLICIES, BuiltFromOptions, parse_policy_options

    if policy is not None:
        return dict(policy.metadata.info)
    factory = POLICIES.get(cfg.policy)
    if not isinstance(factory, BuiltFromOptions) or cfg.checkpoint is not None:
        return {}
    return factory.describe(**parse_policy_options(cfg.policy, cfg.policy_options))


def _check_orphan_records(run_dir: Path) -> None:
    """Refuse a directory that holds episode records but no manifest (deleted, or lost to a copy).

    Without the manifest nothing says which config the records were made with, and a rerun with another
    seed or policy wrote a new manifest over them: it resumed "past" episodes of another run and the
    report labelled them as this one's. Recovering the config from the records is not possible either
    (they hold the episodes' derived scene seeds, not the run seed), so the user decides."""
    path = run_dir / "episodes.jsonl"
    try:
        with open(path, "rb") as f:
            orphaned = any(line.strip() for line in f)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DivlaEvalError(f"cannot read {path}: {exc.strerror or exc}") from None
    if orphaned:
        raise DivlaEvalError(
            f"{run_dir} holds episode records but no manifest.json, so their config cannot be checked: "
            "restore its manifest.json to resume it, or pass another --out"
        )


def execution_info(workers: int) -> dict:
    """How this invocation runs episodes: what results may still depend on (a learned policy's float
    reductions change with the torch thread count, and with the device and the versions of torch,
    transformers and diffusers, which the manifest's `packages` hold), and what they do not (the worker
    count: every episode's seeds come from its name)."""
    from divla_eval.device import DEVICE_ENV, describe_device
    from divla_eval.policy import TORCH_THREADS_ENV

    return {
        "workers": workers,
        "torch_threads": int(os.environ.get(TORCH_THREADS_ENV) or 0) or None,
        "device": describe_device(os.environ.get(DEVICE_ENV, "cpu")),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


REPRODUCIBILITY_NOTE = (
    "records do not depend on the number of workers; a learned policy's results can depend on the "
    "torch threads per worker (default 1), the device and the versions under 'packages'"
)


def prepare_run_dir(run: Run, run_dir: Path, policy=None, execution: dict | None = None) -> None:
    """Check that `run_dir` (made writable by `exclusive`, which holds it) belongs to this config and
    task version, and write its manifest if it has none. `policy`: a policy object, as for `run`.
    `execution`: this invocation's `execution_info`, appended to the manifest's `sessions` so that a
    resumed run says how each of its parts ran."""
    try:
        _prepare_run_dir(run, run_dir, policy, execution)
    except OSError as exc:  # a full disk or a folder made read-only since the probe
        raise DivlaEvalError(
            f"cannot write {run_dir / 'manifest.json'}: {exc.strerror or exc}; nothing was run"
        ) from None


def _prepare_run_dir(run: Run, run_dir: Path, policy, execution: dict | None) -> None:
    from divla_eval.device import DEVICE_ENV, describe_device
    from divla_eval.envs.objects import library_hash
    from divla_eval.tasks import task_options

    cfg, task = run.cfg, run.task
    config = run.as_dict()
    manifest = read_manifest(run_dir)
    if manifest is None:
        _check_orphan_records(run_dir)
    planned = (manifest or {}).get("config", {}).get("episodes")
    # A larger --episodes extends a run: an episode's scene and seeds come from its index alone, so
    # the first N episodes of a longer run are the N already recorded. Fewer is still a mismatch.
    extends = isinstance(planned, int) and config["episodes"] > planned
    check_manifest_compatible(run_dir, {**config, "episodes": planned} if extends else config)
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
            "episode_max_steps": run.max_steps,
            # where the policy ran (an execution detail, like threads: no part of the resume key)
            "device": describe_device(os.environ.get(DEVICE_ENV, "cpu")),
            "object_library_hash": library_hash(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **environment_info(Path(__file__).resolve().parent),  # the harness's own git revision
            "reproducibility": REPRODUCIBILITY_NOTE,
            "sessions": [execution] if execution else [],
        }
        write_manifest(run_dir, config, extra)
        return
    extra = {k: v for k, v in manifest.items() if k != "config"}
    changed = False
    if execution:
        extra["sessions"] = [*manifest.get("sessions", []), execution]
        changed = True
    if extends:
        extra["extended"] = [
            *manifest.get("extended", []),
            {
                "episodes": [planned, config["episodes"]],
                "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "git_commit": environment_info(Path(__file__).resolve().parent)["git_commit"],
            },
        ]
        changed = True
    if changed:
        write_manifest(run_dir, config if extends else manifest["config"], extra)


class EpisodeWorker:
    """Owns one env and one policy and runs episodes one at a time, in the main process or a worker.

    Each worker process has its own simulator and renderer (DESIGN.md: one MuJoCo renderer per process).
    `run`: the resolved run (its Task instance travels to worker processes with it). `policy`: a policy
    object to use instead of building `cfg.policy`, or in a worker process its pickled bytes
    (`policy_for_workers`), so that each worker has its own copy.
    """

    def __init__(self, run: Run, run_dir: Path, video: bool, policy=None):
        from divla_eval.device import DEVICE_ENV
        from divla_eval.envs.gym_env import ACTION_DIM
        from divla_eval.errors import UnknownNameError
        from divla_eval.policy import make_policy

        self.resolved, self.run_dir, self.video = run, run_dir, video
        cfg = run.cfg
        if isinstance(policy, bytes):
            policy = _unpickle_policy(policy)
        if policy is not None:
            self.policy = policy
        else:
            try:
                self.policy = _no_exit(make_policy, cfg.policy)(
                    cfg.policy,
                    cfg.checkpoint,
                    action_dim=ACTION_DIM * len(run.task.robots),
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

        cfg = self.resolved.cfg
        return DivlaEnv(
            self.resolved.task,
            split=cfg.split,
            difficulty=cfg.difficulty,
            cameras=tuple(self.policy.metadata.cameras),
            image_size=cfg.image_size,
            max_steps=cfg.max_steps,
            run_seed=cfg.seed,
        )

    def run(self, spec) -> EpisodeOutcome:
        """Run one episode; a policy or simulator fault fails this episode (status "error"), not the run.

        A policy that calls `sys.exit` (SystemExit, which is no Exception) fails its episode too: it is
        recorded with the exit code and the traceback, and the next episode runs. Ending the run instead
        would make one policy bug look like a finished run with no message (as it used to), and
        Ctrl-C (KeyboardInterrupt) still stops the run as before."""
        t0 = time.perf_counter()
        video_path = self.run_dir / "videos" / video_name(spec.key) if self.video else None
        try:
            outcome = run_episode(self.env, spec, self.policy, video_path)
        except (Exception, SystemExit) as exc:
            raise_if_interrupted(exc)
            if getattr(exc, "fatal", False):  # e.g. the policy server is gone: stop, keep what finished
                raise
            outcome = EpisodeOutcome.failed(self.env, spec, traceback.format_exc())
            self.env.close()
            self.env = self._make_env()  # the old simulator may be in a broken state
        outcome.wall_time_s = time.perf_counter() - t0
        outcome.checkpoint_hash = self.policy.metadata.checkpoint_hash
        outcome.policy_info = dict(self.policy.metadata.info)
        return outcome

    def close(self) -> None:
        from divla_eval.policy import ClosablePolicy

        self.env.close()
        if isinstance(self.policy, ClosablePolicy):  # e.g. a remote policy's connection
            self.policy.close()


def run(
    cfg: RunConfig | Run,
    run_dir: Path,
    progress: bool = True,
    video: bool = False,
    workers: int = 1,
    threads: int | None = None,
    policy=None,
    device: str = "auto",
    backend="local",
    ray_address: str | None = None,
) -> RunSummary:
    """Run (or resume) every planned episode of `cfg` (a config, or one `validate` has resolved),
    appending records to run_dir/episodes.jsonl.

    Results do not depend on `workers`: every episode's seeds come from its name, and each record is
    written by this process as soon as its episode finishes. `threads`: torch threads per worker
    process; by default each worker gets its share of the cores. `policy`: a policy object to run
    instead of building `cfg.policy` (which then only names it in the records); with several workers
    each gets its own pickled copy. `device`: where learned policies run (`divla_eval.device`), like
    `threads` an execution detail: recorded in the manifest, no part of the resume key.
    `backend`: where episodes run (`divla_eval.backends`): "local" processes, or "ray" actors (one per
    worker) on a local cluster or the one at `ray_address`; the records are the same, and this process
    writes them either way.
    """
    from divla_eval.backends import get_backend
    from divla_eval.device import DEVICE_ENV, resolve_device
    from divla_eval.policy import TORCH_THREADS_ENV, computes_on_device, policy_factory

    # Learned policies run torch with one thread per worker process unless `threads` says otherwise.
    # Float reductions change with the thread count, so a default that followed the cores per worker
    # made results depend on the worker count and the machine (same checkpoint and seed: 11/102 with 2
    # workers x 1 thread, 10/102 with 1 worker x 2 threads); it was also slow whenever other jobs share
    # the cores (8 DiVLA episodes: 44 s with 1 thread, 233 s with 2). The manifest records the threads.
    on_ray = getattr(backend, "name", backend) == "ray"
    # the thread count here; the worker count by the backend when it connects (4 per local core; a
    # Ray cluster's CPUs)
    check_parallelism(1, threads)
    if workers < 1:
        raise DivlaEvalError(f"--workers must be a positive integer, got {workers}")
    os.environ[TORCH_THREADS_ENV] = str(threads if threads is not None else DEFAULT_TORCH_THREADS)
    os.environ[DEVICE_ENV] = resolve_device(device)  # every worker process builds its policy there

    resolved = validate(cfg, policy)
    # a model in each Ray actor on CUDA reserves its share of the cluster's GPUs (a remote policy's
    # model runs on its server, random and scripted ones need none): what the policy declares, not
    # whether a checkpoint was given (a plugin may build its CUDA model from options alone)
    in_actor_model = computes_on_device(policy if policy is not None else policy_factory(resolved.cfg.policy))
    gpus = "auto" if os.environ[DEVICE_ENV].startswith("cuda") and in_actor_model else None
    backend = get_backend(backend, address=ray_address, gpus_per_actor=gpus)
    sent = policy
    if workers > 1 or on_ray:
        if not on_ray:
            from divla_eval.parallel import check_spawn_safe

            check_spawn_safe()  # before the run directory is touched
        if policy is not None:
            sent = policy_for_workers(policy)
    backend.connect(workers)  # an unreachable cluster: one line, before the run directory is touched
    with exclusive(run_dir):
        return _run_locked(resolved, run_dir, progress, video, workers, policy, sent, backend)


DEFAULT_TORCH_THREADS = 1
"""Torch threads per evaluation worker when `threads` is not given: the same on every machine and for
every worker count, so a learned policy's records do not move with either."""


def _no_exit(build, name: str):
    """`build` with a `sys.exit` inside it (a policy's constructor giving up) turned into one line:
    SystemExit would otherwise end the run silently, or kill a worker process with no reason given."""

    def call(*args, **kwargs):
        try:
            return build(*args, **kwargs)
        except SystemExit as exc:
            raise DivlaEvalError(
                f"policy {name!r} called sys.exit({exc.code!r}) while being built; no episode was run"
            ) from None

    return call


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


def _append(store: EpisodeStore, record: EpisodeRecord, saved: int) -> None:
    """Append one record; when the disk is full (or the file went away), cut off any part-line written,
    so the file holds exactly the finished episodes, and stop the run with one line saying so. A resume
    after freeing space reruns only the episodes not recorded: nothing lost, nothing twice."""
    path = store.path
    try:
        before = path.stat().st_size if path.exists() else 0
    except OSError:
        before = None
    try:
        store.append(record)
    except OSError as exc:
        if before is not None:
            with contextlib.suppress(OSError), open(path, "r+b") as f:
                f.truncate(before)  # truncating needs no free space
        raise DivlaEvalError(
            f"cannot write the record of {record.episode_key} to {path}: {exc.strerror or exc}; "
            f"the {saved} episode(s) recorded before it are kept, rerun the same command to resume"
        ) from None


def _unclaim(run_dir: Path) -> None:
    """Remove the manifest this invocation wrote when it stops before its first record (a policy that
    cannot be built, Ctrl-C during the first episode): left behind, it claimed the directory for a
    config that never ran, and the corrected rerun was refused as "a different config"."""
    with contextlib.suppress(OSError):
        if not (run_dir / "episodes.jsonl").exists() or not (run_dir / "episodes.jsonl").read_text().strip():
            (run_dir / "manifest.json").unlink(missing_ok=True)


def _run_locked(
    run: Run,
    run_dir: Path,
    progress: bool,
    video: bool,
    workers: int,
    policy=None,
    sent: object = None,
    backend=None,
) -> RunSummary:
    from tqdm import tqdm

    from divla_eval.backends import crashed_episode, get_backend

    backend = get_backend(backend)
    cfg = run.cfg
    created = read_manifest(run_dir) is None
    store = EpisodeStore(run_dir / "episodes.jsonl")
    existing = store.load()
    done = {r.episode_key for r in existing}
    plan = run.plan()
    todo = [s for s in plan if s.key not in done]
    # a session is recorded when it has episodes to run (a finished run rerun is not one)
    execution = {**execution_info(workers), **backend.info()} if todo or created else None
    prepare_run_dir(run, run_dir, policy, execution)
    manifest = read_manifest(run_dir)
    new_records: list[EpisodeRecord] = []
    successes = sum(r.success for r in existing)
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), disable=not progress, unit="ep", desc=cfg.task)
    outcomes = None
    try:
        outcomes = backend.run_unordered(
            EpisodeWorker, (run, run_dir, video, sent), todo, workers, "episodes", on_crash=crashed_episode
        )
        for spec, outcome in outcomes:
            record = EpisodeRecord(
                run_id=manifest["run_id"],
                task=cfg.task,
                task_version=run.task.version,
                split=cfg.split,
                difficulty=cfg.difficulty,
                episode_index=spec.episode_index,
                episode_key=spec.key,
                seed=spec.seed("scene"),
                policy=cfg.policy,
                policy_options=dict(cfg.policy_options),
                **outcome.fields(),
            )
            _append(store, record, len(existing) + len(new_records))
            new_records.append(record)
            successes += record.success
            bar.update(1)
            bar.set_postfix(success=f"{successes / (len(existing) + len(new_records)):.0%}")
    except BaseException:
        if outcomes is not None:  # stop the simulators now, not when the traceback is let go
            with contextlib.suppress(Exception):
                outcomes.close()
        if created and not existing and not new_records:
            _unclaim(run_dir)
        raise
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
