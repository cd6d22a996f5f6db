"""Self-contained HTML pages people can browse: ``report.html`` for a run directory (`divla-eval report`)
and the paper's tables page beside ``paper_tables.md`` (`divla-eval tables`).

Each page is one file that opens offline in a browser, with no server and nothing fetched: the CSS is
inline, plots are embedded as base64 PNG, and episode videos (`run --video`, H.264 MP4 under
``videos/``) are referenced by a path relative to the page. Tables are pandas Stylers that escape their
cells; the page is a jinja2 template with autoescaping, so no text taken from a record (an
instruction, a reasoning phrase, a traceback) can inject markup.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from divla_eval.episode import legacy_video_name, video_name
from divla_eval.metrics import perturbation_label, wilson_interval
from divla_eval.records import EpisodeRecord
from divla_eval.safe_io import write_text

BROWSER_CODECS = ("h264", "vp8", "vp9", "av1")  # what a <video> element plays in current browsers
# Columns of rates, counts and times: right-aligned (their values are strings once formatted).
NUMERIC_COLUMNS = {
    "success rate",
    "95% CI",
    "share",
    "control",
    "perturbed",
    "drop",
    "95% CI (paired bootstrap)",
    "exact",
    "subtask",
    "object",
}


# ----------------------------------------------------------------------------------------- tables


def _display(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _shade(rate: float | None) -> str:
    """A light red (0%) to green (100%) background for a success-rate cell."""
    if rate is None or (isinstance(rate, float) and math.isnan(rate)):
        return ""
    hue = 120 * max(0.0, min(1.0, float(rate)))
    return f"background-color: hsl({hue:.0f}, 65%, 86%)"


class _Tables:
    """Numbers each table of a page, so that the ids pandas gives its cells are unique and stable."""

    def __init__(self):
        self.count = 0

    def __call__(self, df: pd.DataFrame, rates: pd.DataFrame | None = None) -> str:
        """`df` as an HTML table (every cell escaped); `rates`, a frame of the same shape holding a
        success rate (or NaN) per cell, shades those cells. A table of `report._rates_for_display`
        (n, successes, success rate) has its rate cells shaded without being told."""
        self.count += 1
        if rates is None and {"n", "successes", "success rate"} <= set(df.columns):
            rate = [k / n if n else float("nan") for k, n in zip(df["successes"], df["n"])]
            rates = pd.DataFrame({c: rate if c == "success rate" else math.nan for c in df.columns})
        numeric = [
            c in NUMERIC_COLUMNS
            or (pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]))
            for c in df.columns
        ]
        shown = pd.DataFrame(
            {i: [_display(v) for v in df.iloc[:, i]] for i in range(df.shape[1])}, index=range(len(df))
        )
        shown.columns = [str(c) for c in df.columns]
        classes = pd.DataFrame(
            {c: ["num" if num else ""] * len(df) for c, num in zip(shown.columns, numeric)},
            index=shown.index,
        )
        styler = (
            shown.style.hide(axis="index")
            .format(escape="html")
            .format_index(escape="html", axis=1)
            .set_td_classes(classes)
        )
        if rates is not None:
            css = pd.DataFrame(
                [[_shade(v) for v in row] for row in rates.to_numpy().tolist()],
                index=shown.index,
                columns=shown.columns,
            )
            styler = styler.apply(lambda _: css, axis=None)
        return styler.to_html(table_attributes='class="t"', uuid=f"t{self.count}")


# ------------------------------------------------------------------------------------------ plots


def _png(fig) -> str:
    """A matplotlib figure as a data: URI (closed afterwards)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # "tight": with an outside legend
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless machines; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _failure_plot(modes: pd.DataFrame) -> str | None:
    """Horizontal bars: failed episodes per failure mode (per policy when there are several)."""
    if modes.empty:
        return None
    plt = _pyplot()
    several = modes["policy"].nunique() > 1 or modes["task"].nunique() > 1
    counts = modes.assign(
        label=[
            f"{t} / {p}: {m}" if several else str(m)
            for t, p, m in zip(modes["task"], modes["policy"], modes["failure_mode"])
        ]
    )
    counts = counts.groupby("label", sort=False)["count"].sum()[::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(counts) + 1.2))
    ax.barh(range(len(counts)), counts.to_numpy(), color="tab:red")
    ax.set_yticks(range(len(counts)), list(counts.index))
    ax.set_xlabel("failed episodes")
    ax.set_title("Failure modes")
    return _png(fig)


