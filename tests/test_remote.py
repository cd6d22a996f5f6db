"""Remote policies over openpi's websocket protocol: our server, our client, and openpi's own packages.

Every server here binds 127.0.0.1 on a free port and is stopped by the test that started it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from divla_eval.cli import main
from divla_eval.errors import DivlaEvalError
from divla_eval.policy import Observation, PolicyMetadata, RandomPolicy
from divla_eval.remote import wire
from divla_eval.remote.client import RemoteInferenceError, RemotePolicy, RemoteServerGone, RemoteTimeout
from divla_eval.remote.server import PolicyServer, fork_policy

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def obs(seed: int = 0, prompt: str = "pick up the red cube", size: int = 16) -> Observation:
    rng = np.random.default_rng(seed)
    images = {c: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for c in ("front", "wrist")}
    return Observation(images, rng.normal(size=11), prompt, "panda")


@pytest.fixture
def serve():
    """Start PolicyServers in this process (a background thread each); all stopped at the end."""
    started = []

    def start(policy, **kw) -> PolicyServer:
        server = PolicyServer(policy, kw.pop("name", "test"), port=0, **kw).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("server did not become healthy")


@pytest.fixture
def subprocess_server():
    """Start a server command in a subprocess on a free port; terminated at the end."""
    procs = []

    def start(args: list[str], port: int | None = None) -> int:
        """`args` end with the option that takes the port ("--port", or nothing for a positional)."""
        port = port or free_port()
        env = {**os.environ, "MUJOCO_GL": "egl", "DIVLA_EVAL_TORCH_THREADS": "1"}
        proc = subprocess.Popen(
            [*args, str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=REPO,
        )
        procs.append(proc)
        wait_healthy(port, proc)
        return port

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- the wire format ---------------------------------------------------------------------------------------
def test_arrays_cross_with_openpis_msgpack_numpy():
    from openpi_client import msgpack_numpy

    msg = {"a": np.arange(6, dtype=np.float64).reshape(2, 3), "b": np.uint8(7), "s": "text", "n": [1, 2]}
    theirs = msgpack_numpy.unpackb(wire.packb(msg))
    np.testing.assert_array_equal(theirs["a"], msg["a"])
    assert theirs["a"].dtype == np.float64 and theirs["b"] == 7 and theirs["s"] == "text"
    ours = wire.unpackb(msgpack_numpy.packb(msg))
    np.testing.assert_array_equal(ours["a"], msg["a"])
    with pytest.raises(wire.WireError, match="object"):
        wire.packb({"x": np.array([object()])})
    with pytest.raises(wire.WireError):
        wire.unpackb(b"\xc1 not msgpack")


def test_an_observation_survives_the_wire_bit_for_bit():
    o = obs(3)
    o.images["wrist_left"] = o.images["wrist"][::-1].copy()
    back = wire.observation_from_wire(wire.unpackb(wire.packb(wire.observation_to_wire(o))))
    assert set(back.images) == {"front", "wrist", "wrist_left"}
    for c in o.images:
        np.testing.assert_array_equal(back.images[c], o.images[c])
    assert back.proprio.dtype == np.float64 and np.array_equal(back.proprio, o.proprio)
    assert (back.instruction, back.embodiment) == (o.instruction, o.embodiment)


def test_libero_style_keys_alone_make_an_observation():
    msg = {
        "observation/image": np.zeros((8, 8, 3), np.uint8),
        "observation/wrist_image": np.ones((8, 8, 3), np.uint8),
        "observation/state": np.zeros(8, np.float32),
        "prompt": "open the drawer",
    }
    o = wire.observation_from_wire(msg, default_embodiment="panda")
    assert (
        set(o.images) == {"front", "wrist"} and o.proprio.shape == (8,) and o.instruction == "open the drawer"
    )
    with pytest.raises(wire.WireError, match="uint8 HxWx3"):
        wire.observation_from_wire({**msg, "observation/image": np.zeros((8, 8), np.float32)})


# --- our server ------------------------------------------------------------------------------------------
def test_openpis_client_gets_actions_and_metadata_from_our_server(serve):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    server = serve(RandomPolicy(action_dim=7, chunk=4), name="random")
    client = WebsocketClientPolicy("127.0.0.1", server.port)
    meta = client.get_server_metadata()
    assert meta["policy"] == "random" and meta["action_dim"] == 7 and meta["seeded"] is True
    libero = {
        "observation/image": np.zeros((224, 224, 3), np.uint8),
        "observation/wrist_image": np.zeros((224, 224, 3), np.uint8),
        "observation/state": np.zeros(11, np.float32),
        "prompt": "pick up the cube",
    }
    out = client.infer(libero)
    assert out["actions"].shape == (4, 7) and np.all(np.abs(out["actions"]) <= 1)
    assert out["server_timing"]["infer_ms"] >= 0
    # a foreign client sends no seed: its session is reset with seed 0 on its first message
    expected = RandomPolicy(action_dim=7, chunk=4)
    expected.reset("pick up the cube", 0)
    np.testing.assert_array_equal(out["actions"], expected.infer(None).actions)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz") as r:
        assert r.read() == b"OK\n"


class Flaky:
    """Fails on one prompt, sleeps on another: the error and timeout paths."""

    def __init__(self):
        self.metadata = PolicyMetadata(name="flaky")
        self.inner = RandomPolicy(action_dim=7, chunk=2)

    def reset(self, instruction, seed):
        self.inner.reset(instruction, seed)

    def infer(self, o):
        if o.instruction == "fail":
            raise ValueError("the model cannot do this")
        if o.instruction == "slow":
            time.sleep(1.5)
        return self.inner.infer(o)


def test_an_inference_error_fails_the_call_with_the_servers_message_and_the_next_episode_reconnects(serve):
    server = serve(Flaky())
    client = RemotePolicy(server.url, action_dim=7)
    client.reset("fail", 1)
    with pytest.raises(RemoteInferenceError, match="the model cannot do this"):
        client.infer(obs(prompt="fail"))
    client.reset("fine", 1)  # the server closed the connection (1011): reset reconnects
    assert client.infer(obs(prompt="fine")).actions.shape == (2, 7)
    client.close()


def test_a_slow_reply_times_out_and_inference_runs_off_the_event_loop(serve):
    server = serve(Flaky())
    slow = RemotePolicy(server.url, action_dim=7, timeout=0.5)
    slow.reset("slow", 0)
    t0 = time.perf_counter()
    with pytest.raises(RemoteTimeout, match="did not answer within 0.5 s"):
        slow.infer(obs(prompt="slow"))
    assert time.perf_counter() - t0 < 1.4
    # the slow call is still running in the inference thread: the loop still answers health checks
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz") as r:
        assert r.status == 200
    assert time.perf_counter() - t0 < 0.5


def test_a_server_that_goes_away_is_fatal_and_an_absent_one_is_waited_for_then_refused(serve):
    server = serve(RandomPolicy())
    client = RemotePolicy(server.url, action_dim=7, connect_timeout=1)
    client.reset("x", 0)
    client.infer(obs())
    server.stop()
    with pytest.raises(RemoteServerGone) as info:
        client.infer(obs())
    assert info.value.fatal and isinstance(info.value, DivlaEvalError)
    t0 = time.perf_counter()
    with pytest.raises(RemoteServerGone, match="cannot reach the policy server"):
        RemotePolicy(f"ws://127.0.0.1:{free_port()}", connect_timeout=1.0)
    assert 0.9 < time.perf_counter() - t0 < 5


def test_the_api_key_is_checked_and_required_off_loopback(serve, monkeypatch):
    with pytest.raises(DivlaEvalError, match="API key"):
        PolicyServer(RandomPolicy(), "random", host="0.0.0.0", port=0)
    server = serve(RandomPolicy(), api_key="s3cret")
    monkeypatch.delenv("DIVLA_EVAL_API_KEY", raising=False)
    with pytest.raises(DivlaEvalError, match="refused the API key"):
        RemotePolicy(server.url, connect_timeout=2)
    monkeypatch.setenv("DIVLA_EVAL_API_KEY", "s3cret")
    client = RemotePolicy(server.url, connect_timeout=2)
    client.reset("x", 0)
    assert client.infer(obs()).actions.shape == (1, 7)
    client.close()


def test_a_message_over_the_servers_cap_is_refused_with_what_to_change(serve):
    server = serve(RandomPolicy(), max_message_mb=0.001)  # about 1 kB: two 16 px images are more
    client = RemotePolicy(server.url, action_dim=7)
    client.reset("x", 0)
    with pytest.raises(RemoteServerGone, match="too big: start it with a larger --max-message-mb"):
        client.infer(obs())


def test_sessions_do_not_share_episode_state():
    policy = RandomPolicy(chunk=3)
    a, b = fork_policy(policy), fork_policy(policy)
    a.reset("x", 5)
    b.reset("x", 6)
    first = a.infer(None).actions
    b.infer(None)
    a.reset("x", 5)
    np.testing.assert_array_equal(a.infer(None).actions, first)


def test_concurrent_clients_are_batched_and_each_keeps_its_own_seeded_actions(serve):
    server = serve(RandomPolicy(chunk=2), max_batch=4, max_wait_ms=200)
    results = {}

    def client(seed):
        c = RemotePolicy(server.url, action_dim=7)
        c.reset("x", seed)
        results[seed] = c.infer(obs(seed)).actions
        c.close()

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(server.batcher.batches) > 1, server.batcher.batches
    for seed, actions in results.items():
        ref = RandomPolicy(chunk=2)
        ref.reset("x", seed)
        np.testing.assert_array_equal(actions, ref.infer(None).actions)


def test_diffusion_policy_batches_sessions_into_one_forward_pass():
    torch = pytest.importorskip("torch")
    from conftest import TINY_DIFFUSION_POLICY

    from divla_eval.baselines.diffusion_policy.config import DiffusionPolicyConfig
    from divla_eval.baselines.diffusion_policy.model import DiffusionPolicyModel
    from divla_eval.baselines.diffusion_policy.policy import DiffusionPolicy

    torch.manual_seed(0)
    cfg = DiffusionPolicyConfig(**TINY_DIFFUSION_POLICY, image_size=16)
    policy = DiffusionPolicy(DiffusionPolicyModel(cfg).eval())
    sessions = [fork_policy(policy) for _ in range(3)]
    assert all(s.model is policy.model for s in sessions)
    for i, s in enumerate(sessions):
        s.reset("x", 10 + i)
    batched = DiffusionPolicy.infer_batch(sessions, [obs(i) for i in range(3)])
    for i in range(3):
        alone = fork_policy(policy)
        alone.reset("x", 10 + i)
        np.testing.assert_allclose(batched[i].actions, alone.infer(obs(i)).actions, atol=1e-5)


# --- end to end: serve in a subprocess, evaluate through it ------------------------------------------------
def _records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "episodes.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda r: r["episode_index"])


ROUTE_ONLY = {"run_id", "wall_time_s", "latency_ms", "policy", "policy_options", "policy_info"}


def test_a_policy_evaluated_through_serve_gives_the_records_of_the_in_process_run(
    tmp_path, subprocess_server
):
    from divla_eval.runner import RunConfig, run

    port = subprocess_server(
        [sys.executable, "-m", "divla_eval.cli", "serve", "--policy", "random", "--port"]
    )
    base = dict(task="multitask", split="select_object", episodes=2, max_steps=15)
    url = f"ws://127.0.0.1:{port}"
    remote = run(
        RunConfig(policy="remote", policy_options={"url": url}, **base), tmp_path / "r", progress=False
    )
    local = run(RunConfig(policy="random", **base), tmp_path / "l", progress=False)
    assert remote.errors == local.errors == 0
    for r, here in zip(_records(tmp_path / "r"), _records(tmp_path / "l")):
        assert {k: v for k, v in r.items() if k not in ROUTE_ONLY} == {
            k: v for k, v in here.items() if k not in ROUTE_ONLY
        }
        assert r["policy_info"]["seeded"] is True and r["policy_info"]["server"]["policy"] == "random"
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["policy_info"]["url"] == url and manifest["policy_info"]["server"]["action_dim"] == 7


OPENPI_SERVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from openpi_server import WebsocketPolicyServer

    class Zeros:
        def infer(self, obs):
            assert obs["observation/image"].dtype == np.uint8 and isinstance(obs["prompt"], str)
            return {"actions": np.full((4, 7), 0.25, dtype=np.float32)}

    port = int(sys.argv[1])
    WebsocketPolicyServer(Zeros(), host="127.0.0.1", port=port, metadata={"name": "zeros"}).serve_forever()
    """
)


