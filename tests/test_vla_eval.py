"""vla-eval interoperability, both ways, against the real package (PyPI `vla-eval` 0.8.0):
- vla-eval's in-process API runs one of our tasks (divla_eval.integrations.vla_eval) against a tiny
  vla-eval model server, on our named episodes;
- our `vla_eval_remote` policy gets its actions from a vla-eval model server.
The server binds 127.0.0.1 on a free port and is stopped by the fixture."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("vla_eval", reason="vla-eval is not installed (pip install 'divla-eval[vla-eval]')")

from vla_eval.api import run as vla_eval_run  # noqa: E402
from vla_eval.api import serve_background  # noqa: E402
from vla_eval.model_servers.predict import PredictModelServer  # noqa: E402

import divla_eval  # noqa: E402
from divla_eval.errors import DivlaEvalError  # noqa: E402
from divla_eval.tasks import get_task  # noqa: E402


class TinyServer(PredictModelServer):
    """Closes the gripper and moves up: a fixed action, and a record of every observation it got."""

    ACTION = np.array([0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 1.0], dtype=np.float32)

    def __init__(self):
        super().__init__()
        self.seen: list[dict] = []

    def predict(self, obs, ctx):
        self.seen.append(
            {
                "images": {k: np.asarray(v).shape for k, v in obs.get("images", {}).items()},
                "instruction": obs.get("task_description"),
                "state": np.asarray(obs["state"]).shape,
            }
        )
        return {"actions": self.ACTION}


@pytest.fixture(scope="module")
def server():
    model = TinyServer()
    with serve_background(model, host="127.0.0.1", port=0) as handle:
        yield model, handle.url


def test_vla_eval_runs_our_task_on_our_named_episodes(server):
    model, url = server
    model.seen.clear()
    config = {
        "benchmarks": [
            {
                "benchmark": "divla_eval.integrations.vla_eval:MultiTaskBenchmark",
                "episodes_per_task": 2,
                "max_steps": 4,
                "params": {"split": "flip_pot", "image_size": 32, "seed": 3},
            }
        ],
        "render": "cpu",
    }
    (result,) = vla_eval_run(config, server_url=url, docker=False, no_save=True)
    (task,) = result["tasks"]
    assert task["task"] == "multitask/flip_pot" and task["num_episodes"] == 2
    episodes = [e["metrics"] for e in task["episodes"]]
    assert [e["episode_key"] for e in episodes] == [
        "multitask/flip_pot/-/none/00000",
        "multitask/flip_pot/-/none/00001",
    ]
    assert all(e["success"] is False and e["steps"] == 4 for e in episodes)
    assert result["metric_keys"] == {"success": "mean", "partial_score": "mean"}
    # the scene of vla-eval's episode i is ours: same scene seed as divla-eval's run seed 3, episode i
    task_obj = get_task("multitask")
    for i, e in enumerate(episodes):
        assert e["scene_seed"] == task_obj.spec("flip_pot", i, 3).seed("scene")
    assert len(model.seen) == 8  # one observation per step, 4 steps x 2 episodes
    first = model.seen[0]
    assert first["images"] == {"front": (32, 32, 3), "wrist": (32, 32, 3)} and first["state"] == (11,)
    assert first["instruction"] == task_obj.episode(task_obj.spec("flip_pot", 0, 3)).instruction


def test_our_policy_gets_its_actions_from_a_vla_eval_server(server):
    model, url = server
    model.seen.clear()
    result = divla_eval.evaluate(
        "vla_eval_remote",
        task="multitask",
        split="cube_in_box",
        episodes=2,
        max_steps=3,
        image_size=32,
        policy_options={"url": url},
        progress=False,
    )
    assert [r.status for r in result.records] == ["ok", "ok"], [r.error for r in result.records]
    assert all(r.steps == 3 and r.latency_ms["n"] == 3 for r in result.records)  # one call per step
    assert len(model.seen) == 6 and model.seen[0]["images"]["front"] == (32, 32, 3)
    assert result.records[0].policy_info["server"]["model_server"] == "TinyServer"


def test_bad_options_are_one_line_before_anything_connects():
    with pytest.raises(DivlaEvalError, match="needs --policy-option url=ws://HOST:PORT"):
        divla_eval.evaluate("vla_eval_remote", task="multitask", episodes=1)
    with pytest.raises(DivlaEvalError, match="expected ws://HOST:PORT"):
        divla_eval.evaluate(
            "vla_eval_remote", task="multitask", episodes=1, policy_options={"url": "http://x"}
        )
