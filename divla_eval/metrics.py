"""Success rates with Wilson 95% intervals, failure-mode counts and per-object tables.

Every planned episode counts: an episode that crashed (status "error") is a failure and stays in n, so a
policy cannot look better by crashing on its hard cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from divla_eval.reasoning import reasoning_scores
from divla_eval.records import EpisodeRecord, policy_label

RATE_COLUMNS = ["n", "successes", "success_rate", "ci_low", "ci_high", "errors"]
FRAME_COLUMNS = [
    "run_id",
    "task",
    "task_version",
    "split",
    "difficulty",
    "episode_index",
    "episode_key",
    "seed",
    "policy",
    "checkpoint_hash",
    "success",
    "partial_score",
    "failure_mode",
    "status",
    "steps",
    "wall_time_s",
    "latency_n",
    "latency_mean_ms",
    "latency_p95_ms",
    "reasoning_accuracy",
    "reasoning_subtask",
    "reasoning_object",
    "perturbation",
    "object_id",
    "instruction",
]


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval; unlike the normal approximation it stays sensible at 0/n and n/n."""
    if n == 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must lie in [0, n={n}]")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test (p = 1/2) on the discordant pairs, the
    episodes that exactly one of two policies solved. The right test for two runs on the same
    episodes, where a comparison of two independent success rates would throw away the pairing."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def _format_level(level: object) -> str:
    if isinstance(level, float) and level.is_integer():
        return str(int(level))
    return str(level)


def perturbation_label(perturbations: list[dict]) -> str:
    """Short, order-independent group label such as ``lighting:2+distractors:1`` (or ``none``)."""
    if not perturbations:
        return "none"
    parts = []
    for p in perturbations:
        name = str(p.get("name", "?"))
        parts.append(f"{name}:{_format_level(p['level'])}" if p.get("level") is not None else name)
    return "+".join(sorted(parts))


def records_frame(records: Sequence[EpisodeRecord]) -> pd.DataFrame:
    """One row per episode with the columns the tables group and aggregate on."""
    rows = []
    for r in records:
        lat = r.latency_ms or {}
        scores = (
            r.reasoning_scores or reasoning_scores(r.reasoning_trace) or {}
        )  # older records: from the trace
        rows.append(
            {
                "run_id": r.run_id,
                "task": r.task,
                "task_version": r.task_version,
                "split": r.split,
                "difficulty": r.difficulty,
                "episode_index": r.episode_index,
                "episode_key": r.episode_key,
                "seed": r.seed,
                # a policy run with other inference options is another row of every table
                "policy": policy_label(r.policy, r.policy_options),
                "checkpoint_hash": r.checkpoint_hash,
                "success": bool(r.success),
                "partial_score": float(r.partial_score),
                "failure_mode": r.failure_mode,
                "status": r.status,
                "steps": int(r.steps),
                "wall_time_s": float(r.wall_time_s),
                "latency_n": int(lat.get("n", 0) or 0),
                "latency_mean_ms": lat.get("mean"),
                "latency_p95_ms": lat.get("p95"),
                "reasoning_accuracy": scores.get("exact"),
                "reasoning_subtask": scores.get("subtask"),
                "reasoning_object": scores.get("object"),
                "perturbation": perturbation_label(r.perturbations),
                "object_id": r.object_ids[0] if r.object_ids else "",
                "instruction": r.instruction,
            }
        )
    return pd.DataFrame(rows, columns=FRAME_COLUMNS)


def _counted(df: pd.DataFrame) -> pd.DataFrame:
    """Add the 0/1 columns we sum: a success only counts when the episode did not error."""
    errored = df["status"] == "error"
    return df.assign(_success=(df["success"].astype(bool) & ~errored).astype(int), _error=errored.astype(int))


