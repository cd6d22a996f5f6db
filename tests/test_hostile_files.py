"""Every command survives hostile input files: a file with the right name and the wrong content.

Each damaged file (a checkpoint's config.json, a demonstrations file, a run's manifest.json and
episodes.jsonl, a training run's trainer_state.json) is handed to every command that reads it, and
each must end in exactly one line on stderr, `divla-eval: error: ...`, naming the file, with exit
code 2 and no traceback. Property-based tests then feed arbitrary JSON into the record and manifest
readers. Everything here is written by the tests themselves and tiny; no simulator episode runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from divla_eval.cli import main
from divla_eval.errors import DivlaEvalError
from divla_eval.records import EpisodeRecord, EpisodeStore, read_manifest, write_manifest

# --- helpers -------------------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        sys.exit(main([str(a) for a in argv]))
    return exc.value.code, capsys.readouterr().err


def assert_one_line_naming(code: int, err: str, file: Path) -> None:
    """Exit 2, one `divla-eval: error:` line, no traceback, and the file named (its full path, or its
    directory's path and its name)."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("divla-eval: error: "), err
    assert str(file) in lines[0] or (str(file.parent) in lines[0] and file.name in lines[0]), lines[0]


def record(i: int = 0, **overrides) -> dict:
    fields = {
        "run_id": "r0",
        "task": "bin_picking",
        "task_version": "1",
        "split": "seen",
        "difficulty": None,
        "episode_index": i,
        "episode_key": f"bin_picking/seen/-/none/{i:05d}",
        "seed": 1000 + i,
        "object_ids": ["apple"],
        "instruction": "put the apple in the bin",
        "perturbations": [{"name": "lighting", "level": 2, "ambient": [0.1, 0.1, 0.1]}],
        "policy": "random",
        "checkpoint_hash": None,
        "success": i % 2 == 0,
        "partial_score": 0.5,
        "failure_mode": None if i % 2 == 0 else "no_grasp",
        "steps": 100,
        "wall_time_s": 1.5,
        "latency_ms": {"n": 10, "mean": 2.0, "p50": 1.9, "p95": 3.0},
        "reasoning_trace": [{"step": 0, "text": "grasp the apple", "expert": "grasp the apple"}],
        "status": "ok",
        "error": None,
    }
    fields.update(overrides)
    return fields


def line(d) -> bytes:
    return json.dumps(d).encode() + b"\n"


def run_config(**over) -> dict:
    """The config `divla-eval run --policy random --episodes 1` writes (what a resume must match)."""
    from divla_eval.policy import parse_policy_options
    from divla_eval.runner import RunConfig
    from divla_eval.tasks import get_task, parse_task_options

    cfg = RunConfig(
        task="bin_picking",
        split="unseen",
        policy="random",
        difficulty=get_task("bin_picking").difficulties[0],
        episodes=1,
        task_options=parse_task_options("bin_picking", {}),
        policy_options=parse_policy_options("random", {}),
    )
    return {**cfg.as_dict(), **over}


def manifest(**over) -> dict:
    from divla_eval.tasks import get_task

    return {"config": run_config(), "run_id": "r0", "task_version": get_task("bin_picking").version, **over}


def make_run(root: Path, episodes: bytes | None = None, manifest_bytes: bytes | None = None) -> Path:
    """A run directory: good records and manifest unless replaced."""
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "episodes.jsonl").write_bytes(line(record(0)) + line(record(1)) if episodes is None else episodes)
    if manifest_bytes is None:
        (run / "manifest.json").write_text(json.dumps(manifest()))
    else:
        (run / "manifest.json").write_bytes(manifest_bytes)
    return run


# --- episode records (episodes.jsonl) ------------------------------------------------------------------

