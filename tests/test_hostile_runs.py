"""Hostile input, broken files, full disks and dying processes: every command ends in one line and exit
code 2 (never a traceback), or, for a fault inside an episode, records that episode as `error` and goes
on; nothing finished is lost and nothing is run twice.

The default part is fast (tiny episodes, simulated disk errors); the real full disk (a small tmpfs,
mounted when this runs as root), read-only filesystems and killed processes are marked `slow`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from divla_eval.cli import main
from divla_eval.policy import ActionChunk, PolicyMetadata

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--policy", "random", "--max-steps", "3", "--no-progress"]


# --- policies that misbehave (imported by name: --policy test_hostile_runs:Name) ----------------------
class ExitingPolicy:
    """Calls sys.exit in the first call of episode 0; other episodes run normally."""

    def __init__(self, action_dim: int = 7):
        self.action_dim = action_dim
        self.metadata = PolicyMetadata(name="exiting")
        self.episode = 0

    def reset(self, instruction: str, seed: int) -> None:
        self.episode += 1

    def infer(self, obs) -> ActionChunk:
        if self.episode == 1:
            sys.exit(3)
        return ActionChunk(np.zeros((1, self.action_dim)))


class ExitingAtBuild:
    """Calls sys.exit while being built."""

    def __init__(self, action_dim: int = 7):
        sys.exit("no GPU, giving up")

    def reset(self, instruction: str, seed: int) -> None: ...

    def infer(self, obs): ...


class CorruptingPolicy:
    """Privileged (it reaches the simulator, like the scripted expert): in episode 0 it writes a NaN
    velocity into the state, which MuJoCo answers with BADQVEL and a silent reset of the state."""

    def __init__(self, action_dim: int = 7):
        self.action_dim = action_dim
        self.metadata = PolicyMetadata(name="corrupting", privileged=True)

    def bind(self, sim, episode) -> None:
        self.sim, self.episode = sim, episode

    def reset(self, instruction: str, seed: int) -> None:
        self.calls = 0

    def infer(self, obs) -> ActionChunk:
        if self.episode.spec.episode_index == 0 and self.calls == 0:
            self.sim.sim.data.qvel[0] = float("nan")
        self.calls += 1
        return ActionChunk(np.zeros((1, self.action_dim)))


def one_line_error(argv: list[str], capsys) -> str:
    """Run the CLI in process; it must exit 2 with exactly one stderr line and no traceback."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("divla-eval: error:"), err
    assert "Traceback" not in err
    return lines[0]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "episodes.jsonl").read_text().splitlines() if line]


