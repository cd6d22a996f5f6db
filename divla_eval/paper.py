"""The paper's result tables (arXiv 2412.03293), rebuilt from whatever runs exist under a folder.

`divla-eval summary` lists every cell of every run; this view answers the paper's questions instead:
one table per experiment, one row per policy and checkpoint, one column per condition the paper
reports, and an explicit "not run" for each paper policy that has no episodes there yet, so a
missing baseline can never pass for a finished table. Only runs with a policy's default inference
options enter (a run with, say, 5 DDIM steps is a trade-off measurement, not the policy's entry).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from divla_eval.metrics import success_table
from divla_eval.report import load_runs, markdown_table, rate_text
from divla_eval.safe_io import check_output_file, write_text
from divla_eval.tasks.multitask import SUBTASKS as MULTITASK_SUBTASKS

# The policies of the paper's comparisons (DiVLA without reasoning injection is TinyVLA's design; its
# rows are the divla checkpoints trained with reasoning_injection=false), plus the two bounds.
PAPER_POLICIES = ("divla", "diffusion_policy", "openvla", "octo", "scripted", "random")


@dataclass(frozen=True)
class Column:
    """One condition of a table: the episodes of `task` whose split, difficulty and perturbation
    match. `pool` lists several splits whose episodes are counted together (the paper's averages)."""

    label: str
    split: str | None = None
    difficulty: str = "-"
    perturbation: str = "none"
    pool: tuple[str, ...] = ()


@dataclass(frozen=True)
class PaperTable:
    title: str
    task: str
    columns: tuple[Column, ...]
    note: str = ""
    # tasks scored per object also show the mean fraction of objects done (the task's partial
    # score, an errored episode counting 0): at small scale a policy can sort some objects of every
    # scene and still finish none, and the success rate alone would hide that.
    partial: str = ""


def _multitask_columns(perturbation: str) -> tuple[Column, ...]:
    per_task = tuple(Column(s, split=s, perturbation=perturbation) for s in MULTITASK_SUBTASKS)
    return per_task + (Column("average", perturbation=perturbation, pool=MULTITASK_SUBTASKS),)


PAPER_TABLES: tuple[PaperTable, ...] = (
    PaperTable(
        "Multi-task (five Franka tasks, in distribution)",
        "multitask",
        _multitask_columns("none"),
        note="average = the five sub-tasks' episodes pooled; shown only when every sub-task has episodes",
    ),
    PaperTable(
        "Multi-task, visual generalisation (average over the five sub-tasks)",
        "multitask",
        tuple(
            Column(label, perturbation=p, pool=MULTITASK_SUBTASKS)
            for label, p in (
                ("in distribution", "none"),
                ("distractors", "distractors:3"),
                ("background", "background:3"),
                ("lighting", "lighting:3"),
            )
        ),
        note="each cell pools the five sub-tasks and is shown only when all five have episodes",
    ),
    PaperTable(
        "Zero-shot bin picking (102 unseen objects)",
        "bin_picking",
        (
            Column("unseen", split="unseen"),
            Column("seen (training objects)", split="seen"),
        ),
    ),
    PaperTable(
        "Factory sorting",
        "sorting",
        tuple(
            Column(f"{d} {s}", split=s, difficulty=d)
            for d in ("easy", "hard")
            for s in ("seen", "unseen", "mixed")
        ),
        note="after each rate: the mean fraction of a scene's objects sorted into the right bin",
        partial="sorted",
    ),
    PaperTable(
        "Bimanual table bussing",
        "bussing",
        (Column("seen", split="seen"), Column("mixed", split="mixed")),
        note="after each rate: the mean fraction of a scene's items put where they belong",
        partial="done",
    ),
    PaperTable(
        "Novel multi-step instructions (held out)",
        "novel_instruction",
        (Column("novel", split="novel"),),
    ),
)


def _cell(episodes: pd.DataFrame, column: Column, partial: str = "") -> str:
    rows = episodes[
        (episodes["difficulty"] == column.difficulty) & (episodes["perturbation"] == column.perturbation)
    ]
    if column.pool:
        rows = rows[rows["split"].isin(column.pool)]
        if set(rows["split"]) != set(column.pool):
            return "-"
    else:
        rows = rows[rows["split"] == column.split]
    if rows.empty:
        return "-"
    counts = success_table(rows, []).iloc[0]  # an errored episode is a failure, as everywhere
    text = rate_text(int(counts["successes"]), int(counts["n"]))
    if partial:
        done = rows["partial_score"].where(rows["status"] != "error", 0.0).mean()
        text += f"; {done:.0%} {partial}"
    return text


def paper_tables(df: pd.DataFrame) -> list[tuple[PaperTable, pd.DataFrame]]:
    """Each paper table as a frame: policy, checkpoint, task version, then one column per condition."""
    work = df.assign(difficulty=df["difficulty"].fillna("-"), task_version=df["task_version"].fillna("-"))
    work = work[work["policy"].isin(PAPER_POLICIES)]  # default inference options only
    out = []
    for table in PAPER_TABLES:
        episodes = work[work["task"] == table.task]
        rows = []
        for (policy, checkpoint, version), group in episodes.groupby(
            ["policy", "checkpoint", "task_version"], sort=True
        ):
            cells = {c.label: _cell(group, c, table.partial) for c in table.columns}
            if any(v != "-" for v in cells.values()):
                rows.append({"policy": policy, "checkpoint": checkpoint, "task version": version, **cells})
        present = {r["policy"] for r in rows}
        for policy in PAPER_POLICIES:
            if policy not in present:
                rows.append(
                    {"policy": policy, "checkpoint": "not run", "task version": "-"}
                    | {c.label: "-" for c in table.columns}
                )
        order = {p: i for i, p in enumerate(PAPER_POLICIES)}
        rows.sort(key=lambda r: (order[r["policy"]], r["checkpoint"] == "not run", r["checkpoint"]))
        out.append((table, pd.DataFrame(rows)))
    return out


def write_paper_tables(root: Path, out: Path | None = None, html: bool = True) -> Path:
    """Write the paper's tables over every run under `root` as one markdown file and (unless `html`
    is false) the same as a self-contained HTML page beside it, with a plot per table and a link to
    each run directory's report (`html_report.tables_html_path`: ROOT/paper_tables.html by default)."""
    if out is not None:  # a directory or an unwritable folder is refused before the runs are read
        check_output_file(Path(out), "--out")
    df, run_dirs = load_runs(root)
    out = Path(out) if out is not None else Path(root) / "paper_tables.md"
    title = f"The paper's tables, from the runs under {Path(root)}"
    intro = (
        f"Rebuild with `divla-eval tables {root}` ({len(run_dirs)} run directories)."
        " Cells: successes/episodes"
        " = rate [Wilson 95% CI]; `-`: no episodes of that condition yet. Checkpoints are named"
        " folder@content hash; divla checkpoints whose name ends in `-noinj` were trained without"
        " reasoning injection (TinyVLA's design). Policies run with non-default inference options are"
        " left out here (see `summary.md`)."
    )
    lines = [f"# {title}", "", intro, ""]
    tables = paper_tables(df)
    for table, frame in tables:
        lines += [f"## {table.title}", "", markdown_table(frame), ""]
        if table.note:
            lines += [f"{table.note[0].upper()}{table.note[1:]}.", ""]
    speed = [(p, _first_line(p, "Command: ")) for p in sorted(Path(root).rglob("speed.md")) if p.is_file()]
    lines += ["## Inference speed", ""]
    lines += [f"- `{p}`: {command}" for p, command in speed] or ["- no `divla-eval bench` output yet"]
    write_text(out, "\n".join(lines) + "\n")  # atomic: a full disk keeps the previous tables
    if html:
        from divla_eval.html_report import tables_html_path, write_tables_html

        write_tables_html(tables_html_path(out), title, intro.replace("`", ""), tables, run_dirs, speed)
    return out


def _first_line(path: Path, prefix: str) -> str:
    """The line of a bench table file that starts with `prefix` (its command), without the prefix.
    An unreadable or garbled file costs its line, not the tables."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(unreadable: {exc.strerror or exc})"
    for line in text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :]
    return "(no command line)"