def _rates_plot(title: str, rows: Sequence[tuple[str, list[tuple[int, int] | None]]], labels: list[str]):
    """Grouped bars: one group per condition, one bar per row (policy and checkpoint), each with its
    Wilson 95% CI; the legend under the plot. None when no cell has episodes."""
    import numpy as np

    rows = [(name, cells) for name, cells in rows if any(c is not None for c in cells)]
    keep = [i for i in range(len(labels)) if any(cells[i] is not None for _, cells in rows)]
    if not rows or not keep:
        return None
    plt = _pyplot()
    colours = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20").colors
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(min(10.5, max(5.0, 0.16 * len(keep) * len(rows) + 2.5)), 3.6))
    x = np.arange(len(keep))
    for j, (name, cells) in enumerate(rows):
        rates, lows, highs = [], [], []
        for i in keep:
            k, n = cells[i] if cells[i] is not None else (0, 0)
            lo, hi = wilson_interval(k, n) if n else (0.0, 0.0)
            rates.append(k / n if n else np.nan)
            lows.append(max(0.0, k / n - lo) if n else 0.0)  # max: float round-off at 0/n and n/n
            highs.append(max(0.0, hi - k / n) if n else 0.0)
        offset = (j - (len(rows) - 1) / 2) * width
        ax.bar(
            x + offset,
            rates,
            width,
            yerr=[lows, highs],
            capsize=2,
            label=name,
            color=colours[j % len(colours)],
        )
    ax.set_xticks(x, [labels[i] for i in keep], fontsize=8 if len(keep) > 4 else 10)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("success rate")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    return _png(fig)


# --------------------------------------------------------------------------------------- episodes


def _trace_rows(trace: Sequence[dict]) -> list[dict]:
    """The reasoning trace with consecutive identical entries (the same phrase and expert phrase at
    successive calls) merged into one row of a step range, first to last call."""
    rows: list[dict] = []
    for entry in trace:
        text, expert, step = entry.get("text", ""), entry.get("expert"), entry.get("step", 0)
        if rows and rows[-1]["text"] == text and rows[-1]["expert"] == expert:
            rows[-1]["last"] = step
            continue
        rows.append({"first": step, "last": step, "text": text, "expert": expert})
    for row in rows:
        row["steps"] = str(row["first"]) if row["first"] == row["last"] else f"{row['first']}-{row['last']}"
        row["match"] = None if row["expert"] is None else row["text"] == row["expert"]
    return rows


def _video_codec(path: Path) -> str | None:
    try:
        import av

        with av.open(str(path)) as container:
            return container.streams.video[0].codec_context.name
    except Exception:  # a truncated or foreign file: linked, not embedded
        return None


def episode_video(run_dir: Path, episode_key: str) -> dict | None:
    """The video of an episode, if `run --video` wrote one: its path relative to the run directory,
    codec, and whether a browser plays it (videos written before H.264 are MPEG-4 Part 2)."""
    for name in (video_name(episode_key), legacy_video_name(episode_key)):
        path = Path(run_dir) / "videos" / name
        if path.is_file():
            codec = _video_codec(path)
            return {
                "src": "videos/" + quote(name),
                "name": name,
                "codec": codec or "unknown",
                "playable": codec in BROWSER_CODECS,
            }
    return None