def success_table(df: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Per-group n, successes, rate, Wilson 95% CI and error count (errors are failures, kept in n)."""
    by = list(by)
    work = _counted(df)
    if by:
        grouped = work.groupby(by, dropna=False, sort=True)
        out = grouped.agg(n=("_success", "size"), successes=("_success", "sum"), errors=("_error", "sum"))
        out = out.reset_index()
    else:
        out = pd.DataFrame(
            {"n": [len(work)], "successes": [work["_success"].sum()], "errors": [work["_error"].sum()]}
        )
    out["n"] = out["n"].astype(int)
    out["successes"] = out["successes"].astype(int)
    out["errors"] = out["errors"].astype(int)
    out["success_rate"] = [s / n if n else float("nan") for s, n in zip(out["successes"], out["n"])]
    bounds = [wilson_interval(s, n) for s, n in zip(out["successes"], out["n"])]
    out["ci_low"] = [lo for lo, _ in bounds]
    out["ci_high"] = [hi for _, hi in bounds]
    return out[by + RATE_COLUMNS].reset_index(drop=True)


def failure_modes(df: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Counts of each failure mode among failed episodes, with its share of all episodes in the group.

    An errored episode without a named mode is reported as ``error``, an unnamed failure as ``unknown``,
    so every failure is accounted for.
    """
    by = list(by)
    work = _counted(df)
    failed = work[work["_success"] == 0].copy()
    modes = failed["failure_mode"].astype(object).where(failed["failure_mode"].notna(), None)
    failed["failure_mode"] = [
        m if m is not None else ("error" if s == "error" else "unknown")
        for m, s in zip(modes, failed["status"])
    ]
    columns = by + ["failure_mode", "count", "share"]
    if failed.empty:
        return pd.DataFrame(columns=columns)
    counts = failed.groupby(by + ["failure_mode"], dropna=False).size().rename("count").reset_index()
    if by:
        totals = work.groupby(by, dropna=False).size().rename("_total").reset_index()
        counts = counts.merge(totals, on=by, how="left")
    else:
        counts["_total"] = len(work)
    counts["share"] = counts["count"] / counts["_total"]
    counts = counts.sort_values(by + ["count", "failure_mode"], ascending=[True] * len(by) + [False, True])
    return counts[columns].reset_index(drop=True)


def per_object_table(df: pd.DataFrame) -> pd.DataFrame:
    """Success per object (first object id of each episode), to spot objects a policy never grasps."""
    return success_table(df, ["object_id"])


def perturbation_drops(df: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Success drop of each perturbation against its matched control (`--matched-control`).

    Episodes are paired by (task, split, difficulty, policy, episode_index): the perturbed episode and
    its control share scene and seeds, so the drop is estimated on pairs, with a 95% percentile
    bootstrap interval over pairs (fixed seed, so reports are reproducible). Groups without a control
    are skipped.
    """
    import numpy as np

    keys = ["task", "split", "difficulty", "policy", "episode_index"]
    counted = _counted(df).assign(difficulty=df["difficulty"].fillna("-"))
    control = counted[counted["perturbation"] == "none"].set_index(keys)["_success"]
    rows = []
    for label, group in counted[counted["perturbation"] != "none"].groupby("perturbation", sort=True):
        pert = group.set_index(keys)["_success"]
        common = pert.index.intersection(control.index)
        if len(common) == 0:
            continue
        diff = (control.loc[common].to_numpy() - pert.loc[common].to_numpy()).astype(float)
        rng = np.random.default_rng(seed)
        boot = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
        rows.append(
            {
                "perturbation": label,
                "pairs": len(common),
                "control_rate": float(control.loc[common].mean()),
                "perturbed_rate": float(pert.loc[common].mean()),
                "drop": float(diff.mean()),
                "drop_ci_low": float(np.percentile(boot, 2.5)),
                "drop_ci_high": float(np.percentile(boot, 97.5)),
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "perturbation",
            "pairs",
            "control_rate",
            "perturbed_rate",
            "drop",
            "drop_ci_low",
            "drop_ci_high",
        ],
    )


def per_instruction_table(df: pd.DataFrame) -> pd.DataFrame:
    """Success per instruction text (novel instructions are reported one by one)."""
    return success_table(df, ["instruction"])
