"""The Python API: `divla_eval.evaluate(policy, task=...)`, the `divla-eval run` of a script or notebook.

It goes through the same runner as the command line (same plan, seeds, records and resume), so a
number from either is the same number. `policy` may be an object, which the command line cannot take:
a researcher's policy is evaluated without registering it anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from divla_eval.records import EpisodeRecord


@dataclass(frozen=True)
class EvaluationResult:
    """What `evaluate` returns: the run's records (resumed ones included) and their success rate."""

    run_dir: Path
    """Where the manifest and episodes.jsonl lie (`divla-eval report RUN_DIR` writes the report)."""
    policy: str
    """The name the records carry: as given, or a policy object's `metadata.name`."""
    records: list[EpisodeRecord]
    episodes: int
    successes: int
    errors: int
    """Episodes that ended in an exception (counted as failures, with their traceback in the record)."""
    ran: int
    """Episodes run by this call; the others were already in `run_dir` (resumed)."""
    success_rate: float
    ci95: tuple[float, float]
    """Wilson 95% interval of the success rate."""

    def __str__(self) -> str:
        lo, hi = self.ci95
        return (
            f"{self.policy}: success {self.successes}/{self.episodes} = {self.success_rate:.1%} "
            f"(95% CI {lo:.1%}-{hi:.1%}), errors {self.errors}; {self.run_dir}"
        )


def evaluate(
    policy: Any,
    task: str = "bin_picking",
    split: str | None = None,
    episodes: int | None = None,
    seed: int = 0,
    workers: int = 1,
    out: str | Path | None = None,
    checkpoint: str | Path | None = None,
    policy_options: dict | None = None,
    progress: bool = False,
    *,
    difficulty: str | None = None,
    perturbations: tuple = (),
    task_options: dict | None = None,
    max_steps: int | None = None,
    image_size: int = 84,
    matched_control: bool = False,
    threads: int | None = None,
    video: bool = False,
    device: str = "auto",
) -> EvaluationResult:
    """Evaluate `policy` on `task` as `divla-eval run` does, and return the records and success rate.

    `policy`: a registered name (`divla-eval list policies`), a `"package.module:factory"` path, or a
    policy object (see `divla_eval.policy.Policy`; its records carry `policy.metadata.name`).
    `checkpoint` and `policy_options` are for names only: an object comes already built.
    With `workers` > 1 an object is pickled (cloudpickle) and each worker process gets its own copy;
    a script must then start the run under `if __name__ == "__main__":`, which is checked before any
    worker starts. `split`: None takes the task's `default_split` ("unseen" where the task has it,
    else its first split).
    `difficulty`: None takes the task's first. `perturbations`: ("lighting", 3) pairs or "lighting:3".
    `device`: where a learned policy runs (auto: CUDA when present); see `divla_eval.device`.
    `out`: None writes into a new temporary directory, which is kept (`result.run_dir`); an existing
    run directory of the same config resumes, as on the command line.
    """
    import tempfile

    from divla_eval.errors import DivlaEvalError
    from divla_eval.metrics import wilson_interval
    from divla_eval.runner import Run, RunConfig, run
    from divla_eval.tasks import get_task, parse_task_options

    if not isinstance(workers, int) or workers < 1:
        raise DivlaEvalError(f"workers must be a positive integer, got {workers!r}")
    if workers > 1:
        from divla_eval.parallel import check_spawn_safe

        check_spawn_safe()  # before anything is written, even a temporary directory
    if isinstance(policy, str):
        name, obj = policy, None
    elif isinstance(policy, type):
        raise DivlaEvalError(
            f"policy={policy.__name__} is a class: pass an instance, or its import path as a string "
            f"('{policy.__module__}:{policy.__qualname__}') to have it built as factory(action_dim=...)"
        )
    else:
        from divla_eval.policy import check_policy

        obj = check_policy(policy, "the object given as policy")
        name = obj.metadata.name
    task_options = parse_task_options(task, dict(task_options or {}))
    spec = get_task(task, **task_options)
    if split is None:
        split = spec.default_split
    options: dict = {}
    if policy_options:
        if obj is not None:
            options = dict(policy_options)  # refused by the runner's check, with the reason
        else:
            from divla_eval.policy import parse_policy_options

            options = parse_policy_options(name, dict(policy_options))
    cfg = RunConfig(
        task=task,
        split=split,
        policy=name,
        episodes=episodes,
        seed=seed,
        difficulty=difficulty if difficulty is not None else spec.difficulties[0],
        perturbations=tuple(_perturbation(p) for p in perturbations),
        checkpoint=None if checkpoint is None else str(checkpoint),
        image_size=image_size,
        max_steps=max_steps,
        task_options=task_options,
        matched_control=matched_control,
        policy_options=options,
    )
    run_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix=f"divla-eval-{task}-"))
    summary = run(
        Run.resolve(cfg, spec),  # the task built above, not a second time
        run_dir,
        progress=progress,
        video=video,
        workers=workers,
        threads=threads,
        policy=obj,
        device=device,
    )
    n = len(summary.records)
    k = sum(r.success for r in summary.records)
    return EvaluationResult(
        run_dir=run_dir,
        policy=name,
        records=summary.records,
        episodes=n,
        successes=k,
        errors=sum(r.status == "error" for r in summary.records),
        ran=summary.ran,
        success_rate=k / n if n else 0.0,
        ci95=wilson_interval(k, n),
    )


def _perturbation(p) -> tuple[str, int]:
    """("lighting", 3) or "lighting:3" (level 1 when none is given), as `--perturb` takes it."""
    from divla_eval.errors import DivlaEvalError

    if isinstance(p, str):
        name, _, level = p.partition(":")
        p = (name, level or 1)
    try:
        name, level = p
        return str(name), int(level)
    except (TypeError, ValueError):
        raise DivlaEvalError(f"perturbation {p!r}: expected (name, level) or 'name:level'") from None
