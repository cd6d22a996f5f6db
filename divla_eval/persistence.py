"""Do a run's successes last once the robot stops?

A task declares success on the first step whose state passes its check (the cube between the box's
walls, the pot within 20 degrees of upright, slower than 5 cm/s), and the episode ends there. A
state can pass while it is still changing: a pot pushed upright is judged while it still turns. To
show that such successes are real, `check_run` re-runs each successful episode of a run directory
(episodes are deterministic for a run seed), then freezes the robot for `hold` steps (no motion,
each gripper as it is, so a held object stays held) and judges the task again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from divla_eval.errors import DivlaEvalError

HOLD_STEPS = 40  # 2 s at the 20 Hz control rate


@dataclass(frozen=True)
class Persistence:
    episode_key: str
    recorded_steps: int
    rerun_steps: int
    reproduced: bool
    """The re-run succeeded too, at the recorded step."""
    persists: bool
    """Still a success after the frozen steps."""


def frozen_action(action_dim: int) -> np.ndarray:
    """No translation or rotation for any arm, and a zero gripper command. robosuite's Panda gripper
    moves its fingers' target by sign(command) x 0.2 per step, so 0 keeps each gripper as it is: a held
    object stays held. (Repeating the last command instead would keep closing a hand that was closing,
    which grasped an upright pot in two of OpenVLA's flips and turned them into failures.)"""
    return np.zeros(action_dim)


def check_run(run_dir: Path, hold: int = HOLD_STEPS, progress: bool = True) -> list[Persistence]:
    """Re-run the successful episodes of `run_dir` and judge each again after `hold` frozen steps."""
    from tqdm import tqdm

    from divla_eval.records import EpisodeStore, read_manifest
    from divla_eval.runner import EpisodeWorker, RunConfig, run_episode

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise DivlaEvalError(f"{run_dir} is not a run directory (no manifest.json)")
    if "task" not in manifest["config"]:  # read_manifest checked a run's config field by field
        raise DivlaEvalError(f"{run_dir}/manifest.json is not a run's manifest (its config names no task)")
    run = RunConfig.from_dict(manifest["config"]).resolve()
    wins = {r.episode_key: r for r in EpisodeStore(run_dir / "episodes.jsonl").load() if r.success}
    specs = [s for s in run.plan() if s.key in wins]
    worker = EpisodeWorker(run, run_dir, video=False)
    frozen = frozen_action(worker.env.action_space.shape[0])
    results = []
    try:
        for spec in tqdm(specs, disable=not progress, unit="ep", desc="re-run"):
            outcome = run_episode(worker.env, spec, worker.policy)
            held = outcome.success
            for _ in range(hold):
                held = worker.env.advance(frozen).success
            recorded = wins[spec.key].steps
            results.append(
                Persistence(
                    episode_key=spec.key,
                    recorded_steps=recorded,
                    rerun_steps=outcome.steps,
                    reproduced=outcome.success and outcome.steps == recorded,
                    persists=outcome.success and held,
                )
            )
    finally:
        worker.close()
    return results
