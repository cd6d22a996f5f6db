"""CLI: bad input ends in one line on stderr and exit code 2, never a traceback."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from divla_eval.cli import main


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "--task", "bin_pickng"], "did you mean 'bin_picking'"),
        (
            ["run", "--policy", "nope"],
            "valid: diffusion_policy, divla, octo, openvla, random, remote, scripted",
        ),
        (["run", "--policy", "divla"], "needs --checkpoint DIR"),
        (["run", "--policy", "divla", "--checkpoint", "README.md"], "README.md is a file, not a directory"),
        (["run", "--policy", "divla", "--checkpoint", "no/such/dir"], "no/such/dir does not exist"),
        (["train", "--demos", "missing.hdf5", "--out", "x"], "does not exist"),
        (["run", "--objects", "weird"], "valid: seen, unseen"),
        (["run", "--episodes", "0"], "positive integer"),
        (["run", "--episodes", "-3"], "positive integer"),
        (["run", "--perturb", "fog:2"], "unknown perturbation 'fog'"),
        (["list", "gadgets"], "invalid choice"),
        (["list", "objects", "--split", "nope"], "valid: seen, unseen"),
        (["report", "/nonexistent/run"], "/nonexistent/run"),
        (["summary", "/nonexistent/runs"], "is not a directory"),
        (["tables", "/nonexistent/runs"], "is not a directory"),
        (["compare", "/nonexistent/a", "/nonexistent/b"], "run directory /nonexistent/a does not exist"),
        (["run", "--policy", "random", "--checkpoint", "ckpt"], "takes no checkpoint"),
        (["run", "--task-option", "colour=red"], "valid: max_steps, num_objects, variant"),
        (["run", "--task-option", "num_objects=many"], "expected int"),
        (["run", "--task-option", "num_objects=9"], "num_objects must be 1..4"),
        (["run", "--task-option", "variant=some"], "valid: any, named"),
        (["run", "--task-option", "novalue"], "expected KEY=VALUE"),
        (["run", "--difficulty", "hard"], "has no difficulty levels"),
        (["run", "--perturb", "lighting:7"], "valid levels: 1, 2, 3"),
        (["run", "--matched-control"], "needs at least one --perturb"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        sys.exit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("divla-eval: error:"), err
    assert needle in err[0]


def test_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["run", "--policy", "random", "--episodes", "1", "--out", str(blocker / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write to output directory" in err


def test_run_dir_from_a_different_config(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert (
        main(
            [
                "run",
                "--policy",
                "random",
                "--episodes",
                "1",
                "--max-steps",
                "5",
                "--out",
                out,
                "--no-progress",
            ]
        )
        == 0
    )
    code = main(
        ["run", "--policy", "random", "--episodes", "1", "--max-steps", "5", "--out", out, "--seed", "7"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "different config" in err and "seed" in err


def test_list_objects_prints_the_102_unseen(capsys):
    assert main(["list", "objects", "--split", "unseen"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "# unseen: 102 objects" and len(out) == 103


def _console_script() -> str:
    beside = Path(sys.executable).parent / "divla-eval"  # the venv's script, activated or not
    return str(beside) if beside.exists() else shutil.which("divla-eval")


def test_console_script_end_to_end_with_report(tmp_path):
    # the default policy for bin_picking is the shipped DiVLA reference checkpoint, and it says so
    cmd = [_console_script(), "run", "--episodes", "1", "--max-steps", "16", "--no-progress"]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path / "default")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "reference DiVLA checkpoint" in proc.stderr and "policy=divla" in proc.stdout
    out = tmp_path / "run"
    cmd = [
        _console_script(),
        "run",
        "--policy",
        "scripted",
        "--episodes",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "success 2/2" in proc.stdout
    proc = subprocess.run(
        [_console_script(), "report", str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.md").read_text().count("bin_picking") >= 1
    assert (out / "success.png").stat().st_size > 1000


def test_sigterm_stops_a_run_like_ctrl_c_and_keeps_finished_episodes(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    cmd = [_console_script(), "run", "--policy", "random", "--episodes", "200", "--max-steps", "20"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    records = out / "episodes.jsonl"
    deadline = time.monotonic() + 240
    while not (records.is_file() and records.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: finished episodes are saved" in err and "Traceback" not in err
    kept = records.read_text().count("\n")
    assert 1 <= kept < 200