# --- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dp(tmp_path_factory) -> Path:
    """A tiny untrained Diffusion Policy checkpoint at 28 px (as tests/test_diffusion_policy.py builds)."""
    torch = pytest.importorskip("torch")
    from conftest import TINY_DIFFUSION_POLICY

    from divla_eval.baselines.diffusion_policy.config import DiffusionPolicyConfig
    from divla_eval.baselines.diffusion_policy.model import DiffusionPolicyModel
    from divla_eval.baselines.diffusion_policy.policy import save_model

    tiny = {**TINY_DIFFUSION_POLICY, "image_size": 28}
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "dp"
    save_model(DiffusionPolicyModel(DiffusionPolicyConfig(**tiny)), path)
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished two-episode random run (report, summary, tables and resume start from a copy)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["run", *QUICK, "--episodes", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("not a directory\n")
    return path


# --- bad input: one line, exit 2 -------------------------------------------------------------------------
def _damaged(tiny_dp: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / f"dp-{how}"
    shutil.copytree(tiny_dp, copy)
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00" * len(data))
    return copy


RUN_CASES = {
    "checkpoint is a file": (
        ["--policy", "diffusion_policy", "--checkpoint", "{file}"],
        "is a file, not a dir",
    ),
    "checkpoint empty": (["--policy", "diffusion_policy", "--checkpoint", ""], "empty string"),
    "out empty": (["--policy", "random", "--out", ""], "empty string"),
    "out is a file": (["--policy", "random", "--episodes", "1", "--out", "{file}"], "is a file, not a dir"),
    "out under a file": (["--policy", "random", "--episodes", "1", "--out", "{file}/run"], "is a file, not"),
    "episodes 10^12": (["--policy", "random", "--episodes", "1000000000000"], "more than the 100000"),
    "image size 100000": (["--policy", "random", "--image-size", "100000"], "at most 512"),
    "max steps 10^6": (["--policy", "random", "--max-steps", "1000000"], "1..100000"),
    "workers 10^4": (["--policy", "random", "--workers", "10000"], "more than 4 per core"),
    "threads 10^4": (["--policy", "random", "--threads", "10000"], "more than 4 per core"),
    "image size not the checkpoint's": (
        ["--policy", "diffusion_policy", "--checkpoint", "{dp}", "--image-size", "64"],
        "trained on 28 px images, not 64 px: run with --image-size 28",
    ),
    "truncated weights": (
        ["--policy", "diffusion_policy", "--checkpoint", "{truncated}", "--image-size", "28"],
        "is damaged",
    ),
    "garbage weights": (
        ["--policy", "diffusion_policy", "--checkpoint", "{garbage}", "--image-size", "28"],
        "is damaged",
    ),
    "policy exits while built": (
        ["--policy", "test_hostile_runs:ExitingAtBuild", "--episodes", "1"],
        "sys.exit",
    ),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_run_refuses_bad_input_in_one_line(case, tiny_dp, a_file, tmp_path, capsys):
    argv, needle = RUN_CASES[case]
    paths = {"file": a_file, "dp": tiny_dp}
    if "{truncated}" in argv or "{garbage}" in argv:
        paths = {**paths, "truncated": _damaged(tiny_dp, tmp_path, "truncated")}
        paths["garbage"] = _damaged(tiny_dp, tmp_path, "garbage")
    argv = [a.format(**paths) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    line = one_line_error(["run", *argv, "--no-progress"], capsys)
    assert needle in line
    assert not (tmp_path / "run" / "manifest.json").exists()  # refused before the run directory is made


OTHER_CASES = {
    "report": {
        "a file": (["report", "{file}"], "is a file, not a directory"),
        "empty": (["report", ""], "empty string"),
        "missing": (["report", "{tmp}/nope"], "does not exist"),
    },
    "summary": {
        "root is a file": (["summary", "{file}"], "is a file, not a directory"),
        "root empty": (["summary", ""], "empty string"),
        "out is a directory": (["summary", "{run}", "--out", "{tmp}"], "is a directory"),
        "out under a file": (["summary", "{run}", "--out", "{file}/s.md"], "is a file, not a directory"),
    },
    "tables": {
        "root is a file": (["tables", "{file}"], "is a file, not a directory"),
        "out is a directory": (["tables", "{run}", "--out", "{tmp}"], "is a directory"),
        "out under a file": (["tables", "{run}", "--out", "{file}/t.md"], "is a file, not a directory"),
    },
    "compare": {
        "a file": (["compare", "{file}", "{run}"], "is a file, not a directory"),
    },
    "collect": {
        "out empty": (["collect", "--episodes", "1", "--out", ""], "empty string"),
        "out is a directory": (["collect", "--episodes", "1", "--out", "{tmp}"], "is a directory"),
        "out is not HDF5": (["collect", "--episodes", "1", "--out", "{file}"], "cannot open"),
        "image size 100000": (
            ["collect", "--episodes", "1", "--image-size", "100000", "--out", "{tmp}/d.hdf5"],
            "at most 512",
        ),
        "episodes 10^12": (["collect", "--episodes", "1000000000000", "--out", "{tmp}/d.hdf5"], "100000"),
        "workers 10^4": (
            ["collect", "--episodes", "1", "--workers", "10000", "--out", "{tmp}/d.hdf5"],
            "per core",
        ),
    },
    "bench": {
        "out under a file": (
            ["bench", "--policies", "random", "--calls", "1", "--out", "{file}/bench"],
            "is a file, not a directory",
        ),
        "out empty": (["bench", "--policies", "random", "--out", ""], "empty string"),
    },
    "serve": {
        "checkpoint is a file": (
            ["serve", "--policy", "diffusion_policy", "--checkpoint", "{file}"],
            "is a file, not a directory",
        ),
    },
    "train": {
        "out empty": (["train", "--demos", "{file}", "--out", ""], "empty string"),
    },
    "curve": {
        "out empty": (["curve", "{tmp}", "--task", "bin_picking", "--out", ""], "empty string"),
    },
}


@pytest.mark.parametrize(
    "command, case", [(command, case) for command, cases in OTHER_CASES.items() for case in cases]
)
def test_other_commands_refuse_bad_input_in_one_line(command, case, finished_run, a_file, tmp_path, capsys):
    argv, needle = OTHER_CASES[command][case]
    paths = {"file": a_file, "tmp": tmp_path, "run": finished_run.parent}
    line = one_line_error([a.format(**paths) for a in argv], capsys)
    assert needle in line


def test_a_run_directory_whose_manifest_was_deleted_is_refused_not_relabelled(finished_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "manifest.json").unlink()
    before = (run_dir / "episodes.jsonl").read_bytes()
    line = one_line_error(["run", *QUICK, "--episodes", "3", "--seed", "7", "--out", str(run_dir)], capsys)
    assert "no manifest.json" in line
    assert (run_dir / "episodes.jsonl").read_bytes() == before and not (run_dir / "manifest.json").exists()


# --- faults inside episodes: that episode is `error`, the run goes on -----------------------------------
@pytest.mark.parametrize(
    "policy, needle",
    [
        ("test_hostile_runs:ExitingPolicy", "SystemExit: 3"),
        ("test_hostile_runs:CorruptingPolicy", "bad qvel"),
    ],
)
def test_a_policy_or_simulator_fault_fails_only_its_episode(policy, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MuJoCo appends its warnings to MUJOCO_LOG.TXT in the current directory
    out = tmp_path / "run"
    argv = ["run", "--policy", policy, "--episodes", "2", "--max-steps", "3", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "errors 1" in capsys.readouterr().out
    first, second = sorted(records(out), key=lambda r: r["episode_index"])
    assert first["status"] == "error" and needle in first["error"] and not first["success"]
    assert second["status"] == "ok" and second["steps"] == 3


@pytest.mark.parametrize(
    "field, value", [("qpos", 1e20), ("qvel", float("nan")), ("ctrl", float("inf")), (None, 0)]
)
def test_every_mujoco_instability_warning_is_a_simulation_fault(field, value, tmp_path, monkeypatch):
    """MuJoCo answers a bad qpos/qvel by resetting the state and a bad ctrl by zeroing it, then carries on;
    only a counter says so. Each of them must end the episode as a fault, not only bad qacc."""
    import mujoco

    monkeypatch.chdir(tmp_path)  # MuJoCo appends its warnings to MUJOCO_LOG.TXT in the current directory

    from divla_eval.envs.gym_env import SimulationFault, check_simulation

    model = mujoco.MjModel.from_xml_string(
        "<mujoco><worldbody><body><joint name='j' type='hinge'/><geom size='.1' pos='0 0 .2'/></body>"
        "</worldbody><actuator><motor joint='j'/></actuator></mujoco>"
    )
    data = mujoco.MjData(model)
    if field is not None:
        getattr(data, field)[0] = value
    mujoco.mj_step(model, data)
    if field is None:
        check_simulation(data)  # a clean step passes
        return
    with pytest.raises(SimulationFault, match=f"bad {field}"):
        check_simulation(data)


def test_a_full_disk_between_two_records_loses_nothing_and_duplicates_nothing(tmp_path, capsys, monkeypatch):
    from divla_eval.records import EpisodeStore

    out = tmp_path / "run"
    real_append, calls = EpisodeStore.append, []

    def append_then_fill_the_disk(self, record):
        calls.append(record.episode_key)
        if len(calls) == 2:  # half a line reaches the file, then the disk is full
            with open(self.path, "a") as f:
                f.write(record.to_json()[:40])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, record)

    monkeypatch.setattr(EpisodeStore, "append", append_then_fill_the_disk)
    line = one_line_error(["run", *QUICK, "--episodes", "3", "--out", str(out)], capsys)
    assert "No space left on device" in line and "1 episode(s) recorded before it are kept" in line
    assert len(records(out)) == 1  # the torn half line was cut off
    monkeypatch.setattr(EpisodeStore, "append", real_append)
    assert main(["run", *QUICK, "--episodes", "3", "--out", str(out)]) == 0
    assert "ran 2, resumed past 1" in capsys.readouterr().out
    keys = [r["episode_key"] for r in records(out)]
    assert len(keys) == 3 == len(set(keys))
    sessions = json.loads((out / "manifest.json").read_text())["sessions"]
    assert [s["workers"] for s in sessions] == [1, 1] and {s["torch_threads"] for s in sessions} == {1}


def test_writers_keep_the_previous_file_when_the_disk_fills(finished_run, tmp_path, capsys, monkeypatch):
    """report.md, success.png and summary.md are written to a temporary name and renamed: a writer that
    fails half-way (here: ENOSPC after some bytes) leaves the previous complete file and no debris."""
    import matplotlib.figure

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    assert main(["report", str(run_dir)]) == 0 and main(["summary", str(tmp_path)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in (run_dir / "success.png", run_dir / "report.md")}
    summary_before = (tmp_path / "summary.md").read_bytes()

    def savefig_on_a_full_disk(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_on_a_full_disk)
    line = one_line_error(["report", str(run_dir)], capsys)
    assert "success.png" in line and "No space left on device" in line and "previous version is kept" in line
    assert {p.name: p.read_bytes() for p in (run_dir / "success.png", run_dir / "report.md")} == before
    monkeypatch.undo()

    real_write_text = Path.write_text

    def write_text_on_a_full_disk(self, data, *args, **kwargs):
        real_write_text(self, data[:10], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text_on_a_full_disk)
    assert "No space left on device" in one_line_error(["summary", str(tmp_path)], capsys)
    assert "No space left on device" in one_line_error(["tables", str(tmp_path)], capsys)
    monkeypatch.undo()
    assert (tmp_path / "summary.md").read_bytes() == summary_before
    assert not (tmp_path / "paper_tables.md").exists()
    debris = [p for p in tmp_path.rglob(".*.tmp")]
    assert not debris, debris


# --- collect: finished demos survive a kill or a full disk ----------------------------------------------
def _fake_outcome(spec, steps: int = 4, size: int = 16):
    """A demo as `record_episode` returns it, without running the simulator."""
    from divla_eval.data.collect import _Outcome

    rng = np.random.default_rng(spec.episode_index)
    images = rng.integers(0, 256, (steps, size, size, 3), dtype=np.uint8)
    dones = np.zeros(steps, dtype=np.int64)
    dones[-1] = 1
    return _Outcome(
        spec,
        {
            "actions": rng.uniform(-1, 1, (steps, 7)).astype(np.float32),
            "states": rng.normal(size=(steps, 20)),
            "rewards": dones.astype(np.float64),
            "dones": dones,
            "reasoning": ["reach the cube"] * steps,
            "obs/front_image": images,
            "obs/wrist_image": images,
            "obs/proprio": rng.normal(size=(steps, 11)).astype(np.float32),
            "attrs": {
                "instruction": "x",
                "episode_key": spec.key,
                "episode_index": spec.episode_index,
                "object_ids": "[]",
                "seed": 0,
                "perturbations": "[]",
            },
        },
    )


def test_demos_of_a_killed_collection_are_kept_and_merged_by_the_next_run(tmp_path):
    """A SIGKILL leaves the journal (OUT.partial/) and never touches OUT; the next run counts the
    journalled demos as done, runs nothing twice and merges them."""
    import h5py

    from divla_eval.data.collect import CollectConfig, _Journal, _resolve, collect, env_args, parts_dir
    from divla_eval.runner import plan_episodes

    cfg = _resolve(CollectConfig(episodes=2, image_size=16, max_steps=4))
    out = tmp_path / "d.hdf5"
    journal = _Journal(out, env_args(cfg))
    journal.open()
    spec0, spec1 = plan_episodes(cfg.run_config())
    journal.add_demo(_fake_outcome(spec0))
    journal.add_failure(spec1.key, "no_grasp")
    journal._lock.close()  # the process "dies" here: no merge, the lock goes with it
    assert not out.exists() and (parts_dir(out) / "demo_0.hdf5").is_file()

    summary = collect(cfg, out, progress=False)
    assert summary.ran == 0 and summary.skipped == 2 and summary.demos == 1 and len(summary.failed) == 1
    assert not parts_dir(out).exists()
    with h5py.File(out, "r") as f:
        assert f["data/demo_0"].attrs["num_samples"] == 4 and f["data"].attrs["num_episodes"] == 2


def test_a_full_disk_at_the_merge_keeps_the_old_file_and_the_journal(tmp_path, monkeypatch):
    import collections
    import shutil as shutil_module

    from divla_eval.data.collect import CollectConfig, _Journal, _resolve, collect, env_args, parts_dir
    from divla_eval.errors import DivlaEvalError
    from divla_eval.runner import plan_episodes

    cfg = _resolve(CollectConfig(episodes=2, image_size=16, max_steps=4))
    out = tmp_path / "d.hdf5"
    first, second = plan_episodes(cfg.run_config())
    journal = _Journal(out, env_args(cfg))
    journal.open()
    journal.add_demo(_fake_outcome(first))
    journal._lock.close()
    collect(CollectConfig(episodes=1, image_size=16, max_steps=4), out, progress=False)  # merges demo_0
    good = out.read_bytes()

    journal = _Journal(out, env_args(cfg))
    journal.open()
    journal.add_demo(_fake_outcome(second))
    journal._lock.close()
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(DivlaEvalError, match="MiB free to be rewritten safely.*demo\\(s\\) are kept in"):
        collect(cfg, out, progress=False)
    assert out.read_bytes() == good and (parts_dir(out) / "demo_1.hdf5").is_file()
    monkeypatch.undo()
    summary = collect(cfg, out, progress=False)
    assert summary.ran == 0 and summary.demos == 2 and not parts_dir(out).exists()


def test_a_disk_that_fills_during_a_collection_keeps_the_demos_before_it(tmp_path, monkeypatch, capsys):
    """The second demo cannot be written: one line, the first demo is merged into OUT, and the rerun
    runs only the episode that was lost. (Episodes are faked: the simulator is not what is tested.)"""
    import h5py

    import divla_eval.data.collect as collect_module

    monkeypatch.setattr(collect_module._Collector, "run", lambda self, spec: _fake_outcome(spec))
    real_write, written = collect_module._write_demo, []

    def write_on_a_filling_disk(data, outcome):
        written.append(outcome.spec.episode_index)
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(data, outcome)

    monkeypatch.setattr(collect_module, "_write_demo", write_on_a_filling_disk)
    out = tmp_path / "d.hdf5"
    argv = ["collect", "--episodes", "3", "--image-size", "16", "--out", str(out), "--no-progress"]
    line = one_line_error(argv, capsys)
    assert "cannot write demo_1" in line and "No space left on device" in line and "1 demo(s)" in line
    with h5py.File(out, "r") as f:
        assert [k for k in f["data"] if k.startswith("demo_")] == ["demo_0"]
    monkeypatch.setattr(collect_module, "_write_demo", real_write)
    assert main(argv) == 0
    assert "ran 2, resumed past 1" in capsys.readouterr().out
    with h5py.File(out, "r") as f:
        assert f["data"].attrs["num_demos"] == 3 and len(json.loads(f["data"].attrs["sessions"])) == 2


# --- reproducibility: the worker count moves nothing ------------------------------------------------
@pytest.mark.slow  # ~30 s on a busy 2-core machine (two spawned workers import torch and robosuite)
def test_a_learned_policy_gives_the_same_records_with_one_and_two_workers(tiny_dp, tmp_path):
    from divla_eval.runner import RunConfig, run

    cfg = RunConfig(
        policy="diffusion_policy", checkpoint=str(tiny_dp), episodes=3, max_steps=6, image_size=28
    )
    volatile = ("run_id", "wall_time_s", "latency_ms")
    kept = {}
    for workers in (1, 2):
        run(cfg, tmp_path / f"w{workers}", progress=False, workers=workers)
        rows = sorted(records(tmp_path / f"w{workers}"), key=lambda r: r["episode_key"])
        kept[workers] = [{k: v for k, v in r.items() if k not in volatile} for r in rows]
        manifest = json.loads((tmp_path / f"w{workers}" / "manifest.json").read_text())
        assert manifest["sessions"][0]["torch_threads"] == 1  # the default, whatever the worker count
        assert manifest["sessions"][0]["workers"] == workers and "transformers" in manifest["packages"]
    assert kept[1] == kept[2] and all(r["status"] == "ok" for r in kept[1]) and len(kept[1]) == 3


# --- teardown ---------------------------------------------------------------------------------------------
def test_an_unclosed_rgb_array_env_exits_silently(tmp_path):
    code = (
        "import gymnasium as gym, divla_eval.envs\n"
        "env = gym.make('divla_eval/BinPicking-v0', render_mode='rgb_array', image_size=16)\n"
        "env.reset(seed=0)\n"
        "assert env.render().shape == (16, 16, 3)\n"
    )
    env = {**os.environ, "MUJOCO_GL": "egl"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (
        "EGLError" not in proc.stderr
        and "Traceback" not in proc.stderr
        and "Exception ignored" not in proc.stderr
    )


# --- slow: real full and read-only filesystems, killed processes ---------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path) -> Path:
    """Fill the filesystem to the last byte with a file that can be deleted to free it again."""
    filler = mnt / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to fail again at close
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_writers_on_a_real_full_disk_and_a_read_only_filesystem(finished_run, small_fs, capsys):
    run_dir = small_fs / "runs" / "run"
    shutil.copytree(finished_run, run_dir, ignore=shutil.ignore_patterns("report.md", "success.png"))
    filler = _fill(small_fs)
    for argv, name in (
        (["report", str(run_dir)], "success.png"),
        (["summary", str(small_fs / "runs")], "summary.md"),
        (["tables", str(small_fs / "runs")], "paper_tables.md"),
    ):
        assert "No space left on device" in one_line_error(argv, capsys)
        assert not list(small_fs.rglob(name)) and not list(small_fs.rglob(".*.tmp"))  # no 0-byte file
    filler.unlink()
    assert main(["report", str(run_dir)]) == 0
    good = (run_dir / "success.png").read_bytes()
    assert len(good) > 1000
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        for argv in (["report", str(run_dir)], ["summary", str(small_fs / "runs")]):
            assert "Read-only file system" in one_line_error(argv, capsys)
        line = one_line_error(["run", *QUICK, "--episodes", "1", "--out", str(small_fs / "new")], capsys)
        assert "Read-only file system" in line
        line = one_line_error(["collect", "--episodes", "1", "--out", str(small_fs / "d.hdf5")], capsys)
        assert "Read-only file system" in line
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    assert (run_dir / "success.png").read_bytes() == good


@pytest.mark.slow
def test_collect_on_a_disk_that_fills_keeps_every_finished_demo(small_fs, capsys):
    import h5py

    out = small_fs / "d.hdf5"
    argv = ["collect", "--episodes", "1", "--image-size", "32", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    good = out.read_bytes()
    filler = _fill(small_fs)
    line = one_line_error([*argv[:2], "2", *argv[3:]], capsys)
    assert "No space left on device" in line or "MiB free" in line
    assert out.read_bytes() == good  # never written in place
    filler.unlink()
    assert main([*argv[:2], "2", *argv[3:]]) == 0
    with h5py.File(out, "r") as f:
        assert f["data"].attrs["num_episodes"] == 2


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_workers_die_with_a_run_killed_by_sigkill(tmp_path):
    cmd = [sys.executable, "-m", "divla_eval.cli", "run", "--policy", "random", "--workers", "2"]
    cmd += ["--episodes", "8", "--max-steps", "300", "--no-progress", "--out", str(tmp_path / "run")]
    env = {**os.environ, "MUJOCO_GL": "egl"}
    parent = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(workers) < 2:
            time.sleep(0.5)
            # the pool's workers (the resource tracker is a child too; it exits on its own)
            workers = [p for p in _children(parent.pid) if "spawn_main" in _cmdline(p)]
        assert len(workers) == 2, "the workers did not start"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers)
    finally:
        parent.kill()
        for pid in workers:  # left over only when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_collection_killed_with_sigkill_resumes_with_its_demos(tmp_path):
    import h5py

    out = tmp_path / "d.hdf5"
    cmd = [sys.executable, "-m", "divla_eval.cli", "collect", "--episodes", "3", "--image-size", "16"]
    cmd += ["--out", str(out), "--no-progress"]
    env = {**os.environ, "MUJOCO_GL": "egl"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "d.hdf5.partial").glob("demo_*.hdf5")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = len(list((tmp_path / "d.hdf5.partial").glob("demo_*.hdf5")))
    assert saved >= 1
    from divla_eval.data.collect import CollectConfig, collect

    summary = collect(CollectConfig(episodes=3, image_size=16), out, progress=False)
    assert summary.skipped >= saved and summary.ran == 3 - summary.skipped
    with h5py.File(out, "r") as f:
        assert f["data"].attrs["num_episodes"] == 3
