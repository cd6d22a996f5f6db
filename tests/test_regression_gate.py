"""CI smoke of both regression gates (docs/regression.md), in the default suite.

- `divla-eval regression` runs for real on a tiny grid (3 scripted bin-picking episodes and 3 blocks of
  200 timed inference calls) against its stored expectations, results/regression_smoke.json: it fails
  when that file is stale (another task version, a missing section) or when the gate breaks;
- the same result, doctored (a 4x slower call, a worse success rate), must fail with exit code 1 and a
  table of what moved; bad input exits 2 with one line;
- the speed gate of `nox -s bench` (benchmarks/compare.py) on the stored results/bench_sim.json and
  doctored copies of it, and that the stored file holds every benchmark the suite runs now.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import json
from pathlib import Path

import pytest

from divla_eval import regression
from divla_eval.cli import main

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "results" / "regression_smoke.json"
BENCH = ROOT / "results" / "bench_sim.json"
SMOKE_TOLERANCE = "3"
"""The scripted call takes ~0.1 ms: against the matmul, the weakest case of the speed unit (1.2x between
repetitions here, and the matmul alone 4x slower in a burst of other jobs; docs/regression.md). The
smoke checks that the gate runs and its file is current; the doctored results below, that it fails."""
SMOKE_COMMAND = [
    "regression",
    "--policy",
    "scripted",
    "--baseline",
    str(SMOKE),
    "--tolerance",
    SMOKE_TOLERANCE,
    "--calls",
    "200",
    "--no-progress",
]


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's own errors (a missing flag)
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke, run once: (exit code, stdout, the result file it wrote)."""
    out = tmp_path_factory.mktemp("smoke") / "out"
    code, stdout, stderr = cli(*SMOKE_COMMAND, "--out", str(out))
    return code, stdout + stderr, out / "regression.json"


def test_the_smoke_passes_against_its_stored_expectations(smoke):
    code, output, result = smoke
    assert code == 0, output
    stored = json.loads(SMOKE.read_text())
    assert stored["grid"] == json.loads(result.read_text())["grid"]  # the smoke runs the stored grid
    assert "success rate" in output and "infer p50 / matmul" in output


