"""Learning curves: snapshots kept while training, a constant schedule that makes them extendable, and
`divla-eval curve` evaluating every snapshot on one grid."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from divla_eval.cli import main  # noqa: E402
from divla_eval.train import snapshot_dirs  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setenv("DIVLA_EVAL_TORCH_THREADS", "1")
    yield
    torch.set_num_threads(before)


def _train(demos, out, steps, *extra):
    from conftest import TINY_DIFFUSION_POLICY

    opts = [f"--model-option={k}={json.dumps(v)}" for k, v in TINY_DIFFUSION_POLICY.items()]
    argv = ["train", "--policy", "diffusion_policy", "--demos", str(demos), "--out", str(out)]
    argv += ["--steps", str(steps), "--batch-size", "4", "--no-progress", *opts, *extra]
    assert main(argv) == 0


def test_a_constant_schedule_makes_a_longer_runs_snapshot_the_shorter_runs_model(demos, tmp_path):
    from safetensors.torch import load_file

    _train(demos, tmp_path / "short", 4, "--schedule", "constant", "--snapshot-every", "2")
    _train(demos, tmp_path / "long", 6, "--schedule", "constant", "--snapshot-every", "2")
    assert [s for s, _ in snapshot_dirs(tmp_path / "long")] == [2, 4, 6]
    short = load_file(str(tmp_path / "short" / "snapshots" / "step-0000004" / "model.safetensors"))
    long = load_file(str(tmp_path / "long" / "snapshots" / "step-0000004" / "model.safetensors"))
    assert short.keys() == long.keys() and all(torch.equal(short[k], long[k]) for k in short)
    # and the 4-step run's final policy is that snapshot
    final = load_file(str(tmp_path / "short" / "model.safetensors"))
    assert all(torch.equal(final[k], short[k]) for k in short)


def test_curve_evaluates_every_snapshot_on_the_same_episodes_and_resumes(demos, tmp_path, capsys):
    _train(demos, tmp_path / "dp", 4, "--schedule", "constant", "--snapshot-every", "2")
    out = tmp_path / "curve"
    argv = ["curve", str(tmp_path / "dp"), "--task", "bin_picking", "--split", "seen", "--episodes", "2"]
    argv += ["--max-steps", "4", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    seeds = {}
    for step in (2, 4):
        rows = [json.loads(x) for x in (out / f"step-{step:07d}" / "seen" / "episodes.jsonl").open()]
        assert len(rows) == 2 and all(r["status"] == "ok" and r["steps"] == 4 for r in rows)
        seeds[step] = sorted(r["seed"] for r in rows)
    assert seeds[2] == seeds[4]  # the same scenes for every snapshot
    md = (out / "curve.md").read_text()
    assert "| 2 |" in md and "| 4 |" in md and "0/2" in md and (out / "curve.png").is_file()
    assert "divla-eval curve" in md  # the command that made it
    capsys.readouterr()
    assert main(argv) == 0  # a rerun resumes: nothing left to run
    assert sum(1 for _ in (out / "step-0000004" / "seen" / "episodes.jsonl").open()) == 2


def test_curve_and_schedule_mistakes_are_one_line_errors(demos, tmp_path, capsys):
    _train(demos, tmp_path / "plain", 2)  # no snapshots kept
    assert (
        main(["curve", str(tmp_path / "plain"), "--task", "bin_picking", "--out", str(tmp_path / "c")]) == 2
    )
    assert "no snapshots" in capsys.readouterr().err
    assert main(["curve", str(tmp_path), "--task", "bin_picking", "--out", str(tmp_path / "c")]) == 2
    assert "not a `divla-eval train` directory" in capsys.readouterr().err
    argv = ["train", "--policy", "diffusion_policy", "--demos", str(demos), "--out", str(tmp_path / "x")]
    assert main([*argv, "--schedule", "linear"]) == 2
    err = capsys.readouterr().err
    assert "valid: cosine, constant" in err and err.count("\n") == 1