GOOD = line(record(0))
RECORD_CASES = {
    "success 'maybe'": GOOD + line(record(1, success="maybe")),
    "a JSON list": line([1, 2]) + GOOD,
    "binary bytes": b"\xff\xfe\x00\x89PNG\x00\x01\n" + GOOD,
    "garbled middle line": GOOD + b"{garbage\n" + line(record(1)),
    "fields missing": line({"task": "bin_picking"}) + GOOD,
    "latency a string": GOOD + line(record(1, latency_ms={"n": "many"})),
    "trace text a number": GOOD + line(record(1, reasoning_trace=[{"step": 0, "text": 5}])),
    "perturbations a string": GOOD + line(record(1, perturbations="lighting")),
    "status unknown": GOOD + line(record(1, status="maybe")),
    "index a float": GOOD + line(record(1, episode_index=1.5)),
    "object ids a string": GOOD + line(record(1, object_ids="apple")),
    "score NaN": GOOD + json.dumps(record(1, partial_score=math.nan)).encode() + b"\n",
    "nested a million deep": GOOD + b"[" * 200_000 + b"\n" + line(record(1)),
    "integer of 5000 digits": GOOD + b'{"seed": ' + b"1" * 5000 + b"}\n" + line(record(1)),
}
RECORD_COMMANDS = {
    "report": lambda run: ["report", run],
    "summary": lambda run: ["summary", run.parent],
    "tables": lambda run: ["tables", run.parent, "--out", run.parent / "t.md"],
    "compare": lambda run: ["compare", run, run],
    "run (resume)": lambda run: ["run", "--policy", "random", "--episodes", 1, "--out", run, "--no-progress"],
}


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
@pytest.mark.parametrize("command", sorted(RECORD_COMMANDS))
def test_damaged_records(tmp_path, capsys, command, case):
    run = make_run(tmp_path, episodes=RECORD_CASES[case])
    code, err = run_cli(RECORD_COMMANDS[command](run), capsys)
    assert_one_line_naming(code, err, run / "episodes.jsonl")


@pytest.mark.parametrize("command", ["summary", "tables", "run (resume)"])
def test_records_file_that_is_a_directory(tmp_path, capsys, command):
    run = make_run(tmp_path)
    (run / "episodes.jsonl").unlink()
    (run / "episodes.jsonl").mkdir()
    code, err = run_cli(RECORD_COMMANDS[command](run), capsys)
    assert_one_line_naming(code, err, run / "episodes.jsonl")


def test_a_torn_last_line_is_cut_off_before_appending_and_kept(tmp_path):
    """A garbled last line that ends in a newline is skipped by `load`; appending after it used to
    make it a garbled middle line, and the file unreadable at the next resume."""
    path = tmp_path / "episodes.jsonl"
    path.write_bytes(GOOD + b'{"run_id": "r0", "task": "bin_pi\n\n')
    store = EpisodeStore(path)
    with pytest.warns(UserWarning, match="truncated"):
        assert [r.episode_index for r in store.load()] == [0]
    with pytest.warns(UserWarning, match="kept in"):
        store.append(EpisodeRecord.from_dict(record(1)))
    assert [r.episode_index for r in EpisodeStore(path).load()] == [0, 1]  # no warning, no error
    assert (tmp_path / "episodes.jsonl.torn").read_bytes() == b'{"run_id": "r0", "task": "bin_pi\n'