def _episode(record: EpisodeRecord, run_dir: Path) -> dict:
    if record.status == "error":
        outcome, label = "error", "error"
    elif record.success:
        outcome, label = "success", "success"
    else:
        outcome, label = "failure", record.failure_mode or "failure"
    latency = record.latency_ms or {}
    params = [
        {
            "label": perturbation_label([p]),
            "params": json.dumps({k: v for k, v in p.items() if k not in ("name", "level")}, sort_keys=True),
        }
        for p in record.perturbations
    ]
    return {
        "key": record.episode_key,
        "index": record.episode_index,
        "outcome": outcome,
        "label": label,
        "objects": ", ".join(record.object_ids) or "-",
        "instruction": record.instruction or "-",
        "perturbations": params,
        "policy": record.policy,
        "steps": record.steps,
        "partial": f"{record.partial_score:.2f}",
        "wall": f"{record.wall_time_s:.1f} s",
        "latency": (
            f"{latency.get('n', 0)} calls, mean {latency['mean']:.1f} ms, p95 {latency.get('p95', 0):.1f} ms"
            if latency.get("mean") is not None
            else "no policy call"
        ),
        "reasoning_accuracy": (
            f"{100 * record.reasoning_accuracy:.0f}%" if record.reasoning_accuracy is not None else None
        ),
        "trace": _trace_rows(record.reasoning_trace),
        "error": record.error,
        "video": episode_video(run_dir, record.episode_key),
    }


# -------------------------------------------------------------------------------------- templates

CSS = """
:root { --fg: #1d2330; --muted: #5b6474; --line: #d8dde6; --ok: #1f7a3a; --bad: #b3261e; --warn: #8a5a00; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 0 auto; max-width: 1200px; padding: 0 20px 60px; }
h1 { font-size: 22px; margin: 22px 0 6px; word-break: break-all; }
h2 { font-size: 18px; margin: 30px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h2, details.episode { scroll-margin-top: 44px; }
p.note, .muted { color: var(--muted); }
nav { position: sticky; top: 0; background: #fff; padding: 6px 0; border-bottom: 1px solid var(--line);
      z-index: 1; }
nav a { margin-right: 14px; color: #1a56a8; text-decoration: none; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 14px 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; min-width: 150px; }
.card b { display: block; font-size: 22px; }
.card span { color: var(--muted); font-size: 12px; }
table.t { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
table.t th, table.t td { border: 1px solid var(--line); padding: 3px 8px; text-align: left;
                         vertical-align: top; }
table.t th { background: #f2f4f8; }
table.t td.num { text-align: right; white-space: nowrap; }
table.t tbody tr:nth-child(even) td:not([style]) { background: #fafbfd; }
img.plot { max-width: 100%; border: 1px solid var(--line); border-radius: 4px; margin: 6px 0; }
details { margin: 4px 0; }
details > summary { cursor: pointer; }
details.group > summary { font-size: 16px; font-weight: 600; margin: 10px 0; }
details.episode { border: 1px solid var(--line); border-radius: 6px; padding: 4px 10px; }
details.episode[open] { background: #fcfcfe; }
.badge { display: inline-block; min-width: 84px; padding: 0 6px; border-radius: 4px; color: #fff;
         font-size: 12px; text-align: center; margin-right: 8px; }
.success { background: var(--ok); } .failure { background: var(--bad); } .error { background: var(--warn); }
code, pre { font: 12px/1.4 ui-monospace, Menlo, Consolas, monospace; }
pre { background: #f6f7f9; border: 1px solid var(--line); padding: 8px; overflow-x: auto;
      white-space: pre-wrap; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 8px 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; }
table.trace td.hit { color: var(--ok); } table.trace td.miss { color: var(--bad); }
video { display: block; margin: 8px 0; max-width: 100%; background: #000; }
ul.runs li { margin: 2px 0; }
"""

BASE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{{ title }}</title>
<style>{{ css | safe }}</style>
</head>
<body>
{% block body %}{% endblock %}
<p class="note">Written by divla-eval {{ version }}. This page is self-contained: it needs no server
and nothing from the network.</p>
</body>
</html>
"""

REPORT = """{% extends "base" %}{% block body %}
<h1>divla-eval report: {{ name }}</h1>
<p>{{ summary }}</p>
<div class="cards">
  <div class="card"><b>{{ overall.successes }}/{{ overall.n }}</b><span>successes / episodes</span></div>
  <div class="card"><b>{{ overall.rate }}</b><span>success rate</span></div>
  <div class="card"><b>{{ overall.ci }}</b><span>Wilson 95% CI</span></div>
  <div class="card"><b>{{ overall.errors }}</b><span>errored (counted as failures)</span></div>
