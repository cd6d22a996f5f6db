"""The Ray backend (`--backend ray`): records equal to the local backend's, resume, dead actors,
a served policy shared by several actors, collection, and the one-line errors.

The tests that need a cluster share one local cluster (`ray.init(num_cpus=2)`, ~7 s to start), shut
down at the end of the module; they are skipped, saying why, when Ray is not installed (it is in the
`test` extra: `pip install -e '.[test]'`, or alone `pip install 'divla-eval[ray]'`). The error tests
need no cluster and always run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys

import numpy as np
import pytest

from divla_eval import runner
from divla_eval.errors import DivlaEvalError
from divla_eval.policy import RandomPolicy
from divla_eval.records import EpisodeStore
from divla_eval.runner import RunConfig, run

EXECUTION_FIELDS = ("run_id", "wall_time_s", "latency_ms")
"""What may differ between two runs of the same episodes (an identity and timings)."""


def _cfg(**kw) -> RunConfig:
    base = dict(task="bin_picking", split="unseen", policy="random", episodes=3, seed=0, max_steps=10)
    base.update(kw)
    return RunConfig(**base)


def _comparable(run_dir) -> list[dict]:
    rows = []
    for line in (run_dir / "episodes.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key in EXECUTION_FIELDS:
            row.pop(key)
        rows.append(row)
    return sorted(rows, key=lambda r: r["episode_key"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for every test that needs one (2 CPUs: two actors), shut down at the end."""
    ray = pytest.importorskip(
        "ray", reason="Ray is not installed: pip install 'divla-eval[ray]' to run the Ray backend's tests"
    )
    if ray.is_initialized():  # someone else's connection: not ours to shut down or to reuse
        pytest.skip("a Ray connection is already open in this process")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


class DyingPolicy(RandomPolicy):
    """Random, but the process running it exits (`os._exit`: no exception, no cleanup) in the first
    call of the episode whose policy seed is `die_seed`, leaving a file in `marks` for each try."""

    def __init__(self, die_seed: int, marks: str, action_dim: int = 7):
        super().__init__(action_dim)
        self.die_seed, self.marks, self.dying = die_seed, marks, False

    def reset(self, instruction: str, seed: int) -> None:
        super().reset(instruction, seed)
        self.dying = seed == self.die_seed

    def infer(self, obs):
        if self.dying:
            with open(os.path.join(self.marks, f"died-{os.getpid()}"), "w"):
                pass
            os._exit(1)
        return super().infer(obs)


class DyingAtBuild(RandomPolicy):
    """Kills the process that builds it (a CUDA driver crash, an extension's abort)."""

    def __init__(self, action_dim: int = 7):
        os._exit(1)


# --- with a cluster -----------------------------------------------------------------------------------
def test_ray_records_equal_local_ones_and_an_interrupted_run_resumes(cluster, tmp_path, monkeypatch):
    cfg = _cfg(episodes=2)
    run(cfg, tmp_path / "local", progress=False, workers=1)

    real_append, appended = runner._append, []

    def interrupting(store, record, saved):
        if len(appended) == 1:
            raise KeyboardInterrupt
        appended.append(record.episode_key)
        real_append(store, record, saved)

    monkeypatch.setattr(runner, "_append", interrupting)
    with pytest.raises(KeyboardInterrupt):  # after the first record, while the other actor runs
        run(cfg, tmp_path / "ray", progress=False, workers=2, backend="ray")
    monkeypatch.undo()
    assert len(EpisodeStore(tmp_path / "ray" / "episodes.jsonl").load()) == 1

    summary = run(cfg, tmp_path / "ray", progress=False, workers=2, backend="ray")
    assert summary.skipped == 1 and summary.ran == 1 and summary.errors == 0
    keys = [r.episode_key for r in EpisodeStore(tmp_path / "ray" / "episodes.jsonl").load()]
    assert len(keys) == 2 == len(set(keys))  # nothing lost, nothing twice
    assert _comparable(tmp_path / "ray") == _comparable(tmp_path / "local")

    sessions = json.loads((tmp_path / "ray" / "manifest.json").read_text())["sessions"]
    assert [s["backend"] for s in sessions] == ["ray", "ray"] and {s["workers"] for s in sessions} == {2}
    assert (
        sessions[0]["ray_address"]
        and sessions[0]["ray_gcs_address"] == cluster.get_runtime_context().gcs_address
    )
    assert sessions[0]["ray_nodes"] == 1 and sessions[0]["actor_resources"] == {"CPU": 1}
    local = json.loads((tmp_path / "local" / "manifest.json").read_text())["sessions"]
    assert local[0]["backend"] == "local"


