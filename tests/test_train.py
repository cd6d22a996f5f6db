"""`divla-eval train`: a tiny DiVLA trains, checkpoints, resumes, refuses mismatches, then evaluates."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from divla_eval.cli import main  # noqa: E402

TINY = {
    "view_tokens": [4, 1],
    "image_size": 28,
    "vision_hidden": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "text_hidden": 32,
    "text_layers": 1,
    "text_heads": 2,
    "text_kv_heads": 1,
    "text_intermediate": 64,
    "vocab_size": 300,
    "max_reasoning_tokens": 4,
    "num_action_tokens": 2,
    "projector_dim": 16,
    "chunk": 8,
    "execute_steps": 4,
    "action_latent": 16,
    "proprio_latent": 8,
    "unet_down_dims": [16, 32],
    "step_embed_dim": 16,
    "train_diffusion_steps": 20,
    "inference_steps": 2,
}


def _train(demos, out, steps, *extra):
    opts = [f"--model-option={k}={json.dumps(v)}" for k, v in TINY.items()]
    argv = ["train", "--demos", str(demos), "--out", str(out), "--steps", str(steps), "--batch-size", "4"]
    return main([*argv, "--checkpoint-every", "3", "--no-progress", "--task", "bin_picking", *opts, *extra])


def test_train_checkpoints_resumes_and_evaluates(demos, tmp_path, capsys, monkeypatch):
    out = tmp_path / "divla"
    assert _train(demos, out, 6) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "losses.png", "train_log.jsonl"):
        assert (out / name).is_file(), name
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 6
    # the policy saved in OUT is the EMA of the weights; the raw ones stay in checkpoint/ for resuming
    from safetensors.torch import load_file

    assert json.loads((out / "divla_meta.json").read_text())["weights"] == "ema"
    saved, raw = load_file(out / "model.safetensors"), load_file(out / "checkpoint" / "model.safetensors")
    assert (out / "checkpoint" / "ema" / "model.safetensors").is_file()
    assert saved.keys() == raw.keys() and not all((saved[k] == raw[k]).all() for k in saved)
    assert "trained divla for 6 steps" in capsys.readouterr().out

    # more steps: resumes from step 6 instead of starting over (another thread count is allowed)
    assert _train(demos, out, 9, "--threads", "1") == 0
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 5, 8]  # logged every 10 and at the last step of each session
    assert rows[2]["seconds"] > rows[1]["seconds"]  # training time counts on across the resume
    assert json.loads((out / "divla_meta.json").read_text())["steps"] == 9
    assert all(r["loss"] > 0 for r in rows)

    assert _train(demos, out, 12, "--lr", "0.1") == 2  # other settings: refused, not mixed
    assert "lr differ" in capsys.readouterr().err

    run_dir = tmp_path / "run"
    argv = ["run", "--policy", "divla", "--checkpoint", str(out), "--episodes", "1", "--max-steps", "8"]
    assert main([*argv, "--image-size", "28", "--out", str(run_dir), "--no-progress"]) == 0
    record = json.loads((run_dir / "episodes.jsonl").read_text().splitlines()[0])
    assert record["policy"] == "divla" and record["checkpoint_hash"]
    assert record["latency_ms"]["n"] == 2  # 8 steps, 4 executed per call
    assert [r["step"] for r in record["reasoning_trace"]] == [0, 4]  # one entry per policy call
    assert all(isinstance(r["text"], str) for r in record["reasoning_trace"])
    # every call's phrase is scored against the shadow expert's phrase for the same state
    assert all("expert" in r for r in record["reasoning_trace"])
    assert record["reasoning_trace"][0]["expert"].startswith("grasp the")
    assert 0.0 <= record["reasoning_accuracy"] <= 1.0
    assert main(["report", str(run_dir)]) == 0
    assert "## Reasoning accuracy" in (run_dir / "report.md").read_text()

    # a reference checkpoint shipped for the task becomes `divla-eval run`'s default policy
    import shutil

    import divla_eval.policy

    shutil.copytree(out, tmp_path / "ref" / "divla-bin_picking")
    monkeypatch.setattr(divla_eval.policy, "REFERENCE_DIR", tmp_path / "ref")
    capsys.readouterr()
    argv = ["run", "--episodes", "1", "--max-steps", "4", "--image-size", "28", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "default")]) == 0
    assert "reference DiVLA checkpoint" in capsys.readouterr().err
    record = json.loads((tmp_path / "default" / "episodes.jsonl").read_text().splitlines()[0])
    assert record["policy"] == "divla"


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--model-option", "chunk=abc"], "chunk='abc': expected int"),
        (["--model-option", "reasoning_injection=ture"], "expected bool"),
        (["--model-option", "view_tokens=[4]"], "one token count per camera"),
        (["--model-option", "vlm_pretrained=/nonexistent"], "is not a directory"),
        (["--model-option", "bogus=1"], "unknown DiVLA option"),
    ],
)
def test_bad_training_options_are_one_line_errors(demos, tmp_path, capsys, extra, needle):
    argv = ["train", "--demos", str(demos), "--out", str(tmp_path / "x"), "--steps", "1", "--no-progress"]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("divla-eval: error:") and needle in err and len(err.strip().splitlines()) == 1


def test_a_foreign_hdf5_file_is_refused(tmp_path, capsys):
    import h5py

    h5py.File(tmp_path / "other.hdf5", "w").close()
    assert main(["train", "--demos", str(tmp_path / "other.hdf5"), "--out", str(tmp_path / "x")]) == 2
    assert "not a `divla-eval collect` file" in capsys.readouterr().err


def test_demos_from_an_older_format_are_refused(demos, tmp_path, capsys):
    import shutil

    import h5py

    old = tmp_path / "old.hdf5"
    shutil.copy(demos, old)
    with h5py.File(old, "r+") as f:
        env_args = json.loads(f["data"].attrs["env_args"])
        env_args["format_version"] = 1
        f["data"].attrs["env_args"] = json.dumps(env_args)
    assert main(["train", "--demos", str(old), "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "recorded in format 1" in err and "collect it again" in err


def test_training_on_several_demo_files(demos, tmp_path, capsys):
    """`--demos A --demos B` trains one policy on both (a multi-task model); both are recorded."""
    import shutil

    import h5py

    other = tmp_path / "copy.hdf5"
    shutil.copy(demos, other)
    assert _train(demos, tmp_path / "two", 2, "--demos", str(other)) == 0
    meta = json.loads((tmp_path / "two" / "divla_meta.json").read_text())
    assert meta["demos"] == [str(demos), str(other)]
    with h5py.File(other, "r+") as f:  # a bimanual file cannot join single-arm ones
        env_args = json.loads(f["data"].attrs["env_args"])
        env_args["env_kwargs"]["task"] = "bussing"
        f["data"].attrs["env_args"] = json.dumps(env_args)
    argv = ["train", "--demos", str(demos), "--demos", str(other), "--out", str(tmp_path / "x")]
    assert main([*argv, "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "share the embodiment" in err and len(err.strip().splitlines()) == 1