</div>
<nav>{% for id, label in sections %}<a href="#{{ id }}">{{ label }}</a>{% endfor %}</nav>

<h2 id="success">Success rate</h2>
{{ success | safe }}
<img class="plot" alt="success rate per group with Wilson 95% CI" src="{{ success_plot }}">
{% if drops %}<h2 id="drops">Drop under perturbation (matched controls)</h2>{{ drops | safe }}{% endif %}
{% if reasoning %}<h2 id="reasoning">Reasoning accuracy</h2>
<p class="note">{{ reasoning_note }}</p>{{ reasoning | safe }}{% endif %}

<h2 id="failures">Failure modes</h2>
{% if failures %}{{ failures | safe }}
{% if failure_plot %}<img class="plot" alt="failure modes" src="{{ failure_plot }}">{% endif %}
{% else %}<p>No failures.</p>{% endif %}
{% if per_object %}<h2 id="objects">Per object</h2>
<details{% if n_objects <= 20 %} open{% endif %}><summary>{{ n_objects }} objects</summary>
{{ per_object | safe }}</details>{% endif %}
{% if per_instruction %}<h2 id="instructions">Per instruction</h2>
<details{% if n_instructions <= 20 %} open{% endif %}><summary>{{ n_instructions }} instructions</summary>
{{ per_instruction | safe }}</details>{% endif %}
<h2 id="timing">Timing</h2>
{{ timing | safe }}