def test_a_complete_last_record_before_blank_lines_is_kept(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_bytes(GOOD + line(record(1)) + b"\n \n")
    EpisodeStore(path).append(EpisodeRecord.from_dict(record(2)))
    assert [r.episode_index for r in EpisodeStore(path).load()] == [0, 1, 2]
    assert not (tmp_path / "episodes.jsonl.torn").exists()


# --- run manifests (manifest.json) ---------------------------------------------------------------------

MANIFEST_CASES = {
    "config a string": json.dumps(manifest(config="bin_picking")).encode(),
    "a JSON list": b"[1, 2]",
    "binary bytes": b"\x89HDF\r\n\x1a\n\x00\x00\xff",
    "empty file": b"",
    "no config": json.dumps({"run_id": "r0"}).encode(),
    "checkpoint a number": json.dumps(manifest(config=run_config(checkpoint=5))).encode(),
    "perturbation pairs cut": json.dumps(manifest(config=run_config(perturbations=[["lighting"]]))).encode(),
    "extended a number": json.dumps(manifest(extended=3)).encode(),
    "packages a list": json.dumps(manifest(packages=["numpy"])).encode(),
    "run id a number": json.dumps(manifest(run_id=7)).encode(),
    "run id missing": json.dumps({k: v for k, v in manifest().items() if k != "run_id"}).encode(),
    "nested a million deep": b'{"config": ' + b"[" * 200_000,
}
MANIFEST_COMMANDS = {k: v for k, v in RECORD_COMMANDS.items() if k != "compare"}  # compare reads none


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
@pytest.mark.parametrize("command", sorted(MANIFEST_COMMANDS))
def test_damaged_manifest(tmp_path, capsys, command, case):
    run = make_run(tmp_path, manifest_bytes=MANIFEST_CASES[case])
    code, err = run_cli(MANIFEST_COMMANDS[command](run), capsys)
    assert_one_line_naming(code, err, run / "manifest.json")


@pytest.mark.parametrize("command", sorted(MANIFEST_COMMANDS))
def test_manifest_that_is_a_directory(tmp_path, capsys, command):
    run = make_run(tmp_path)
    (run / "manifest.json").unlink()
    (run / "manifest.json").mkdir()
    code, err = run_cli(MANIFEST_COMMANDS[command](run), capsys)
    assert_one_line_naming(code, err, run / "manifest.json")


# --- checkpoints (config.json) -------------------------------------------------------------------------


def _default_config(policy: str) -> dict:
    from divla_eval.baselines.diffusion_policy.config import DiffusionPolicyConfig
    from divla_eval.baselines.octo.config import OctoConfig
    from divla_eval.baselines.openvla.config import OpenVLAConfig
    from divla_eval.divla.config import DiVLAConfig

    cls = {
        "divla": DiVLAConfig,
        "diffusion_policy": DiffusionPolicyConfig,
        "octo": OctoConfig,
        "openvla": OpenVLAConfig,
    }[policy]
    return json.loads(json.dumps(dataclasses.asdict(cls())))


def _with(policy: str, **fields) -> bytes:
    return json.dumps({**_default_config(policy), **fields}).encode()


CONFIG_CASES = {
    "a JSON list": lambda p: b"[1, 2]",
    "binary bytes": lambda p: b"\x00\xff\xfe\x89safetensors",
    "empty file": lambda p: b"",
    "chunk a string": lambda p: _with(p, chunk="16") if p != "openvla" else _with(p, n_bins="256"),
    "chunk true": lambda p: _with(p, chunk=True) if p != "openvla" else _with(p, n_bins=True),
    "image size null": lambda p: _with(p, image_size=None),
    "cameras of numbers": lambda p: _with(p, cameras=[1, 2]),
    "inf where an int belongs": lambda p: _with(p, image_size=math.inf),
    "unknown key": lambda p: _with(p, bogus=1),
    "inconsistent": lambda p: _with(p, execute_steps=99) if p != "openvla" else _with(p, n_bins=1),
    "zero or negative sizes": lambda p: {
        "divla": _with(p, view_tokens=[-4, 16]),
        "openvla": _with(p, view_tokens=[-4, 16]),
        "octo": _with(p, heads=0),
        "diffusion_policy": _with(p, unet_groups=0),
    }[p],
    "nested wrong type": lambda p: {
        "divla": _with(p, embodiments={"panda": [7, "x"]}),
        "openvla": _with(p, text_config=[1]),
        "diffusion_policy": _with(p, encoder_channels=["a"]),
        "octo": _with(p, stem_channels={"a": 1}),
    }[p],
    "nested a million deep": lambda p: b'{"chunk": ' + b"[" * 200_000,
    "integer of 5000 digits": lambda p: b'{"chunk": ' + b"9" * 5000 + b"}",
}
POLICIES = ("divla", "diffusion_policy", "octo", "openvla")
CHECKPOINT_COMMANDS = {
    "run": lambda pol, ck: ["run", "--policy", pol, "--checkpoint", ck, "--episodes", 1, "--no-progress"],
    "serve": lambda pol, ck: ["serve", "--policy", pol, "--checkpoint", ck, "--port", 0],
}


def make_checkpoint(root: Path, policy: str, config: bytes) -> Path:
    ckpt = root / f"{policy}-ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_bytes(config)
    (ckpt / "model.safetensors").write_bytes(b"not looked at before config.json is valid")
    (ckpt / "tokenizer.json").write_text("{}")
    return ckpt


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("command", sorted(CHECKPOINT_COMMANDS))
def test_damaged_checkpoint_config(tmp_path, capsys, command, policy, case):
    ckpt = make_checkpoint(tmp_path, policy, CONFIG_CASES[case](policy))
    code, err = run_cli(CHECKPOINT_COMMANDS[command](policy, ckpt), capsys)
    assert_one_line_naming(code, err, ckpt / "config.json")


@pytest.mark.parametrize("policy", POLICIES)
def test_damaged_checkpoint_config_in_bench(tmp_path, capsys, policy):
    ckpt = make_checkpoint(tmp_path, policy, b"[1, 2]")
    argv = ["bench", "--policies", policy, "--checkpoint", f"{policy}={ckpt}", "--no-progress"]
    code, err = run_cli(argv, capsys)
    assert_one_line_naming(code, err, ckpt / "config.json")


@pytest.mark.parametrize("policy", POLICIES)
def test_config_json_that_is_a_directory(tmp_path, capsys, policy):
    ckpt = make_checkpoint(tmp_path, policy, b"{}")
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").mkdir()
    code, err = run_cli(CHECKPOINT_COMMANDS["run"](policy, ckpt), capsys)
    assert_one_line_naming(code, err, ckpt / "config.json")


# --- demonstrations files (train --demos) --------------------------------------------------------------

ENV_ARGS = {
    "env_name": "DivlaBinPicking-v0",
    "type": 2,
    "env_kwargs": {
        "task": "bin_picking",
        "split": "seen",
        "difficulty": None,
        "perturbations": [],
        "cameras": ["front", "wrist"],
        "image_size": 28,
        "max_steps": None,
        "task_options": {},
        "run_seed": 1000,
    },
    "task": "bin_picking",
    "format_version": 2,
}


def write_demos(path: Path, steps: int = 4, demos: int = 2, size: int = 28) -> Path:
    """A small demonstrations file in `divla-eval collect`'s layout (random actions, blank images)."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps(
            {**ENV_ARGS, "env_kwargs": {**ENV_ARGS["env_kwargs"], "image_size": size}}
        )
        for i in range(demos):
            g = data.create_group(f"demo_{i}")
            g.create_dataset("actions", data=rng.uniform(-1, 1, (steps, 7)).astype(np.float32))
            g.create_dataset("obs/proprio", data=rng.normal(size=(steps, 11)).astype(np.float32))
            for cam in ("front", "wrist"):
                frames = rng.integers(0, 255, (steps, size, size, 3), dtype=np.uint8)
                g.create_dataset(f"obs/{cam}_image", data=frames)
            phrases = np.array(["grasp the apple"] * steps, dtype=object)
            g.create_dataset("reasoning", data=phrases, dtype=h5py.string_dtype())
            g.attrs["instruction"] = "put the apple in the bin"
            g.attrs["num_samples"] = steps
        mask = f.create_group("mask")
        mask.create_dataset("train", data=np.array([f"demo_{i}".encode() for i in range(demos)]))
    return path


def _replace(key: str, value):
    def edit(f):
        del f[key]
        f[key] = value

    return edit


def _set(key: str, index, value):
    def edit(f):
        f[key][index] = value

    return edit


def _env_args(**changes):
    def edit(f):
        f["data"].attrs["env_args"] = json.dumps({**ENV_ARGS, **changes})

    return edit


def _env_kwargs(**changes):
    return _env_args(env_kwargs={**ENV_ARGS["env_kwargs"], **changes})


def _delete(key: str):
    def edit(f):
        del f[key]

    return edit


def _attr(key: str, name: str, value=None):
    def edit(f):
        if value is None:
            del f[key].attrs[name]
        else:
            f[key].attrs[name] = value

    return edit


DEMO_CASES = {
    "env_args not JSON": _attr("data", "env_args", "{not json"),
    "env_args a list": _attr("data", "env_args", "[1, 2]"),
    "env_args binary": _attr("data", "env_args", np.void(b"\xff\xfe\x00")),
    "task a number": _env_kwargs(task=5),
    "task unknown": _env_kwargs(task="juggling"),
    "image size a string": _env_kwargs(image_size="big"),
    "older format": _env_args(format_version=1),
    "mask names a missing demo": _replace("mask/train", np.array([b"demo_0", b"demo_7"])),
    "mask lists a demo twice": _replace("mask/train", np.array([b"demo_0", b"demo_0"])),
    "mask of numbers": _replace("mask/train", np.array([0, 1])),
    "demo without actions": _delete("data/demo_1/actions"),
    "actions of width 6": _replace("data/demo_1/actions", np.zeros((4, 6), np.float32)),
    "actions 1-D": _replace("data/demo_1/actions", np.zeros(4, np.float32)),
    "actions of text": _replace("data/demo_1/actions", np.array([[b"x"] * 7] * 4)),
    "NaN action": _set("data/demo_1/actions", (2, 3), np.nan),
    "inf proprioception": _set("data/demo_0/obs/proprio", (1, 0), np.inf),
    "proprioception of width 4": _replace("data/demo_0/obs/proprio", np.zeros((4, 4), np.float32)),
    "proprioception too short": _replace("data/demo_0/obs/proprio", np.zeros((3, 11), np.float32)),
    "reasoning too short": _replace("data/demo_0/reasoning", np.array([b"a", b"b"])),
    "float images": _replace("data/demo_0/obs/front_image", np.zeros((4, 28, 28, 3), np.float32)),
    "images of another size": _replace("data/demo_0/obs/front_image", np.zeros((4, 16, 16, 3), np.uint8)),
    "no wrist images": _delete("data/demo_0/obs/wrist_image"),
    "no instruction": _attr("data/demo_0", "instruction"),
    "interrupted demo": _attr("data/demo_1", "num_samples"),
    "num_samples disagrees": _attr("data/demo_1", "num_samples", 9),
    "a demo named demo_x": lambda f: f["data"].create_group("demo_x"),
    "no data group": _delete("data"),
}


@pytest.mark.parametrize("case", sorted(DEMO_CASES))
def test_damaged_demonstrations(tmp_path, capsys, case):
    demos = write_demos(tmp_path / "demos.hdf5")
    with h5py.File(demos, "r+") as f:
        DEMO_CASES[case](f)
    argv = ["train", "--demos", demos, "--out", tmp_path / "out", "--steps", 1, "--batch-size", 4]
    code, err = run_cli([*argv, "--no-progress", "--threads", 1], capsys)
    assert_one_line_naming(code, err, demos)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "contents", [b"plain text, not HDF5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 64], ids=["text", "torn HDF5"]
)
def test_demonstrations_that_are_not_hdf5(tmp_path, capsys, contents):
    demos = tmp_path / "demos.hdf5"
    demos.write_bytes(contents)
    code, err = run_cli(["train", "--demos", demos, "--out", tmp_path / "out"], capsys)
    assert_one_line_naming(code, err, demos)


def test_demonstrations_path_that_is_a_directory(tmp_path, capsys):
    (tmp_path / "demos.hdf5").mkdir()
    code, err = run_cli(["train", "--demos", tmp_path / "demos.hdf5", "--out", tmp_path / "out"], capsys)
    assert_one_line_naming(code, err, tmp_path / "demos.hdf5")


# --- training output directories -----------------------------------------------------------------------


def test_train_out_that_is_a_file(tmp_path, capsys):
    demos = write_demos(tmp_path / "demos.hdf5")
    (tmp_path / "out").write_text("a file")
    code, err = run_cli(["train", "--demos", demos, "--out", tmp_path / "out"], capsys)
    assert_one_line_naming(code, err, tmp_path / "out")
    assert "is a file, not a directory" in err


def test_two_trainings_into_one_out_are_refused(tmp_path, capsys):
    """The second `train` into an --out that another process holds stops before touching it (the lock
    is `divla-eval run`'s; holding it here stands for the other process)."""
    from divla_eval.runner import exclusive

    demos = write_demos(tmp_path / "demos.hdf5")
    out = tmp_path / "out"
    with exclusive(out):
        argv = ["train", "--demos", demos, "--out", out, "--steps", 1, "--batch-size", 4, "--no-progress"]
        code, err = run_cli(argv, capsys)
    assert_one_line_naming(code, err, out)
    assert "another divla-eval process is writing into" in err
    assert not (out / "train_log.jsonl").exists()


STATE_CASES = {
    "a JSON list": b"[1]",
    "binary bytes": b"\xff\x00\xfe",
    "no step": json.dumps({"key": {}}).encode(),
    "step a string": json.dumps({"step": "10", "key": {}}).encode(),
    "negative step": json.dumps({"step": -3, "key": {}}).encode(),
    "key a list": json.dumps({"step": 2, "key": []}).encode(),
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
@pytest.mark.parametrize("command", ["train", "curve"])
def test_damaged_trainer_state(tmp_path, capsys, command, case):
    demos = write_demos(tmp_path / "demos.hdf5")
    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    state = out / "checkpoint" / "trainer_state.json"
    state.write_bytes(STATE_CASES[case])
    if command == "train":
        argv = ["train", "--demos", demos, "--out", out, "--steps", 1, "--batch-size", 4, "--no-progress"]
    else:
        argv = ["curve", out, "--task", "bin_picking", "--out", tmp_path / "curve", "--no-progress"]
    code, err = run_cli(argv, capsys)
    assert_one_line_naming(code, err, state)


TINY = {
    "view_tokens": [4, 1],
    "image_size": 28,
    "vision_hidden": 16,
    "vision_layers": 1,
    "vision_heads": 2,
    "text_hidden": 16,
    "text_layers": 1,
    "text_heads": 2,
    "text_kv_heads": 1,
    "text_intermediate": 32,
    "vocab_size": 280,
    "max_reasoning_tokens": 4,
    "num_action_tokens": 1,
    "projector_dim": 8,
    "chunk": 4,
    "execute_steps": 2,
    "action_latent": 8,
    "proprio_latent": 8,
    "unet_down_dims": [8, 16],
    "step_embed_dim": 8,
    "train_diffusion_steps": 10,
    "inference_steps": 2,
}


def test_a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """The loss turns NaN at step 3: training stops there with one line, before that update, and the
    checkpoint of step 2 stays; a damaged optimizer state in it is then one line too."""
    import torch

    from divla_eval import train as train_module

    recipe = train_module.RECIPES.get("divla")
    calls = {"n": 0}

    def nan_at_step_3(model, batch, generator):
        losses = recipe.loss(model, batch, generator)
        calls["n"] += 1
        if calls["n"] == 4:  # the fourth step is step 3
            losses["loss"] = losses["loss"] * torch.tensor(float("nan"))
        return losses

    monkeypatch.setattr(
        train_module.RECIPES, "get", lambda name: dataclasses.replace(recipe, loss=nan_at_step_3)
    )
    demos = write_demos(tmp_path / "demos.hdf5")
    out = tmp_path / "out"
    argv = ["train", "--demos", demos, "--out", out, "--steps", 6, "--batch-size", 4, "--no-progress"]
    argv += ["--checkpoint-every", 2, "--threads", 1, "--ema-decay", 0, "--device", "cpu"]
    argv += [f"--model-option={k}={json.dumps(v)}" for k, v in TINY.items()]
    code, err = run_cli(argv, capsys)
    assert_one_line_naming(code, err, out / "checkpoint")
    assert "diverged at step 3" in err and "last good checkpoint (step 2)" in err
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert not (out / "model.safetensors").exists()  # no policy saved from the diverged weights
    last_row = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
    assert last_row["step"] < 3 and all(math.isfinite(v) for v in last_row.values())

    monkeypatch.undo()
    (out / "checkpoint" / "optimizer.pt").write_bytes(b"not a torch file")
    code, err = run_cli(argv, capsys)
    assert_one_line_naming(code, err, out / "checkpoint" / "optimizer.pt")


# --- property-based: arbitrary JSON into the record and manifest readers -------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
RECORD_FIELDS = sorted(f.name for f in dataclasses.fields(EpisodeRecord))
PROPERTY = settings(
    max_examples=int(os.environ.get("DIVLA_HYPOTHESIS_EXAMPLES", "120")),  # more: a longer hunt
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _use_records(records) -> None:
    """What every reader of records does with them: tables, rates, labels."""
    from divla_eval.metrics import records_frame, success_table

    success_table(records_frame(records), ["task", "split", "perturbation"])
    for r in records:
        EpisodeRecord.from_dict(json.loads(r.to_json()))


@PROPERTY
@given(field=st.sampled_from(RECORD_FIELDS), value=JSON)
def test_any_json_in_any_record_field_is_read_or_refused(field, value):
    try:
        rec = EpisodeRecord.from_dict(record(0, **{field: value}))
    except DivlaEvalError:
        return
    _use_records([rec])


@PROPERTY
@given(data=JSON)
def test_any_json_line_is_read_or_refused(tmp_path, data):
    path = tmp_path / "episodes.jsonl"
    path.write_bytes(json.dumps(data).encode() + b"\n" + GOOD)
    try:
        records = EpisodeStore(path).load()
    except DivlaEvalError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return
    _use_records(records)


def _use_manifest(run_dir: Path, data: dict) -> None:
    from divla_eval.records import check_manifest_compatible
    from divla_eval.report import _checkpoint_label, _config_bullets

    _config_bullets(data)
    _checkpoint_label(run_dir)
    try:
        check_manifest_compatible(run_dir, run_config())
    except DivlaEvalError:
        pass


@PROPERTY
@given(
    where=st.sampled_from(["top", "config"]),
    key=st.sampled_from(
        sorted(manifest()) + sorted(run_config()) + ["environment", "extended", "policy_info", "new"]
    ),
    value=JSON,
)
def test_any_json_in_any_manifest_field_is_read_or_refused(tmp_path, where, key, value):
    data = manifest()
    if where == "top":
        data[key] = value
    else:
        data["config"][key] = value
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    try:
        read = read_manifest(tmp_path)
    except DivlaEvalError as exc:
        assert "manifest.json" in str(exc) and "\n" not in str(exc)
        return
    _use_manifest(tmp_path, read)


@PROPERTY
@given(data=JSON)
def test_any_json_document_as_a_manifest_is_read_or_refused(data):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        (run_dir / "manifest.json").write_text(json.dumps(data))
        try:
            read = read_manifest(run_dir)
        except DivlaEvalError:
            return
        _use_manifest(run_dir, read)


def test_write_manifest_round_trips_through_the_checks(tmp_path):
    write_manifest(tmp_path, run_config(), {"run_id": "r0", "task_version": "1", "extended": []})
    assert read_manifest(tmp_path)["run_id"] == "r0"
