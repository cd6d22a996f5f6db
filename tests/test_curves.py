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
    assert "`encoder_channels=[8,16] num_keypoints=4" in md  # and the recipe's options
    capsys.readouterr()
    assert main(argv) == 0  # a rerun resumes: nothing left to run
    assert sum(1 for _ in (out / "step-0000004" / "seen" / "episodes.jsonl").open()) == 2
    # a snapshot lost with its run (runs/ is not in git) keeps its evaluated row
    import shutil

    shutil.rmtree(tmp_path / "dp" / "snapshots" / "step-0000002")
    assert main(argv) == 0
    assert "| 2 |" in (out / "curve.md").read_text()


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


def test_the_wsd_schedule_holds_the_lr_then_decays_it_linearly_to_zero():
    from divla_eval.train import TrainConfig, _lr_at

    cfg = TrainConfig("diffusion_policy", (), "x", steps=10, schedule="wsd", decay_steps=4, warmup_steps=2)
    lrs = [_lr_at(cfg, s) for s in range(10)]
    assert lrs[:2] == [1.5e-4, 3e-4]  # the warm-up first
    assert lrs[2:6] == [3e-4] * 4  # stable: a constant run's lr until the decay starts
    assert lrs[6:] == pytest.approx([3e-4, 2.25e-4, 1.5e-4, 0.75e-4])  # 4 steps down towards 0


