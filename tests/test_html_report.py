"""report.html and the tables page: self-contained, escaped, rendered by headless Chromium without a
console error and showing the records' numbers; episode videos are H.264 that the browser plays, named
by task, split and episode.

The browser checks drive Chromium (the Debian package `chromium`) over the DevTools protocol with the
`websockets` client the project already depends on; without Chromium they skip, naming the package.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from divla_eval.episode import legacy_video_name, video_name, write_video
from divla_eval.metrics import wilson_interval
from divla_eval.records import EpisodeRecord, EpisodeStore, write_manifest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs a headless Chromium on PATH: install the Debian package `chromium` "
    "(apt-get install -y chromium)",
)
HOSTILE = '<script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2">'


# ------------------------------------------------------------------------------------- the browser


class Browser:
    """One headless Chromium with one tab, driven over the DevTools protocol: open a page, collect
    every console error, uncaught exception and failed load (the Runtime and Log domains), evaluate
    JavaScript in it."""

    def __init__(self):
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="divla-chromium-")
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",  # root in a container has no user namespace for the sandbox
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                "--window-size=1280,1000",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                pytest.fail(f"{CHROMIUM} did not start its DevTools endpoint")
            time.sleep(0.05)
        self.ws = None
        try:  # whatever fails from here, the browser process must not outlive the test
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
                pages = json.load(resp)
            url = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
            self.ws = connect(url, max_size=None, open_timeout=10)
            self.next_id = 0
            self.events: list[dict] = []
            for domain in ("Runtime", "Log", "Page"):
                self.call(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    def _receive(self) -> dict:
        message = json.loads(self.ws.recv(timeout=30))
        if "method" in message:
            self.events.append(message)
        return message

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = self._receive()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def open(self, path: Path) -> None:
        """Load a page and wait for its load event (images included); forget earlier events."""
        self.events = []
        self.call("Page.navigate", url=Path(path).resolve().as_uri())
        deadline = time.monotonic() + 30
        while not any(e["method"] == "Page.loadEventFired" for e in self.events):
            assert time.monotonic() < deadline, f"{path} did not finish loading"
            self._receive()

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def problems(self) -> list[str]:
        """Every console error, uncaught exception and failed resource since the page was opened."""
        self.js("0")  # a round trip, so that events sent during the load have arrived
        found = []
        for event in self.events:
            method, params = event["method"], event["params"]
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(f"{details.get('text')} {details.get('exception', {}).get('description', '')}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(f"console.{params['type']}: {params['args']}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        return found

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("needs the Debian package `chromium`")
    b = Browser()
    yield b
    b.close()


# ------------------------------------------------------------------------------------------ runs


def _record(i: int, *, success: bool, status: str = "ok", **kw) -> EpisodeRecord:
    fields = dict(
        run_id="r1",
        task="bin_picking",
        task_version="1",
        split="unseen",
        difficulty=None,
        episode_index=i,
        episode_key=f"bin_picking/unseen/-/none/{i:05d}",
        seed=i,
        object_ids=[f"unseen-object-{i % 3:02d}", "bin"],
        instruction="move any object into the basket",
        perturbations=[],
        policy="divla",
        checkpoint_hash=None,
        success=success and status == "ok",
        partial_score=1.0 if success else 0.25,
        failure_mode=None if success else ("error" if status == "error" else "no_grasp"),
        steps=40 + i,
        wall_time_s=1.5,
        latency_ms={"n": 10, "mean": 3.0, "p50": 3.0, "p95": 4.5},
        reasoning_trace=[
            {"step": 0, "text": "grasp the red block", "expert": "grasp the red block"},
            {"step": 4, "text": "grasp the red block", "expert": "grasp the red block"},
            {"step": 8, "text": f"place it in the basket {i}", "expert": "lift the red block"},
        ],
        status=status,
        error="Traceback (most recent call last):\nRuntimeError: sim <b>exploded</b>"
        if status == "error"
        else None,
        reasoning_accuracy=2 / 3,
    )
    fields.update(kw)
    return EpisodeRecord(**fields)


def _synthetic_run(run_dir: Path) -> list[EpisodeRecord]:
    """Six episodes, 3 successes (one errored episode among the failures), one with hostile text."""
    records = [
        _record(0, success=True),
        _record(1, success=False),
        _record(2, success=True),
        _record(3, success=False, status="error"),
        _record(4, success=True, instruction=HOSTILE),
        _record(
            5,
            success=False,
            reasoning_trace=[{"step": 0, "text": HOSTILE, "expert": "grasp the red block"}],
        ),
    ]
    write_manifest(run_dir, {"policy": "divla", "seed": 0}, {"environment": {"git_commit": "abc123"}})
    store = EpisodeStore(run_dir / "episodes.jsonl")
    for r in records:
        store.append(r)
    return records


# ------------------------------------------------------------------------------------------ tests


def test_video_names_say_task_split_perturbation_and_episode() -> None:
    assert video_name("multitask/flip_pot/-/none/00003") == "multitask-flip_pot-ep00003.mp4"
    assert (
        video_name("sorting/unseen/hard/lighting:3+distractors:1/00012")
        == "sorting-hard-unseen-lighting3+distractors1-ep00012.mp4"
    )
    assert video_name("odd key/with spaces") == "odd_key-with_spaces.mp4"  # not a run key: kept, made safe
    keys = [f"bin_picking/unseen/-/{p}/{i:05d}" for p in ("none", "lighting:3") for i in range(3)]
    assert len({video_name(k) for k in keys}) == len(keys)  # a matched control has a name of its own
    assert legacy_video_name("multitask/flip_pot/-/none/00003") == "multitask__flip_pot__-__none__00003.mp4"


def test_videos_are_h264_yuv420p_with_even_sides_and_every_frame(tmp_path: Path) -> None:
    import av

    frames = [np.full((35, 33, 3), 7 * i, dtype=np.uint8) for i in range(9)]  # odd sides: padded
    write_video(tmp_path / "v.mp4", frames, fps=20)
    with av.open(str(tmp_path / "v.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == (34, 36)
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(decoded) == 9
    assert abs(int(decoded[5][:35, :33].mean()) - 35) <= 3  # the frames in order, not reordered


def test_report_html_is_self_contained_and_escapes_record_text(tmp_path: Path) -> None:
    import cv2

    from divla_eval.report import write_report

    _synthetic_run(tmp_path)
    # a video of an older run (MPEG-4 Part 2, named by its key): linked with a note, not a <video>
    old = tmp_path / "videos" / legacy_video_name("bin_picking/unseen/-/none/00001")
    old.parent.mkdir()
    writer = cv2.VideoWriter(str(old), cv2.VideoWriter_fourcc(*"mp4v"), 20, (32, 32))
    for _ in range(3):
        writer.write(np.zeros((32, 32, 3), dtype=np.uint8))
    writer.release()
    assert write_report(tmp_path) == tmp_path / "report.md"
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<video" not in page
    assert f'<a href="videos/{old.name}">{old.name}</a> (mpeg4,' in page and "browsers do not play" in page
    assert "<script" not in page.lower()  # the page has none of its own, and no record adds one
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page
    assert '<img src="x"' not in page and "&lt;img src=&#34;x&#34; onerror=" in page
    assert "sim &lt;b&gt;exploded&lt;/b&gt;" in page
    # nothing is fetched: no http(s) resource, the plots are data: URIs
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page
    assert page.count('src="data:image/png;base64,') == 2  # success and failure-mode plots


@needs_chromium
def test_report_page_renders_without_console_errors_and_shows_the_records(
    tmp_path: Path, browser: Browser, capsys
) -> None:
    from divla_eval.cli import main

    records = _synthetic_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    assert f"wrote {tmp_path / 'report.html'}" in capsys.readouterr().out
    browser.open(tmp_path / "report.html")
    assert browser.problems() == []
    assert browser.js("window.__pwned") is None  # the hostile instruction and reasoning stayed text
    text = browser.js("document.body.innerText")
    successes = sum(r.success and r.status == "ok" for r in records)
    lo, hi = wilson_interval(successes, len(records))
    assert (successes, len(records)) == (3, 6)
    assert "3/6" in text and "50.0%" in text and f"{100 * lo:.1f}% - {100 * hi:.1f}%" in text
    # success table: bin_picking unseen none divla, n 6, successes 3, one error
    rows = browser.js(
        "[...document.querySelectorAll('#success ~ table.t')][0].innerText.split('\\n')"
        ".map(r => r.split('\\t').map(c => c.trim()))"
    )
    assert ["bin_picking", "unseen", "none", "divla", "6", "3", "50.0%"] == rows[1][:7]
    assert rows[1][-1] == "1"
    assert "no_grasp" in text and "Per object" in text and "unseen-object-01" in text
    # every episode is listed, failures first; reasoning (collapsed) is in the DOM, as text
    summaries = browser.js(
        "[...document.querySelectorAll('details.episode > summary')]"
        ".map(s => [s.querySelector('.badge').textContent, s.querySelector('code').textContent])"
    )
    assert summaries == [
        ["no_grasp", "bin_picking/unseen/-/none/00001"],
        ["error", "bin_picking/unseen/-/none/00003"],
        ["no_grasp", "bin_picking/unseen/-/none/00005"],
        ["success", "bin_picking/unseen/-/none/00000"],
        ["success", "bin_picking/unseen/-/none/00002"],
        ["success", "bin_picking/unseen/-/none/00004"],
    ]
    content = browser.js("document.body.textContent")
    assert (
        "place it in the basket 2" in content
        and HOSTILE in content
        and "RuntimeError: sim <b>exploded" in content
    )
    # the trace merges successive calls with the same phrases: the calls at steps 0 and 4
    assert browser.js("document.querySelector('table.trace td.num').textContent") == "0-4"
    assert browser.js("document.querySelectorAll('img.plot').length") == 2
    assert browser.js("[...document.querySelectorAll('img.plot')].every(i => i.naturalWidth > 100)")


@needs_chromium
def test_the_browser_check_sees_console_errors(tmp_path: Path, browser: Browser) -> None:
    """The checker itself: an uncaught exception, a console.error and a missing file are all caught."""
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        '<img src="missing.png"><script>console.error("bad"); throw new Error("boom")</script></body></html>'
    )
    browser.open(page)
    found = " | ".join(browser.problems())
    assert "boom" in found and "console.error" in found and "missing.png" in found


@needs_chromium
def test_a_run_with_video_plays_its_h264_videos_in_the_report(tmp_path: Path, browser: Browser) -> None:
    import av

    from divla_eval.report import write_report
    from divla_eval.runner import RunConfig, run

    cfg = RunConfig(
        task="bin_picking", split="unseen", policy="scripted", episodes=2, seed=0, max_steps=5, image_size=32
    )
    run(cfg, tmp_path, progress=False, video=True)
    records = EpisodeStore(tmp_path / "episodes.jsonl").load()
    names = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert names == ["bin_picking-unseen-ep00000.mp4", "bin_picking-unseen-ep00001.mp4"]
    for r in records:
        with av.open(str(tmp_path / "videos" / video_name(r.episode_key))) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
            assert (stream.width, stream.height) == (320, 344)
            assert sum(1 for _ in container.decode(stream)) == r.steps == 5
    write_report(tmp_path)
    browser.open(tmp_path / "report.html")
    assert browser.problems() == []
    loaded = browser.js(
        """Promise.all([...document.querySelectorAll('video')].map(v => new Promise(done => {
             v.onloadeddata = () => done([v.getAttribute('src'), v.videoWidth, v.videoHeight, v.duration]);
             v.onerror = () => done([v.getAttribute('src'), 'error', v.error && v.error.message]);
             v.preload = 'auto'; v.load(); })))"""
    )
    assert sorted(loaded) == [
        ["videos/bin_picking-unseen-ep00000.mp4", 320, 344, pytest.approx(0.25, abs=0.06)],
        ["videos/bin_picking-unseen-ep00001.mp4", 320, 344, pytest.approx(0.25, abs=0.06)],
    ]
    assert browser.problems() == []


@needs_chromium
def test_tables_page_renders_the_paper_tables_with_links_to_reports(
    tmp_path: Path, browser: Browser, capsys
) -> None:
    from divla_eval.cli import main
    from divla_eval.report import write_report

    root = tmp_path / "results"
    _synthetic_run(root / "divla" / "bin_picking-unseen")
    write_report(root / "divla" / "bin_picking-unseen")
    other = root / "random" / "bin_picking-unseen"
    write_manifest(other, {"policy": "random", "seed": 0}, {})
    store = EpisodeStore(other / "episodes.jsonl")
    for i in range(4):
        store.append(_record(i, success=i == 0, policy="random", run_id="r2", reasoning_trace=[]))
    assert main(["tables", str(root)]) == 0
    assert f"wrote {root / 'paper_tables.html'}" in capsys.readouterr().out
    browser.open(root / "paper_tables.html")
    assert browser.problems() == []
    text = browser.js("document.body.innerText")
    assert "Zero-shot bin picking (102 unseen objects)" in text
    assert "3/6 = 50.0%" in text and "1/4 = 25.0%" in text and "not run" in text
    # the bin-picking table's plot, and a link per run directory: the report where there is one
    assert browser.js("document.querySelectorAll('img.plot').length") == 1
    links = browser.js("[...document.querySelectorAll('ul.runs a')].map(a => a.getAttribute('href'))")
    assert links == ["divla/bin_picking-unseen/report.html", "random/bin_picking-unseen"]
    assert all((root / link).exists() for link in links)