def test_our_client_evaluates_openpis_reference_server(tmp_path, subprocess_server):
    from divla_eval.runner import RunConfig, run

    script = tmp_path / "openpi_server_zeros.py"
    script.write_text(OPENPI_SERVER)
    port = subprocess_server([sys.executable, str(script)])
    cfg = RunConfig(
        task="multitask",
        split="select_object",
        episodes=1,
        max_steps=6,
        policy="remote",
        policy_options={"url": f"ws://127.0.0.1:{port}", "execute_steps": 2},
    )
    summary = run(cfg, tmp_path / "run", progress=False)
    (record,) = _records(tmp_path / "run")
    assert summary.errors == 0 and record["status"] == "ok" and record["steps"] == 6
    assert record["latency_ms"]["n"] == 3  # 6 steps, 2 actions executed per call
    assert record["policy_info"]["seeded"] is False  # openpi's server has no episode marker
    assert record["policy_info"]["server"] == {"name": "zeros"}


# --- the command line ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--policy", "scripted"], "cannot be served"),
        (["serve", "--policy", "remote"], "is a client"),
        (["serve", "--policy", "divla"], "needs --checkpoint"),
        (["serve", "--policy", "random", "--host", "0.0.0.0", "--port", "0"], "API key"),
        (["serve", "--policy", "random", "--port", "70000"], "--port"),
        (["run", "--policy", "remote", "--task", "multitask", "--split", "flip_pot"], "url=ws://"),
        (["run", "--policy", "remote", "--policy-option", "url=http://x"], "expected ws://"),
    ],
)
def test_bad_serve_and_remote_commands_are_one_line_errors(args, message, capsys, monkeypatch):
    monkeypatch.delenv("DIVLA_EVAL_API_KEY", raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_run_against_no_server_stops_with_one_line(tmp_path, capsys):
    url = f"ws://127.0.0.1:{free_port()}"
    args = [
        "run",
        "--policy",
        "remote",
        "--policy-option",
        f"url={url}",
        "--policy-option",
        "connect_timeout=1",
    ]
    assert main([*args, "--task", "multitask", "--split", "flip_pot", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the policy server" in err and "Traceback" not in err


DYING = textwrap.dedent(
    """
    import os
    from divla_eval.policy import RandomPolicy

    class DiesInSecondEpisode(RandomPolicy):
        '''A served policy whose process dies when the run's episode 1 starts (its seed is not 0's).'''

        first_seed = None

        def reset(self, instruction, seed):
            if DiesInSecondEpisode.first_seed is None:
                DiesInSecondEpisode.first_seed = seed
            elif seed != DiesInSecondEpisode.first_seed:
                os._exit(3)
            super().reset(instruction, seed)
    """
)


def test_a_server_that_dies_mid_run_stops_it_with_one_line_and_the_rerun_resumes(
    tmp_path, subprocess_server, capsys, monkeypatch
):
    (tmp_path / "dying_policy.py").write_text(DYING)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    serve = [sys.executable, "-m", "divla_eval.cli", "serve", "--port"]
    port = subprocess_server([*serve[:-1], "--policy", "dying_policy:DiesInSecondEpisode", "--port"])
    out = tmp_path / "run"
    argv = ["run", "--task", "multitask", "--split", "select_object", "--episodes", "3", "--max-steps", "5"]
    argv += ["--policy", "remote", "--policy-option", f"url=ws://127.0.0.1:{port}", "--out", str(out)]
    argv += ["--policy-option", "connect_timeout=2", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "policy server" in err and "rerun" in err and "Traceback" not in err
    assert [r["episode_index"] for r in _records(out)] == [0]  # what finished is kept
    # the same command resumes once a server is back on the same address
    subprocess_server([*serve[:-1], "--policy", "random", "--port"], port=port)
    assert main(argv) == 0
    assert [r["episode_index"] for r in _records(out)] == [0, 1, 2]