<h2 id="episodes">Episodes</h2>
<p class="note">Each episode with its objects, perturbation parameters, the policy's reasoning at each
call (with the scripted expert's phrase for the same state, when scored) and its video when the run
was made with <code>--video</code>.{% if videos == 0 %} This run has no videos.{% endif %}</p>
{% for group in groups %}
<details class="group" id="episodes-{{ group.id }}"{% if group.open %} open{% endif %}>
<summary>{{ group.title }} ({{ group.episodes | length }})</summary>
{% for e in group.episodes %}
<details class="episode" id="ep-{{ e.index }}-{{ loop.index }}">
<summary><span class="badge {{ e.outcome }}">{{ e.label }}</span><code>{{ e.key }}</code>
  <span class="muted">&middot; {{ e.objects }} &middot; {{ e.steps }} steps</span></summary>
<dl class="facts">
  <dt>instruction</dt><dd>{{ e.instruction }}</dd>
  <dt>objects</dt><dd>{{ e.objects }}</dd>
  <dt>policy</dt><dd>{{ e.policy }}</dd>
  <dt>steps</dt><dd>{{ e.steps }} (partial score {{ e.partial }}, wall time {{ e.wall }})</dd>
  <dt>policy calls</dt><dd>{{ e.latency }}</dd>
  {% for p in e.perturbations %}<dt>{{ p.label }}</dt><dd><code>{{ p.params }}</code></dd>{% endfor %}
  {% if e.reasoning_accuracy %}<dt>reasoning = expert</dt>
  <dd>{{ e.reasoning_accuracy }} of calls</dd>{% endif %}
</dl>
{% if e.video %}{% if e.video.playable %}
<video controls preload="metadata" src="{{ e.video.src }}"></video>
{% else %}<p class="muted">Video: <a href="{{ e.video.src }}">{{ e.video.name }}</a> ({{ e.video.codec }},
which browsers do not play; open it in a video player).</p>{% endif %}{% endif %}
{% if e.trace %}
<table class="t trace"><thead><tr><th>step</th><th>policy reasoning</th>
<th>expert</th></tr></thead><tbody>
{% for t in e.trace %}<tr><td class="num">{{ t.steps }}</td>
<td{% if t.match is not none %} class="{{ 'hit' if t.match else 'miss' }}"{% endif %}>{{ t.text }}</td>
<td>{{ t.expert if t.expert is not none else "-" }}</td></tr>
{% endfor %}</tbody></table>
{% else %}<p class="muted">No reasoning recorded.</p>{% endif %}
{% if e.error %}<details><summary>traceback</summary><pre>{{ e.error }}</pre></details>{% endif %}
</details>
{% endfor %}
</details>
{% endfor %}

<h2 id="config">Run config</h2>
{{ config | safe }}
{% endblock %}
"""

TABLES = """{% extends "base" %}{% block body %}
<h1>{{ title }}</h1>
<p>{{ intro }}</p>
<nav>{% for t in tables %}<a href="#table-{{ loop.index }}">{{ t.short }}</a>{% endfor %}
<a href="#speed">Inference speed</a><a href="#runs">Run directories</a></nav>
{% for t in tables %}
<h2 id="table-{{ loop.index }}">{{ t.title }}</h2>
{{ t.html | safe }}
{% if t.note %}<p class="note">{{ t.note }}</p>{% endif %}
{% if t.plot %}
<img class="plot" alt="{{ t.title }}: success rate per condition" src="{{ t.plot }}">
{% endif %}
{% endfor %}
<h2 id="speed">Inference speed</h2>
<ul>{% for s in speed %}<li><code>{{ s.path }}</code>: {{ s.command }}</li>
{% else %}<li>no <code>divla-eval bench</code> output yet</li>{% endfor %}</ul>
<h2 id="runs">Run directories</h2>
<p class="note">A link opens the run's report.html where <code>divla-eval report DIR</code> has made one,
its folder otherwise.</p>
<ul class="runs">{% for r in runs %}<li><a href="{{ r.href }}">{{ r.name }}</a>
{% if not r.report %}<span class="muted">(no report.html yet)</span>{% endif %}</li>{% endfor %}</ul>
{% endblock %}
"""


def _render(template: str, **context) -> str:
    from importlib.metadata import PackageNotFoundError, version

    import jinja2

    try:
        package = version("divla-eval")
    except PackageNotFoundError:  # a source tree that was never installed
        package = "(not installed)"
    env = jinja2.Environment(
        loader=jinja2.DictLoader({"base": BASE, "report": REPORT, "tables": TABLES}),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template(template).render(css=CSS, version=package, **context)


# ------------------------------------------------------------------------------------------ pages


def _config_frame(manifest: dict | None) -> pd.DataFrame:
    rows = []
    for key, value in sorted(((manifest or {}).get("config") or {}).items()):
        rows.append((key, value if isinstance(value, str) else json.dumps(value, sort_keys=True)))
    env = (manifest or {}).get("environment") or (manifest if manifest and "git_commit" in manifest else {})
    if isinstance(env, dict) and env:
        dirty = " (dirty)" if env.get("dirty") else ""
        rows.append(("git commit", f"{env.get('git_commit') or 'unknown'}{dirty}"))
        packages = env.get("packages") or {}
        rows.append(("packages", ", ".join(f"{k} {v}" for k, v in sorted(packages.items()) if v)))
    if manifest is None:
        rows.append(("manifest", "(no manifest.json in this run directory)"))
    return pd.DataFrame(rows, columns=["setting", "value"])


def render_report(content) -> str:
    """The HTML of a run's report (`content`: `report.ReportContent`)."""
    from divla_eval.report import REASONING_NOTE, _pct

    table = _Tables()
    o = content.overall
    episodes = [_episode(r, content.run_dir) for r in sorted(content.records, key=lambda r: r.episode_key)]
    groups = [
        {
            "id": "failed",
            "title": "Failed or errored",
            "open": True,
            "episodes": [e for e in episodes if e["outcome"] != "success"],
        },
        {
            "id": "succeeded",
            "title": "Succeeded",
            "open": False,
            "episodes": [e for e in episodes if e["outcome"] == "success"],
        },
    ]
    sections = [("success", "Success")]
    if not content.drops.empty:
        sections.append(("drops", "Drop under perturbation"))
    if not content.reasoning.empty:
        sections.append(("reasoning", "Reasoning"))
    sections.append(("failures", "Failure modes"))
    if not content.per_object.empty:
        sections.append(("objects", "Per object"))
    if not content.per_instruction.empty:
        sections.append(("instructions", "Per instruction"))
    sections += [("timing", "Timing"), ("episodes", "Episodes"), ("config", "Run config")]
    return _render(
        "report",
        title=f"divla-eval report: {content.run_dir.name}",
        name=content.run_dir.name,
        summary=content.summary,
        overall={
            "successes": int(o["successes"]),
            "n": int(o["n"]),
            "rate": _pct(o["success_rate"]),
            "ci": f"{_pct(o['ci_low'])} - {_pct(o['ci_high'])}",
            "errors": int(o["errors"]),
        },
        sections=sections,
        success=table(content.success),
        success_plot="data:image/png;base64,"
        + base64.b64encode(Path(content.plot_path).read_bytes()).decode("ascii"),
        drops=table(content.drops) if not content.drops.empty else "",
        reasoning=table(content.reasoning) if not content.reasoning.empty else "",
        reasoning_note=REASONING_NOTE.replace("`", ""),
        failures=table(content.failure_modes) if not content.failure_modes.empty else "",
        failure_plot=_failure_plot(content.failure_modes),
        per_object=table(content.per_object) if not content.per_object.empty else "",
        per_instruction=table(content.per_instruction) if not content.per_instruction.empty else "",
        n_objects=len(content.per_object),
        n_instructions=len(content.per_instruction),
        timing=table(content.timing),
        groups=[g for g in groups if g["episodes"]],
        videos=sum(e["video"] is not None for e in episodes),
        config=table(_config_frame(content.manifest)),
    )


def write_report_html(content) -> Path:
    """Write ``report.html`` into the run directory (atomically); returns its path."""
    path = Path(content.run_dir) / "report.html"
    write_text(path, render_report(content))
    return path


def tables_html_path(markdown_path: Path) -> Path:
    """Where `divla-eval tables` puts the page: beside its markdown file, with the suffix .html."""
    markdown_path = Path(markdown_path)
    if markdown_path.suffix.lower() == ".html":
        return markdown_path.with_name(markdown_path.name + ".html")
    return markdown_path.with_suffix(".html")


def write_tables_html(
    path: Path,
    title: str,
    intro: str,
    tables: Sequence[tuple],
    run_dirs: Sequence[Path],
    speed: Sequence[tuple[Path, str]],
) -> Path:
    """Write the paper's tables page: each table (`paper.PaperTable`, frame) with its plot, the bench
    outputs, and a link to each run directory's report."""
    from divla_eval.report import parse_rate_text

    path = Path(path)
    table = _Tables()
    shown = []
    for spec, frame in tables:
        labels = [c.label for c in spec.columns]
        parsed = frame.map(parse_rate_text) if not frame.empty else frame
        rates = (
            parsed.map(lambda c: c[0] / c[1] if c is not None else float("nan")) if not frame.empty else None
        )
        several_versions = frame.groupby(["policy", "checkpoint"])["task version"].nunique().max() > 1
        rows = []
        for i, r in frame.iterrows():
            if r["checkpoint"] == "not run":
                continue
            name = r["policy"] if r["checkpoint"] in ("-", "") else f"{r['policy']} {r['checkpoint']}"
            name += f" (task v{r['task version']})" if several_versions else ""
            rows.append((name, [parsed.at[i, label] for label in labels]))
        shown.append(
            {
                "title": spec.title,
                "short": spec.title.split(" (")[0],
                "html": table(frame, rates),
                "note": f"{spec.note[0].upper()}{spec.note[1:]}." if spec.note else "",
                "plot": _rates_plot(spec.title, rows, labels),
            }
        )
    base = path.parent.resolve()
    runs = []
    for d in run_dirs:
        report = Path(d) / "report.html"
        target = report if report.is_file() else Path(d)
        rel = Path(os.path.relpath(target.resolve(), base)).as_posix()
        runs.append({"name": str(d), "href": quote(rel), "report": report.is_file()})
    html = _render(
        "tables",
        title=title,
        intro=intro,
        tables=shown,
        speed=[{"path": str(p), "command": c} for p, c in speed],
        runs=runs,
    )
    write_text(path, html)
    return path
