"""Turn a run directory into ``report.md``, ``success.png`` and ``report.html``.

The report is rebuilt from ``episodes.jsonl`` alone (plus the manifest for context), so it can be made
at any time, including for a run that is still going or was interrupted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from divla_eval.errors import DivlaEvalError
from divla_eval.metrics import (
    failure_modes,
    mcnemar_exact,
    per_instruction_table,
    per_object_table,
    perturbation_drops,
    records_frame,
    success_table,
    wilson_interval,
)
from divla_eval.records import EpisodeRecord, EpisodeStore, read_manifest
from divla_eval.safe_io import check_output_file, require_dir, save_figure, write_text

GROUP_COLUMNS = ["task", "split", "perturbation", "policy"]


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table (numbers right-aligned) without pandas' optional tabulate dependency."""
    header = [str(c) for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if num else ":---" for num in numeric) + "|",
    ]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def rate_text(successes: int, n: int) -> str:
    """``k/n = rate [Wilson 95% CI]``, the cell text of the comparison and paper tables."""
    lo, hi = wilson_interval(successes, n)
    return f"{successes}/{n} = {_pct(successes / n)} [{_pct(lo)}-{_pct(hi)}]"


def parse_rate_text(text: str) -> tuple[int, int] | None:
    """(successes, n) from a cell that starts with `rate_text`'s ``k/n = ``; None for any other cell
    (``-``, ``not run``)."""
    match = re.match(r"(\d+)/(\d+) = ", str(text))
    return (int(match[1]), int(match[2])) if match and int(match[2]) > 0 else None


def _rates_for_display(table: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    out = table[list(by)].copy()
    out["n"] = table["n"]
    out["successes"] = table["successes"]
    out["success rate"] = [_pct(r) for r in table["success_rate"]]
    out["95% CI"] = [f"{_pct(lo)} - {_pct(hi)}" for lo, hi in zip(table["ci_low"], table["ci_high"])]
    out["errors"] = table["errors"]
    return out


def _config_bullets(manifest: dict | None) -> list[str]:
    if manifest is None:
        return ["- (no manifest.json in this run directory)"]
    bullets = []
    for key, value in sorted((manifest.get("config") or {}).items()):
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        bullets.append(f"- {key}: `{text if len(text) <= 80 else text[:77] + '...'}`")
    # The runner stores environment_info() under "environment"; accept it at top level too.
    env = manifest.get("environment") or (manifest if "git_commit" in manifest else {})
    if isinstance(env, dict) and env:
        commit = env.get("git_commit")
        dirty = " (dirty)" if env.get("dirty") else ""
        bullets.append(f"- git commit: `{commit or 'unknown'}`{dirty}")
        packages = env.get("packages") or {}
        pinned = ", ".join(f"{k} {v}" for k, v in sorted(packages.items()) if v)
        if pinned:
            bullets.append(f"- packages: {pinned}")
    return bullets or ["- (empty config)"]


def _timing_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per-policy timing. Latency mean is weighted by call count; p95 is the worst episode's p95."""
    rows = []
    for policy, g in df.groupby("policy", sort=True):
        calls = g["latency_n"].astype(float)
        means = pd.to_numeric(g["latency_mean_ms"], errors="coerce")
        has = means.notna() & (calls > 0)
        lat_mean = float((means[has] * calls[has]).sum() / calls[has].sum()) if has.any() else float("nan")
        p95 = pd.to_numeric(g["latency_p95_ms"], errors="coerce")
        rows.append(
            {
                "policy": policy,
                "episodes": len(g),
                "mean wall time per episode (s)": float(g["wall_time_s"].mean()),
                "mean steps": float(g["steps"].mean()),
                "policy calls": int(calls.sum()),
                "mean latency (ms)": lat_mean,
                "worst episode p95 (ms)": float(p95.max()) if p95.notna().any() else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def _plot_success(table: pd.DataFrame, by: Sequence[str], path: Path) -> None:
    """Bar chart of success rate per group with Wilson 95% CI error bars."""
    import matplotlib

    matplotlib.use("Agg")  # headless machines; must precede the pyplot import
    import matplotlib.pyplot as plt

    # Label bars only by the grouping columns that actually vary, so labels stay readable.
    varying = [c for c in by if table[c].astype(str).nunique() > 1] or list(by[-1:])
    labels = [" / ".join(_cell(row[c]) for c in varying) for _, row in table.iterrows()]
    rates = table["success_rate"].fillna(0.0).to_numpy()
    yerr = [
        (rates - table["ci_low"].to_numpy()).clip(min=0),
        (table["ci_high"].to_numpy() - rates).clip(min=0),
    ]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(labels) + 2.0), 4.5))
    try:
        x = range(len(labels))
        ax.bar(x, rates, yerr=yerr, capsize=4, color="tab:blue", ecolor="black")
        ax.set_xticks(
            list(x),
            labels,
            rotation=45 if len(labels) > 3 else 0,
            ha="right" if len(labels) > 3 else "center",
        )
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("success rate")
        ax.set_xlabel(" / ".join(varying))
        ax.set_title("Success rate per group (Wilson 95% CI)")
        fig.tight_layout()
        save_figure(fig, path, dpi=120)  # atomic: a full disk leaves the previous plot, not a 0-byte one
    finally:
        plt.close(fig)