def _doctored(tmp_path: Path, source: Path, name: str, change) -> Path:
    data = json.loads(source.read_text())
    change(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _verdict(output: str, what: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith(what))
    return line.split()[-1]


def gate(result: Path, baseline: Path = SMOKE) -> tuple[int, str, str]:
    """The smoke's gate on a saved result (no run): `--result`."""
    return cli(
        "regression", "--baseline", str(baseline), "--tolerance", SMOKE_TOLERANCE, "--result", str(result)
    )


def test_a_slower_call_and_a_worse_success_rate_fail_with_the_table_of_what_moved(smoke, tmp_path):
    result = smoke[2]

    def slower(d):  # the same policy, its call 4x slower relative to the matmul
        d["speed"]["ratio"] *= 4
        d["speed"]["infer_p50_ms"] *= 4

    code, out, _ = gate(_doctored(tmp_path, result, "slow.json", slower))
    assert code == 1
    assert _verdict(out, "infer p50 / matmul") == "FAIL" and _verdict(out, "success rate") == "ok"
    growth = (
        4 * json.loads(result.read_text())["speed"]["ratio"] / json.loads(SMOKE.read_text())["speed"]["ratio"]
    )
    assert f"{growth:.2f}x" in out and f"fails above {SMOKE_TOLERANCE}x" in out

    def worse(d):  # two of the three episodes now fail
        d["success"].update(successes=1, outcomes="100")

    code, out, _ = gate(_doctored(tmp_path, result, "worse.json", worse))
    assert code == 1
    assert _verdict(out, "success rate") == "FAIL" and _verdict(out, "infer p50 / matmul") == "ok"
    assert "3/3 = 100.0%" in out and "1/3 = 33.3%" in out and "fails at <= 1/3" in out
    assert "success -> failure at episode(s) 1, 2" in out

    # what the gate must let pass: the result as measured, and one failure of three
    assert gate(result)[0] == 0

    def one_failure(d):
        d["success"].update(successes=2, outcomes="110")

    assert gate(_doctored(tmp_path, result, "one.json", one_failure))[0] == 0


def test_a_stale_baseline_fails(smoke, tmp_path):
    result = smoke[2]

    def no_speed(d):
        del d["speed"]

    def old_task(d):
        d["grid"]["task_version"] = "0"

    def other_reference(d):
        d["speed"]["reference"] = "numpy matmul 512x512 float32"

    for change, what, why in [
        (no_speed, "infer p50 / matmul", "MISSING"),
        (old_task, "success rate", "STALE"),
        (other_reference, "infer p50 / matmul", "STALE"),
    ]:
        code, out, _ = gate(result, _doctored(tmp_path, SMOKE, f"{change.__name__}.json", change))
        assert code == 1 and _verdict(out, what) == why, out


def test_update_stores_a_result_as_the_baseline(smoke, tmp_path):
    baseline = tmp_path / "new.json"
    code, out, _ = cli("regression", "--baseline", str(baseline), "--result", str(smoke[2]), "--update")
    assert code == 0 and f"stored {baseline}" in out
    assert cli("regression", "--baseline", str(baseline), "--result", str(smoke[2]))[0] == 0


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    damaged = tmp_path / "damaged.json"
    damaged.write_text("{")
    cases = [
        (["--policy", "scripted", "--baseline", str(tmp_path / "none.json")], "no baseline at"),
        (["--policy", "nosuchpolicy", "--baseline", str(SMOKE)], "unknown policy 'nosuchpolicy'"),
        (["--policy", "scripted", "--baseline", str(damaged)], "damaged.json is damaged"),
        (["--policy", "scripted", "--baseline", str(SMOKE), "--episodes", "5"], "stored for another grid"),
        (["--policy", "scripted", "--baseline", str(SMOKE), "--tolerance", "0.9"], "--tolerance"),
        (["--policy", "divla", "--baseline", str(SMOKE)], "checkpoint"),
        (["--baseline", str(SMOKE)], "--policy is required"),
        (["--policy", "scripted"], "--baseline"),
    ]
    for argv, message in cases:
        code, out, err = cli("regression", *argv)
        assert code == 2 and out == "", (argv, out)
        assert err.startswith("divla-eval: error:") and message in err and err.count("\n") == 1, (argv, err)


# --- the speed gate of `nox -s bench` -----------------------------------------------------------------
def bench_compare(new: Path, baseline: Path = BENCH) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = regression.bench_main([str(new), str(baseline)])
    return code, out.getvalue()


def test_the_bench_gate_fails_a_slower_or_unstored_benchmark(tmp_path):
    stored = json.loads(BENCH.read_text())
    assert bench_compare(BENCH)[0] == 0  # the baseline against itself

    slow = copy.deepcopy(stored)
    victim = next(b for b in slow["benchmarks"] if b["name"].startswith("test_policy_infer"))
    victim["stats"]["median"] *= 2.5  # one policy's call 2.5x as slow; the reference unchanged
    path = tmp_path / "slow.json"
    path.write_text(json.dumps(slow))
    code, out = bench_compare(path)
    assert code == 1 and _verdict(out, victim["name"]) == "FAIL" and "2.50x" in out
    assert all(_verdict(out, b["name"]) == "ok" for b in stored["benchmarks"] if b["name"] != victim["name"])

    faster_machine = copy.deepcopy(stored)  # everything 3x faster, the reference too: no change
    for b in faster_machine["benchmarks"]:
        b["stats"]["median"] /= 3
        if regression.INTERLEAVED in b.get("extra_info", {}):
            b["extra_info"][regression.INTERLEAVED] /= 3
    path.write_text(json.dumps(faster_machine))
    assert bench_compare(path)[0] == 0

    new = copy.deepcopy(stored)  # a benchmark added without storing it: a failure, not a pass
    new["benchmarks"].append({**copy.deepcopy(victim), "name": "test_policy_infer[newpolicy]"})
    path.write_text(json.dumps(new))
    code, out = bench_compare(path)
    assert code == 1 and _verdict(out, "test_policy_infer[newpolicy]") == "MISSING"

    old = copy.deepcopy(stored)  # the baseline as stored before the matmul unit: nothing comparable
    old["benchmarks"] = [b for b in old["benchmarks"] if b["name"] != regression.REFERENCE]
    for b in old["benchmarks"]:
        b["extra_info"] = {}
    path.write_text(json.dumps(old))
    code, out = bench_compare(BENCH, path)
    assert code == 1 and all(_verdict(out, b["name"]) == "STALE" for b in old["benchmarks"])

    code, out = bench_compare(tmp_path / "none.json")
    assert code == 2 and "cannot be read" in out


def test_the_stored_bench_baseline_holds_every_benchmark():
    """A benchmark results/bench_sim.json lacks would fail `nox -s bench` as MISSING: every benchmark
    function, and every registered learned policy's call, must be stored (`nox -s bench_baseline`)."""
    stored = set(regression.bench_medians(BENCH))
    functions = {
        node.name
        for path in (ROOT / "benchmarks").glob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }
    assert regression.REFERENCE in functions and len(functions) > 3
    for function in functions:
        assert any(n == function or n.startswith(function + "[") for n in stored), function
    for name in regression.benchmarked_policies():
        assert f"test_policy_infer[{name}]" in stored, name
    assert all(regression.INTERLEAVED in b["extra_info"] for b in json.loads(BENCH.read_text())["benchmarks"]
               if b["name"] != regression.REFERENCE)  # fmt: skip
