"""Diffusion Policy baseline: shapes, learning, checkpoints, the observation history, train -> run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import TINY_DIFFUSION_POLICY  # noqa: E402

from divla_eval.baselines.diffusion_policy.config import DiffusionPolicyConfig  # noqa: E402
from divla_eval.baselines.diffusion_policy.model import DiffusionPolicyModel  # noqa: E402
from divla_eval.baselines.diffusion_policy.policy import (  # noqa: E402
    DiffusionPolicy,
    check_checkpoint,
    save_model,
)
from divla_eval.checkpoint import CheckpointError  # noqa: E402
from divla_eval.cli import main  # noqa: E402
from divla_eval.errors import DivlaEvalError  # noqa: E402
from divla_eval.policy import ActionChunk, Observation, PolicyMetadata  # noqa: E402

TINY = TINY_DIFFUSION_POLICY  # the shared tiny config (tests/conftest.py)


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """Tests run on shared 2-core machines, where two OpenMP threads wait for each other's time slice
    at every op (a tiny backward pass took 2.7 s with two threads, 17 ms with one). `train` and the
    runner would set two threads again, so their calls are neutralised here."""
    set_threads, before = torch.set_num_threads, torch.get_num_threads()
    set_threads(1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setenv("DIVLA_EVAL_TORCH_THREADS", "1")
    yield
    set_threads(before)


def tiny_model(**kw) -> DiffusionPolicyModel:
    torch.manual_seed(0)
    return DiffusionPolicyModel(DiffusionPolicyConfig(**{**TINY, "image_size": 28, **kw}))


def batch(b: int = 3):
    g = torch.Generator().manual_seed(1)
    return dict(
        images={c: torch.rand(b, 2, 3, 28, 28, generator=g) for c in ("front", "wrist")},
        proprio=torch.randn(b, 2, 11, generator=g),
        actions=torch.rand(b, 8, 7, generator=g) * 2 - 1,
    )


def obs(seed: int) -> Observation:
    rng = np.random.default_rng(seed)
    images = {c: rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for c in ("front", "wrist")}
    return Observation(images, rng.normal(size=11), "put the car in the basket", "panda")


def test_shapes_and_metadata():
    m = tiny_model()
    b = batch()
    assert m.encode(b["images"], b["proprio"]).shape == (3, 2 * (2 * 8 + 11)) == (3, m.cfg.cond_dim)
    loss = m(**b)
    assert set(loss) == {"loss"} and torch.isfinite(loss["loss"])
    assert m.act(b["images"], b["proprio"]).shape == (3, 8, 7)
    policy = DiffusionPolicy(m)
    assert policy.metadata == PolicyMetadata(
        name="diffusion_policy", cameras=("front", "wrist"), execute_steps=4, reasoning=False, obs_horizon=2
    )
    policy.reset("any", seed=0)
    chunk = policy.infer(obs(0))
    assert isinstance(chunk, ActionChunk) and chunk.actions.shape == (8, 7) and chunk.reasoning is None
    assert DiffusionPolicy.requires_checkpoint


def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch():
    m = tiny_model()
    b = batch()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = m(**b, generator=torch.Generator().manual_seed(0))  # same noise: a deterministic target
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_save_load_round_trip_gives_identical_actions(tmp_path):
    m = tiny_model().eval()
    m.set_stats(-np.ones(7) * 0.5, np.ones(7), np.zeros(11), np.ones(11) * 2)
    save_model(m, tmp_path / "ckpt", meta={"steps": 0})
    policy = DiffusionPolicy.from_pretrained(tmp_path / "ckpt")
    assert policy.metadata.checkpoint_hash
    b = batch(1)
    noise = torch.randn(1, 8, 7)
    a = m.act(b["images"], b["proprio"], noise=noise.clone())
    again = policy.model.act(b["images"], b["proprio"], noise=noise.clone())
    torch.testing.assert_close(a, again, rtol=0, atol=0)
    assert a.min() >= -0.5 - 1e-6  # unnormalised with the stored statistics
    chunks = []
    for _ in range(2):
        policy.reset("x", seed=3)
        chunks.append(policy.infer(obs(0)).actions)
    np.testing.assert_array_equal(*chunks)  # seeded noise: deterministic
    policy.save_pretrained(tmp_path / "half", half=True)
    half = DiffusionPolicy.from_pretrained(tmp_path / "half").model
    torch.testing.assert_close(half.action_min, m.action_min)
    assert half.unet.final[1].weight.dtype == torch.float32


def test_the_previous_observation_conditions_the_action():
    policy = DiffusionPolicy(tiny_model())
    a, b, c = obs(0), obs(1), obs(2)

    def act(*history):
        policy.reset("x", seed=5)
        for o in history[:-1]:
            policy.observe(o)
        return policy.infer(history[-1]).actions

    assert not np.array_equal(act(a, c), act(b, c))  # same current observation, other previous one
    np.testing.assert_array_equal(act(c), act(c, c))  # first call: the observation is repeated
    np.testing.assert_array_equal(act(b, a, c), act(a, c))  # only the last two count
    policy.reset("x", seed=5)
    policy.observe(a)
    np.testing.assert_array_equal(act(c), act(c))  # reset forgets the last episode


def test_the_runner_hands_over_the_step_before_each_call():
    """Calls are 4 steps apart; the policy must also see step t-1 of every call at t."""
    seen = []

    class Recorder:
        metadata = PolicyMetadata(name="rec", execute_steps=4, obs_horizon=2)

        def reset(self, instruction, seed):
            pass

        def observe(self, o):
            seen.append(("observe", int(o.proprio[0])))

        def infer(self, o):
            seen.append(("infer", int(o.proprio[0])))
            return ActionChunk(actions=np.zeros((8, 7)))

    class Env:
        steps, embodiment, sim, perturbation_params = 0, "panda", None, []
        episode = SimpleNamespace(instruction="x", object_ids=[], failure_mode=lambda sim: "timeout")

        def reset(self, options):
            self.steps = 0

        def observe(self, cameras):
            return {"proprio": np.array([self.steps]), "instruction": "x"}

        def advance(self, action):
            self.steps += 1
            return StepResult(False, self.steps >= 10, False, 0.0)

    from divla_eval.envs.gym_env import StepResult
    from divla_eval.runner import run_episode

    run_episode(Env(), SimpleNamespace(seed=lambda kind: 0), Recorder())
    assert seen == [("infer", 0), ("observe", 3), ("infer", 4), ("observe", 7), ("infer", 8)]


def test_checkpoint_errors_are_one_line(tmp_path):
    def error(path, embodiment=None, load=False):
        with pytest.raises(CheckpointError) as info:
            DiffusionPolicy.from_pretrained(path) if load else check_checkpoint(path, embodiment)
        assert len(str(info.value).splitlines()) == 1, str(info.value)
        return str(info.value)

    assert "does not exist" in error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "missing config.json, model.safetensors" in error(tmp_path / "empty")
    save_model(tiny_model(), tmp_path / "ok")
    assert check_checkpoint(tmp_path / "ok", "panda")["chunk"] == 8
    assert "trained for 'panda', not for 'bimanual_panda'" in error(tmp_path / "ok", "bimanual_panda")
    proprio = json.loads((tmp_path / "ok" / "config.json").read_text())["proprio_dim"]
    with pytest.raises(CheckpointError, match=f"trained on {proprio}-D proprioception"):
        check_checkpoint(tmp_path / "ok", "panda", proprio_dim=proprio + 2)
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg, "feature_dim": 12}))  # other shapes
    assert "do not match config.json" in error(tmp_path / "ok", load=True)
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg, "bogus": 1}))
    assert "unknown Diffusion Policy config keys ['bogus']" in error(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg, "execute_steps": 99}))
    assert "execute_steps must be in 1..chunk" in error(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text("{not json")
    assert "damaged" in error(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps({"text_config": {}, "embodiments": {}}))
    assert "is a DiVLA checkpoint" in error(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"garbage")
    assert "damaged" in error(tmp_path / "ok", load=True)


def test_observations_the_model_was_not_trained_on_are_refused():
    policy = DiffusionPolicy(tiny_model())
    small = obs(0)
    small.images = {c: v[:16, :16] for c, v in small.images.items()}
    with pytest.raises(DivlaEvalError, match="trained on 28 px images.*--image-size 28"):
        policy.infer(small)
    with pytest.raises(CheckpointError, match="trained for 'panda', not 'bimanual_panda'"):
        policy.infer(Observation(obs(0).images, np.zeros(11), "x", "bimanual_panda"))


@pytest.mark.parametrize(
    "option, needle",
    [
        ("bogus=1", "unknown Diffusion Policy option 'bogus'; valid: "),
        ("chunk=abc", "chunk='abc': expected int"),
        ("image_size=84", "read from the demonstrations"),
        ("execute_steps=40", "execute_steps must be in 1..chunk"),
    ],
)
def test_bad_training_options_are_one_line_errors(demos, tmp_path, capsys, option, needle):
    argv = ["train", "--policy", "diffusion_policy", "--demos", str(demos), "--out", str(tmp_path / "x")]
    assert main([*argv, "--steps", "1", "--no-progress", "--model-option", option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("divla-eval: error:") and needle in err and len(err.strip().splitlines()) == 1


def test_train_then_evaluate_from_the_command_line(demos, tmp_path):
    out = tmp_path / "dp"
    opts = [f"--model-option={k}={json.dumps(v)}" for k, v in TINY.items()]
    argv = ["train", "--policy", "diffusion_policy", "--task", "bin_picking", "--demos", str(demos)]
    assert main([*argv, "--out", str(out), "--steps", "3", "--batch-size", "4", "--no-progress", *opts]) == 0
    for name in ("config.json", "model.safetensors", "diffusion_policy_meta.json", "train_log.jsonl"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["image_size"], cfg["obs_horizon"], cfg["embodiment"]) == (28, 2, "panda")
    assert json.loads((out / "diffusion_policy_meta.json").read_text())["steps"] == 3
    train = [*argv, "--out", str(out), "--batch-size", "4", "--no-progress", *opts]
    assert main([*train, "--steps", "4"]) == 0  # more steps: resumes from step 3
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 3]

    run_dir = tmp_path / "run"
    argv = ["run", "--policy", "diffusion_policy", "--checkpoint", str(out), "--episodes", "1", "--max-steps"]
    assert main([*argv, "10", "--image-size", "28", "--out", str(run_dir), "--no-progress"]) == 0
    record = json.loads((run_dir / "episodes.jsonl").read_text().splitlines()[0])
    assert record["status"] == "ok", record["error"]
    assert record["policy"] == "diffusion_policy" and record["checkpoint_hash"]
    assert record["steps"] == 10 and record["latency_ms"]["n"] == 3  # calls at steps 0, 4, 8
    assert record["reasoning_trace"] == []