MAX_INSTRUCTION_ROWS = 60  # beyond this a per-instruction table is noise, not information


def drop_table(df: pd.DataFrame) -> pd.DataFrame:
    """Paired drop per perturbation, when the run has matched controls (empty otherwise), for display."""
    drops = perturbation_drops(df)
    if drops.empty:
        return pd.DataFrame()
    return pd.DataFrame(
        {
            "perturbation": drops["perturbation"],
            "pairs": drops["pairs"],
            "control": [_pct(v) for v in drops["control_rate"]],
            "perturbed": [_pct(v) for v in drops["perturbed_rate"]],
            "drop": [_pct(v) for v in drops["drop"]],
            "95% CI (paired bootstrap)": [
                f"{_pct(lo)} - {_pct(hi)}" for lo, hi in zip(drops["drop_ci_low"], drops["drop_ci_high"])
            ],
        }
    )


def _drop_section(shown: pd.DataFrame) -> list[str]:
    if shown.empty:
        return []
    return ["## Drop under perturbation (matched controls)", "", markdown_table(shown), ""]


REASONING_NOTE = (
    "Per policy call, the reasoning phrase against the scripted expert's phrase for the same state "
    "(the expert runs in the shadow; its actions are discarded): `exact` the same phrase, `subtask` "
    "the same first word (which phase), `object` the expert's object named."
)