def test_a_branch_from_a_constant_run_continues_it_exactly(demos, tmp_path):
    """`--init-from` copies the constant run's state: training on from there with the same settings
    makes the very weights the constant run makes when it is resumed, and the log keeps its rows."""
    import shutil

    from safetensors.torch import load_file

    _train(demos, tmp_path / "src", 4, "--schedule", "constant")
    shutil.copytree(tmp_path / "src", tmp_path / "resumed")
    _train(demos, tmp_path / "resumed", 6, "--schedule", "constant")
    _train(demos, tmp_path / "branch", 6, "--schedule", "constant", "--init-from", str(tmp_path / "src"))
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    branch = load_file(str(tmp_path / "branch" / "model.safetensors"))
    assert resumed.keys() == branch.keys() and all(torch.equal(resumed[k], branch[k]) for k in resumed)
    log = [json.loads(x) for x in (tmp_path / "branch" / "train_log.jsonl").open()]
    src_log = [json.loads(x) for x in (tmp_path / "src" / "train_log.jsonl").open()]
    # the source's rows, then the branch's own (a row every 10 steps and the last)
    assert log[: len(src_log)] == src_log and [r["step"] for r in log[len(src_log) :]] == [5]
    meta = json.loads((tmp_path / "branch" / "diffusion_policy_meta.json").read_text())
    assert meta["init_from"] == {"run": str((tmp_path / "src").resolve()), "step": 4}
    # the source is left as it was: still at step 4
    state = json.loads((tmp_path / "src" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4


def test_a_wsd_branch_decays_after_the_source_step_and_resumes_from_its_own_checkpoint(demos, tmp_path):
    _train(demos, tmp_path / "src", 4, "--schedule", "constant")
    argv = ["--schedule", "wsd", "--decay-steps", "2", "--init-from", str(tmp_path / "src")]
    _train(demos, tmp_path / "wsd", 6, *argv)
    log = [json.loads(x) for x in (tmp_path / "wsd" / "train_log.jsonl").open()]
    assert log[-1]["step"] == 5  # logged with the lr of the warm-up, which is still ramping at step 5
    assert log[-1]["lr"] == pytest.approx(3e-4 * 6 / 100)
    key = json.loads((tmp_path / "wsd" / "checkpoint" / "trainer_state.json").read_text())["key"]
    assert key["schedule"] == "wsd" and key["decay_steps"] == 2
    # a rerun does not copy again: it finds its own checkpoint, trained to the end
    (tmp_path / "src" / "checkpoint" / "trainer_state.json").unlink()
    _train(demos, tmp_path / "wsd", 6, *argv)


def test_init_from_mistakes_are_one_line_errors(demos, tmp_path, capsys):
    _train(demos, tmp_path / "const", 4, "--schedule", "constant")
    _train(demos, tmp_path / "cos", 2)
    from conftest import TINY_DIFFUSION_POLICY

    argv = ["train", "--policy", "diffusion_policy", "--demos", str(demos), "--batch-size", "4"]
    argv += ["--no-progress", "--out", str(tmp_path / "b")]
    argv += [f"--model-option={k}={json.dumps(v)}" for k, v in TINY_DIFFUSION_POLICY.items()]

    def err(*extra) -> str:
        capsys.readouterr()
        assert main([*argv, *extra]) == 2
        text = capsys.readouterr().err
        assert text.count("\n") == 1, text
        return text

    assert "--decay-steps between 1 and --steps" in err("--steps", "6", "--schedule", "wsd")
    assert "is for --schedule wsd" in err("--steps", "6", "--decay-steps", "2")
    assert "needs --schedule constant or wsd" in err("--steps", "6", "--init-from", str(tmp_path / "const"))
    wsd = ["--schedule", "wsd", "--decay-steps", "2", "--init-from"]
    assert "only a constant-lr run" in err("--steps", "6", *wsd, str(tmp_path / "cos"))
    assert "neither a training run" in err("--steps", "6", *wsd, str(tmp_path / "nothing"))
    assert "past step 3 where this run's decay starts" in err("--steps", "5", *wsd, str(tmp_path / "const"))
    text = err("--steps", "6", "--lr", "1e-3", *wsd, str(tmp_path / "const"))
    assert "other settings (lr differ)" in text
    assert not (tmp_path / "b" / "checkpoint").exists()  # nothing copied by a refused start


def test_a_run_goes_on_from_a_shipped_snapshots_weights_with_a_fresh_optimiser(demos, tmp_path, capsys):
    """runs/ is lost with the machine; the shipped fp16 copy of a snapshot is not. `--init-from` that copy
    starts the weights and their EMA at it, the optimiser empty, the log and step where it stopped."""
    import shutil

    from conftest import TINY_DIFFUSION_POLICY
    from safetensors.torch import load_file

    from divla_eval.policy import POLICIES
    from divla_eval.train import TrainConfig, _start_from, parse_model_options

    _train(demos, tmp_path / "src", 4, "--schedule", "constant", "--snapshot-every", "4")
    snap = tmp_path / "src" / "snapshots" / "step-0000004"
    meta = json.loads((snap / "diffusion_policy_meta.json").read_text())
    shipped = tmp_path / "shipped"
    policy = POLICIES.get("diffusion_policy").from_pretrained(snap)
    policy.save_pretrained(shipped, half=True, meta={**meta, "dtype": "float16"})
    shutil.copy2(tmp_path / "src" / "train_log.jsonl", shipped / "train_log.jsonl")

    out = tmp_path / "goes_on"
    argv = ["--schedule", "wsd", "--decay-steps", "2", "--init-from", str(shipped)]
    _train(demos, out, 6, *argv)
    log = [json.loads(x) for x in (out / "train_log.jsonl").open()]
    assert [r["step"] for r in log] == [0, 3, 5]  # the source's rows before step 4, then its own
    saved = json.loads((out / "diffusion_policy_meta.json").read_text())
    assert saved["steps"] == 6 and saved["init_from"] == {
        "checkpoint": str(shipped.resolve()),
        "step": 4,
        "weights": "ema",
        "dtype": "float16",
        "optimizer": "fresh",
    }
    from divla_eval.curves import _started_from

    assert f"started at step 4 from the weights saved in `{shipped.resolve()}`" in _started_from(out)
    # where it started: the shipped weights (widened to fp32) as both the weights and their EMA
    start = tmp_path / "start"
    options = parse_model_options("diffusion_policy", dict(TINY_DIFFUSION_POLICY))
    cfg = TrainConfig("diffusion_policy", (demos,), str(start), steps=6, batch_size=4, schedule="wsd")
    cfg.decay_steps, cfg.init_from, cfg.options = 2, str(shipped), options
    _start_from(cfg)
    want = {k: v.float() for k, v in load_file(str(shipped / "model.safetensors")).items()}
    for part in ("checkpoint", "checkpoint/ema"):
        got = load_file(str(start / part / "model.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not (start / "checkpoint" / "optimizer.pt").exists()
    assert json.loads((start / "checkpoint" / "trainer_state.json").read_text())["optimizer"] == "fresh"
    # the run's own first checkpoint holds its optimiser: a later resume loads it
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert "optimizer" not in state and (out / "checkpoint" / "optimizer.pt").is_file()

    # a snapshot still inside its run: the log comes from the run
    _train(
        demos, tmp_path / "from_snap", 6, "--schedule", "wsd", "--decay-steps", "2", "--init-from", str(snap)
    )
    log = [json.loads(x) for x in (tmp_path / "from_snap" / "train_log.jsonl").open()]
    assert [r["step"] for r in log] == [0, 3, 5]

    # a saved policy that is not a prefix of this run is refused in one line, as a run is
    base = ["train", "--policy", "diffusion_policy", "--demos", str(demos), "--out", str(tmp_path / "x")]
    base += ["--steps", "6", "--batch-size", "4", "--no-progress", *argv]
    base += [f"--model-option={k}={json.dumps(v)}" for k, v in TINY_DIFFUSION_POLICY.items()]
    capsys.readouterr()
    assert main([*base, "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "other settings (lr differ)" in err and err.count("\n") == 1
    # recorded on another machine: the demos match by file name, not by absolute path
    meta_path = shipped / "diffusion_policy_meta.json"
    moved = json.loads(meta_path.read_text())
    moved["train_config"]["demos"] = "/elsewhere/data/" + demos.name
    meta_path.write_text(json.dumps(moved))
    assert main([*base, "--out", str(tmp_path / "elsewhere")]) == 0
    moved["train_config"]["demos"] = "/elsewhere/data/other.hdf5"
    meta_path.write_text(json.dumps(moved))
    capsys.readouterr()
    assert main(base) == 2
    assert "(demos differ)" in capsys.readouterr().err
    meta_path.unlink()
    assert main(base) == 2
    assert "no diffusion_policy_meta.json" in capsys.readouterr().err