def test_an_episode_whose_actor_dies_is_retried_once_then_recorded_as_an_error(cluster, tmp_path):
    cfg = _cfg(episodes=2, max_steps=5, policy="dying")
    marks = tmp_path / "marks"
    marks.mkdir()
    die_seed = runner.plan_episodes(cfg)[0].seed("policy")
    summary = run(
        cfg,
        tmp_path / "run",
        progress=False,
        workers=2,
        backend="ray",
        policy=DyingPolicy(die_seed, str(marks)),
    )
    assert summary.ran == 2 and summary.errors == 1
    records = {r.episode_index: r for r in EpisodeStore(tmp_path / "run" / "episodes.jsonl").load()}
    assert records[0].status == "error" and records[0].failure_mode == "error" and not records[0].success
    assert "Ray actor died, on 2 tries" in records[0].error and "ActorDiedError" in records[0].error
    assert records[1].status == "ok" and records[1].steps == 5  # the other episode ran as usual
    assert len(list(marks.iterdir())) == 2  # the first try and one retry, each in its own process

    # a resumed run keeps the error (counted as a failure, as every error is) and runs nothing again
    again = run(
        cfg,
        tmp_path / "run",
        progress=False,
        workers=2,
        backend="ray",
        policy=DyingPolicy(die_seed, str(marks)),
    )
    assert again.ran == 0 and again.skipped == 2 and len(list(marks.iterdir())) == 2


def test_an_actor_that_dies_while_being_built_stops_the_run_in_one_line(cluster, tmp_path):
    with pytest.raises(DivlaEvalError, match="a Ray actor died while building its simulator and policy"):
        run(_cfg(episodes=1, policy="test_ray:DyingAtBuild"), tmp_path / "run", progress=False, backend="ray")
    assert not (tmp_path / "run" / "manifest.json").exists()  # nothing ran: the directory is not claimed


def test_a_served_policy_is_shared_and_batched_across_actors(cluster, tmp_path):
    from divla_eval.remote.server import PolicyServer

    server = PolicyServer(RandomPolicy(chunk=2), "random", port=0, max_batch=2, max_wait_ms=300).start()
    try:
        cfg = _cfg(episodes=2, max_steps=20, policy="remote", policy_options={"url": server.url})
        summary = run(cfg, tmp_path / "run", progress=False, workers=2, backend="ray")
    finally:
        server.stop()
    assert summary.ran == 2 and summary.errors == 0, [r.error for r in summary.records]
    assert all(r.policy_info.get("url") == server.url for r in summary.records)
    # the driver's metadata check plus one connection per actor (each actor keeps one session)
    assert server.connections >= 3
    # requests of the two actors waited together and were run as one batch
    assert max(server.batcher.batches) == 2, server.batcher.batches


def test_collect_on_ray_writes_the_demos_a_local_collect_writes(cluster, demos, tmp_path):
    import h5py

    from divla_eval.data.collect import CollectConfig, collect

    # the first episode of `demos` (2 episodes, collected locally); one is enough to compare, and
    # keeps this test to one expert episode's time
    cfg = CollectConfig(task="bin_picking", split="seen", episodes=1, seed=1000, image_size=28)
    summary = collect(cfg, tmp_path / "ray.hdf5", progress=False, workers=2, backend="ray")
    assert summary.demos == 1 and not summary.failed
    with h5py.File(demos, "r") as a, h5py.File(tmp_path / "ray.hdf5", "r") as b:
        assert list(b["data"]) == ["demo_0"]
        for name in b["data"]:
            x, y = a["data"][name], b["data"][name]
            assert dict(x.attrs) == dict(y.attrs)
            for key in ("actions", "states", "rewards", "dones", "obs/front_image", "obs/proprio"):
                np.testing.assert_array_equal(x[key][()], y[key][()])


def test_a_wrong_worker_count_for_the_cluster_is_one_line(cluster, tmp_path):
    with pytest.raises(DivlaEvalError, match="need 3 CPUs .* has 2"):
        run(_cfg(episodes=1), tmp_path / "run", progress=False, workers=3, backend="ray")
    assert not (tmp_path / "run").exists()


# --- errors, with or without Ray -------------------------------------------------------------------------
def _cli(argv, capsys) -> tuple[int, str]:
    from divla_eval.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


QUICK_RUN = ["run", "--task", "bin_picking", "--policy", "random", "--episodes", "1", "--no-progress"]


def test_an_unknown_backend_names_the_valid_ones(capsys, tmp_path):
    code, err = _cli([*QUICK_RUN, "--out", str(tmp_path / "r"), "--backend", "spark"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "spark" in err and "local" in err and "ray" in err
    code, err = _cli(
        ["collect", "--episodes", "1", "--out", str(tmp_path / "d.hdf5"), "--backend", "x"], capsys
    )
    assert code == 2 and "local" in err and "ray" in err
    with pytest.raises(DivlaEvalError, match="unknown backend 'spark'; valid: local, ray"):
        from divla_eval.backends import get_backend

        get_backend("spark")


def test_backend_ray_without_ray_installed_says_how_to_install_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    for argv in (
        [*QUICK_RUN, "--out", str(tmp_path / "r"), "--backend", "ray"],
        ["collect", "--episodes", "1", "--out", str(tmp_path / "d.hdf5"), "--backend", "ray"],
    ):
        code, err = _cli(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "pip install 'divla-eval[ray]'" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "d.hdf5").exists()


def test_an_unreachable_ray_address_is_one_line_and_writes_nothing(capsys, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'divla-eval[ray]'")
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    code, err = _cli(
        [*QUICK_RUN, "--out", str(tmp_path / "r"), "--backend", "ray", "--ray-address", address], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot reach a Ray cluster at {address}" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
    code, err = _cli([*QUICK_RUN, "--out", str(tmp_path / "r"), "--ray-address", address], capsys)
    assert code == 2 and "--ray-address needs --backend ray" in err