def reasoning_table(df: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Reasoning accuracy (policy phrase == expert phrase for the same state, per call), split by
    outcome: a failure with right reasoning points at the motion, one with wrong reasoning at the
    language side. Empty when no episode was scored."""
    scored = df[df["reasoning_accuracy"].notna()]
    if scored.empty:
        return pd.DataFrame()
    table = (
        scored.assign(outcome=scored["success"].map({True: "success", False: "failure"}))
        .groupby([*by, "outcome"], dropna=False)
        .agg(
            episodes=("reasoning_accuracy", "size"),
            exact=("reasoning_accuracy", "mean"),
            subtask=("reasoning_subtask", "mean"),
            object=("reasoning_object", "mean"),
        )
        .reset_index()
    )
    for col in ("exact", "subtask", "object"):
        table[col] = [_pct(float(x)) for x in table[col]]
    return table


def _reasoning_section(table: pd.DataFrame) -> list[str]:
    if table.empty:
        return []
    return ["## Reasoning accuracy", "", REASONING_NOTE, "", markdown_table(table), ""]


def load_run(run_dir: Path) -> list[EpisodeRecord]:
    """The finished episode records of one run directory, or a one-line error naming what is wrong
    (no such directory, not a run directory, no finished episode yet)."""
    run_dir = require_dir(Path(run_dir), "run directory")
    episodes_path = run_dir / "episodes.jsonl"
    if not episodes_path.is_file():
        raise DivlaEvalError(f"{run_dir} has no episodes.jsonl: not a run directory")
    records = EpisodeStore(episodes_path).load()
    if not records:
        raise DivlaEvalError(f"{episodes_path} has no finished episodes yet")
    return records


@dataclass
class ReportContent:
    """What `report.md` and `report.html` show, computed once from a run's records: each table as the
    frame both pages render (rates already formatted), empty when the section does not apply."""

    run_dir: Path
    records: list[EpisodeRecord]
    manifest: dict | None
    frame: pd.DataFrame  # records_frame(records)
    by: list[str]
    overall: pd.Series  # success_table(frame, []): n, successes, rate, CI, errors
    summary: str
    success: pd.DataFrame  # per group, for display
    drops: pd.DataFrame
    reasoning: pd.DataFrame
    failure_modes: pd.DataFrame
    per_object: pd.DataFrame
    per_instruction: pd.DataFrame
    timing: pd.DataFrame
    plot_path: Path


def report_content(run_dir: Path) -> ReportContent:
    """Read a run directory and compute every table of its report (and write ``success.png``)."""
    run_dir = Path(run_dir)
    records = load_run(run_dir)
    manifest = read_manifest(run_dir)
    df = records_frame(records)

    # Mixing difficulty levels in one rate would hide what the number means, so split on it when present.
    by = list(GROUP_COLUMNS)
    if df["difficulty"].notna().any():
        by.insert(2, "difficulty")
    table = success_table(df, by)
    o = success_table(df, []).iloc[0]
    plot_path = run_dir / "success.png"
    _plot_success(table, by, plot_path)
    summary = (
        f"{len(df)} episodes, run id(s): {', '.join(sorted(df['run_id'].astype(str).unique()))}. "
        f"Overall success {_pct(o['success_rate'])} ({int(o['successes'])}/{int(o['n'])}, "
        f"95% CI {_pct(o['ci_low'])} - {_pct(o['ci_high'])}); {int(o['errors'])} episode(s) errored "
        "and count as failures."
    )
    modes = failure_modes(df, ["task", "policy"])
    if not modes.empty:
        modes = modes.assign(share=[_pct(s) for s in modes["share"]])
    per_object = (
        _rates_for_display(per_object_table(df), ["object_id"])
        if df["object_id"].nunique() > 1
        else pd.DataFrame()
    )
    per_instruction = (
        _rates_for_display(per_instruction_table(df), ["instruction"])
        if 1 < df["instruction"].nunique() <= MAX_INSTRUCTION_ROWS
        else pd.DataFrame()
    )
    return ReportContent(
        run_dir=run_dir,
        records=records,
        manifest=manifest,
        frame=df,
        by=by,
        overall=o,
        summary=summary,
        success=_rates_for_display(table, by),
        drops=drop_table(df),
        reasoning=reasoning_table(df, by),
        failure_modes=modes,
        per_object=per_object,
        per_instruction=per_instruction,
        timing=_timing_table(df),
        plot_path=plot_path,
    )


def write_report(run_dir: Path, html: bool = True) -> Path:
    """Write ``report.md``, ``success.png`` and (unless `html` is false) the self-contained
    ``report.html`` (see `divla_eval.html_report`) into ``run_dir``; returns the markdown path."""
    content = report_content(run_dir)
    run_dir, df, records = content.run_dir, content.frame, content.records
    lines = [
        f"# divla-eval report: {run_dir.name}",
        "",
        content.summary,
        "",
        "## Run config",
        "",
        *_config_bullets(content.manifest),
        "",
        "## Success rate",
        "",
        markdown_table(content.success),
        "",
        f"![success rate per group]({content.plot_path.name})",
        "",
        *_drop_section(content.drops),
        *_reasoning_section(content.reasoning),
        "## Failure modes",
        "",
    ]
    if content.failure_modes.empty:
        lines.append("No failures.")
    else:
        lines.append(markdown_table(content.failure_modes))
    lines.append("")
    if not content.per_object.empty:
        lines += ["## Per object", "", markdown_table(content.per_object), ""]
    if not content.per_instruction.empty:
        lines += ["## Per instruction", "", markdown_table(content.per_instruction), ""]
    lines += ["## Timing", "", markdown_table(content.timing), ""]
    errors = df[df["status"] == "error"]
    if not errors.empty:
        by_key = {r.episode_key: r for r in records}
        lines += ["## Errored episodes", ""]
        for key in errors["episode_key"].head(20):
            lines.append(f"- `{key}`: {_cell(last_error_line(by_key[key]))}")
        if len(errors) > 20:
            lines.append(f"- ... and {len(errors) - 20} more (see episodes.jsonl)")
        lines.append("")

    report_path = run_dir / "report.md"
    write_text(report_path, "\n".join(lines))
    if html:
        from divla_eval.html_report import write_report_html

        write_report_html(content)
    return report_path


def last_error_line(record: EpisodeRecord) -> str:
    """The last line of an errored episode's traceback (the exception), or a placeholder."""
    last = (record.error or "").strip().splitlines()[-1:]
    return last[0] if last else "(no traceback recorded)"


# A table row never pools task versions or checkpoints (named folder@content hash): a cell mixing,
# say, a model with and without reasoning injection (both "divla") would report neither.
SUMMARY_ROWS = ["task", "task_version", "split", "difficulty", "policy", "checkpoint"]
VISUAL_COMPOSED = "background:3+camera:3+lighting:3+table:3"


def _short_condition(label: str) -> str:
    return "visual (all four):3" if label == VISUAL_COMPOSED else label


LEFT_OUT = ("archive", "curves")
"""Run directories under a folder of these names are left out of the tables of a folder above (asked
for by name, `divla-eval summary results/archive`, they are shown): results/archive/ holds records of
models that are no longer shipped, so their runs can be neither reproduced nor extended; results/curves/
holds a learning curve's snapshots, intermediate models on a small grid, whose table is the curve's own
curve.md (a final model gets its own run directories, as every other row)."""


def load_runs(root: Path) -> tuple[pd.DataFrame, list[Path]]:
    """Every finished episode of every run directory under `root` (found by their episodes.jsonl),
    except those in an `archive` or `curves` folder below `root` (`LEFT_OUT`).

    An episode that two runs share (the same episode key and scene seed, task version, policy and
    checkpoint, e.g. a matched control run twice) is counted once, so overlapping runs cannot inflate
    n. The same episode under another task version is another experiment and is kept; so is the same
    episode name under another run seed (another scene), whose checkpoint label then says its seed, so
    that it is a row of its own rather than pooled with the seed-0 scenes.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DivlaEvalError(
            f"{root} is a file, not a directory (give the folder that holds run directories)"
        )
    if not root.is_dir():
        raise DivlaEvalError(f"{root} is not a directory: it does not exist")
    run_dirs = sorted(
        p.parent
        for p in root.rglob("episodes.jsonl")
        if not set(LEFT_OUT) & set(p.relative_to(root).parts[:-1])
    )
    if not run_dirs:
        raise DivlaEvalError(f"no run directories (with episodes.jsonl) under {root}")
    frames = [
        records_frame(EpisodeStore(d / "episodes.jsonl").load()).assign(checkpoint=_checkpoint_label(d))
        for d in run_dirs
    ]
    frames = [f for f in frames if not f.empty]
    if not frames:
        raise DivlaEvalError(f"the runs under {root} have no finished episodes yet")
    df = pd.concat(frames, ignore_index=True)
    df = df.drop_duplicates(
        subset=["episode_key", "seed", "task_version", "policy", "checkpoint_hash"], keep="first"
    )
    # A folder name is not an identity: the shipped checkpoint folder was overwritten by a retrained
    # model, and runs of both would share a row. The content hash tells them apart.
    hashes = df["checkpoint_hash"]
    df["checkpoint"] = [
        f"{name}@{h[:8]}" if isinstance(h, str) and h else name for name, h in zip(df["checkpoint"], hashes)
    ]
    return df.reset_index(drop=True), run_dirs


def compare_runs(run_a: Path, run_b: Path) -> str:
    """Markdown: two runs on the same episodes (same task, split, difficulty, perturbation and
    episode index, e.g. two checkpoints or two inference settings), paired per episode, with each
    run's rate and Wilson CI and the exact McNemar p-value of the difference."""
    frames = {}
    for run in (run_a, run_b):
        frame = records_frame(load_run(run))
        frames[run] = frame.assign(difficulty=frame["difficulty"].fillna("-"))
    # the scene's seed too: the same index under another run seed is another scene, not a pair
    key = ["task", "split", "difficulty", "perturbation", "episode_index", "seed"]
    a, b = (frames[r][key + ["success"]].drop_duplicates(key) for r in (run_a, run_b))
    paired = a.merge(b, on=key, suffixes=("_a", "_b"))
    if paired.empty:
        conditions = {r: sorted(set(map(tuple, f[key[:4]].values.tolist()))) for r, f in frames.items()}
        raise DivlaEvalError(
            "the two runs share no episode (task, split, difficulty, perturbation, episode index and its "
            "scene seed: runs with another --seed are other scenes): "
            + "; ".join(f"{r} has {c}" for r, c in conditions.items())
        )
    rows = []
    for cond, g in paired.groupby(key[:4], sort=True):
        sa, sb = int(g["success_a"].sum()), int(g["success_b"].sum())
        only_a = int((g["success_a"] & ~g["success_b"]).sum())
        only_b = int((g["success_b"] & ~g["success_a"]).sum())
        n = len(g)
        rows.append(
            {
                "task": cond[0],
                "split": cond[1],
                "difficulty": cond[2],
                "perturbation": cond[3],
                "paired episodes": n,
                "A": rate_text(sa, n),
                "B": rate_text(sb, n),
                "both": int((g["success_a"] & g["success_b"]).sum()),
                "only A": only_a,
                "only B": only_b,
                "McNemar p": f"{mcnemar_exact(only_a, only_b):.3g}",
            }
        )
    lines = [f"A: `{run_a}`", f"B: `{run_b}`", "", markdown_table(pd.DataFrame(rows)), ""]
    va, vb = (
        ", ".join(sorted(set(frames[r]["task_version"].dropna().astype(str)))) or "-" for r in (run_a, run_b)
    )
    if va != vb:  # paired by scene; whether the split's rules changed is for the reader
        lines.append(
            f"Task versions differ (A: {va}; B: {vb}): "
            "the pairs are the same scenes, but a split whose success rule changed between the versions "
            "is not a like-for-like comparison."
        )
        lines.append("")
    return "\n".join(lines)


def _checkpoint_label(run_dir: Path) -> str:
    """The evaluated checkpoint's folder name from the run's manifest ("-": none, e.g. scripted; a
    learning curve's snapshot with its training run's name), with the run seed when it is not 0 (other
    scenes: another row)."""
    config = (read_manifest(run_dir) or {}).get("config") or {}
    checkpoint, seed = config.get("checkpoint"), config.get("seed", 0)
    name = "-"
    if checkpoint:
        path = Path(checkpoint)
        name = f"{path.parent.parent.name}/{path.name}" if path.parent.name == "snapshots" else path.name
    return name if not seed else f"{name} (seed {seed})"


def summary_tables(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(long, grid): one row per task x split x difficulty x policy x perturbation with n, rate, CI
    and mean partial score; and the same as a grid with one column per perturbation condition."""
    work = df.assign(difficulty=df["difficulty"].fillna("-"), task_version=df["task_version"].fillna("-"))
    by = SUMMARY_ROWS + ["perturbation"]
    long = success_table(work, by)
    means = work.groupby(by, dropna=False).agg(partial=("partial_score", "mean"), steps=("steps", "mean"))
    long = long.merge(means.reset_index(), on=by)
    cells = [
        f"{_pct(r.success_rate)} [{_pct(r.ci_low)}-{_pct(r.ci_high)}] n={r.n}" for r in long.itertuples()
    ]
    grid = long.assign(cell=cells, perturbation=long["perturbation"].map(_short_condition))
    grid = grid.pivot(index=SUMMARY_ROWS, columns="perturbation", values="cell")
    first = [c for c in ("none", "distractors:3") if c in grid.columns]
    grid = grid[first + sorted(c for c in grid.columns if c not in first)].fillna("-")
    return long, grid.reset_index()


def write_summary(root: Path, out: Path | None = None) -> Path:
    """Write one markdown file with the success grid over every run under `root`."""
    if out is not None:  # a directory or an unwritable folder is refused before the runs are read
        check_output_file(Path(out), "--out")
    out = Path(out) if out is not None else Path(root) / "summary.md"
    df, run_dirs = load_runs(root)
    long, grid = summary_tables(df)
    below = long[long["success_rate"] < 0.95]
    below_lines = [
        f"- {r.task} (version {r.task_version}) {r.split} {r.difficulty} {r.policy} {r.checkpoint} "
        f"{_short_condition(r.perturbation)}: "
        f"{_pct(r.success_rate)} ({r.successes}/{r.n})"
        for r in below.itertuples()
    ]
    lines = [
        f"# divla-eval summary: {Path(root)}",
        "",
        f"{len(df)} episodes from {len(run_dirs)} run directories. Cells: success rate, Wilson 95% CI,"
        " episodes. Rebuild with `divla-eval summary " + str(root) + "`.",
        "",
        "## Success by condition",
        "",
        markdown_table(grid),
        "",
        "## Every cell",
        "",
        markdown_table(
            long.assign(
                perturbation=long["perturbation"].map(_short_condition),
                success_rate=[_pct(x) for x in long["success_rate"]],
                ci=[f"{_pct(lo)}-{_pct(hi)}" for lo, hi in zip(long["ci_low"], long["ci_high"])],
                partial=long["partial"].round(3),
                steps=long["steps"].round(0),
            )[
                SUMMARY_ROWS
                + ["perturbation", "n", "successes", "errors", "success_rate", "ci", "partial", "steps"]
            ]
        ),
        "",
        f"Cells below 95% success: {len(below)}.",
        "",
        *below_lines,
        *([""] if below_lines else []),
        "## Run directories",
        "",
        *[f"- `{d}`" for d in run_dirs],
        "",
    ]
    write_text(out, "\n".join(lines))
    return out
