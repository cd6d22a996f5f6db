"""`--policy-option KEY=VALUE`: a learned policy's inference options, from the CLI to the policy.

Names and types are checked against the policy's `INFERENCE_OPTIONS`, ranges against its checkpoint,
all before anything is built; the options land in the manifest (and the resume key) and in every
episode record; DiVLA and Diffusion Policy really run the DDIM steps and replan period asked for.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_DIVLA

from divla_eval.cli import main
from divla_eval.errors import ConfigMismatchError, DivlaEvalError
from divla_eval.policy import (
    POLICIES,
    ActionChunk,
    Observation,
    PolicyMetadata,
    inference_options,
    parse_policy_options,
)
from divla_eval.records import EpisodeStore
from divla_eval.runner import RunConfig, run

SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints" / "divla-bin_picking"


def _one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        sys.exit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("divla-eval: error:"), err
    return err[0]


# --- names and types: checked before anything is built -------------------------------------------------
@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["--policy", "divla", "--policy-option", "temperature=2"],
            "unknown policy option 'temperature' for divla; valid: execute_steps, inference_steps, "
            "oracle_reasoning, reasoning_every",
        ),
        (
            ["--policy", "diffusion_policy", "--policy-option", "reasoning_every=2"],
            "valid: execute_steps, inference_steps",
        ),
        (["--policy", "divla", "--policy-option", "inference_steps=many"], "expected int"),
        (["--policy", "octo", "--policy-option", "execute_steps=2.5"], "expected int"),
        (["--policy", "openvla", "--policy-option", "inference_steps=2"], "has no inference options"),
        (["--policy", "scripted", "--policy-option", "inference_steps=2"], "loads no checkpoint"),
        (["--policy", "random", "--policy-option", "execute_steps=2"], "takes no --policy-option"),
        (["--policy", "divla", "--policy-option", "novalue"], "expected KEY=VALUE"),
    ],
)
def test_bad_policy_options_are_one_line_exit_2(argv, needle, capsys):
    assert needle in _one_line_error(["run", *argv], capsys)


@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="needs the shipped DiVLA checkpoint")
@pytest.mark.parametrize(
    "option, needle",
    [
        ("execute_steps=17", "execute_steps=17 is out of range: valid 1..16"),
        ("inference_steps=0", "inference_steps=0 is out of range: valid 1..100"),
        ("reasoning_every=-1", "reasoning_every=-1 is out of range: valid >= 0"),
    ],
)
def test_out_of_range_values_are_checked_against_the_checkpoint(option, needle, capsys):
    argv = ["run", "--policy", "divla", "--checkpoint", str(SHIPPED), "--policy-option", option]
    assert needle in _one_line_error(argv, capsys)


def test_declared_options_per_policy():
    steps = {"inference_steps": int, "execute_steps": int}
    assert inference_options("divla") == {"reasoning_every": int, "oracle_reasoning": int, **steps}
    assert inference_options("diffusion_policy") == inference_options("octo") == steps
    assert inference_options("openvla") == inference_options("scripted") == inference_options("random") == {}
    assert parse_policy_options("divla", {"inference_steps": " 5", "execute_steps": 4}) == {
        "inference_steps": 5,
        "execute_steps": 4,
    }
    with pytest.raises(DivlaEvalError, match="expected int"):
        parse_policy_options("divla", {"execute_steps": True})  # a bool is not a step count


def test_bench_policy_option_no_listed_policy_takes(capsys):
    err = _one_line_error(["bench", "--policies", "random", "--policy-option", "inference_steps=2"], capsys)
    assert "no policy in --policies random takes it; valid: none" in err


# --- through the runner: manifest, records, resume key, the override the runner reads ------------------
class _Chunky:
    """A fake learned policy: 4-action chunks of "hold still", one inference option."""

    requires_checkpoint = True
    INFERENCE_OPTIONS = {"execute_steps": int}

    def __init__(self, execute_steps: int = 4):
        self.metadata = PolicyMetadata(name="chunky", execute_steps=execute_steps)

    @classmethod
    def from_pretrained(cls, path, execute_steps: int = 4):
        return cls(execute_steps)

    def reset(self, instruction, seed):
        pass

    def infer(self, obs):
        return ActionChunk(actions=np.tile([0, 0, 0, 0, 0, 0, -1.0], (4, 1)))


@pytest.fixture
def chunky(monkeypatch, tmp_path):
    monkeypatch.setitem(POLICIES._targets, "chunky", _Chunky)
    monkeypatch.setitem(POLICIES._descriptions, "chunky", "")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    return str(ckpt)


def _cfg(checkpoint, **options):
    return RunConfig(policy="chunky", checkpoint=checkpoint, episodes=1, max_steps=8, policy_options=options)


def test_options_reach_the_policy_the_manifest_and_every_record(chunky, tmp_path):
    from divla_eval.metrics import records_frame

    run(_cfg(chunky, execute_steps=2), tmp_path / "two", progress=False)
    run(_cfg(chunky), tmp_path / "default", progress=False)
    two = EpisodeStore(tmp_path / "two" / "episodes.jsonl").load()
    default = EpisodeStore(tmp_path / "default" / "episodes.jsonl").load()
    # 8 steps: the override (2 actions per call) makes 4 calls, the policy's own 4 actions per call 2
    assert two[0].latency_ms["n"] == 4 and default[0].latency_ms["n"] == 2
    assert two[0].policy_options == {"execute_steps": 2} and default[0].policy_options == {}
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["config"]["policy_options"] == {"execute_steps": 2}
    # no options: no key, so run directories made before the option existed still resume
    assert "policy_options" not in json.loads((tmp_path / "default" / "manifest.json").read_text())["config"]
    # result tables keep the two apart (and `summary` does not drop one as a duplicate of the other)
    frame = records_frame(two + default)
    assert list(frame["policy"]) == ["chunky (execute_steps=2)", "chunky"]


def test_resume_with_other_options_is_refused(chunky, tmp_path, capsys):
    out = tmp_path / "run"
    run(_cfg(chunky, execute_steps=2), out, progress=False)
    with pytest.raises(ConfigMismatchError, match=r"policy_options.execute_steps: 2 -> 3"):
        run(_cfg(chunky, execute_steps=3), out, progress=False)
    with pytest.raises(ConfigMismatchError, match=r"policy_options.execute_steps: 2 -> <unset>"):
        run(_cfg(chunky), out, progress=False)
    base = ["run", "--policy", "chunky", "--checkpoint", chunky, "--episodes", "1", "--max-steps", "8"]
    err = _one_line_error([*base, "--out", str(out), "--policy-option", "execute_steps=3"], capsys)
    assert "different config" in err and "policy_options.execute_steps: 2 -> 3" in err
    # the same options resume: nothing runs twice
    assert main([*base, "--out", str(out), "--policy-option", "execute_steps=2", "--no-progress"]) == 0
    assert "policy=chunky (execute_steps=2): success 0/1" in capsys.readouterr().out
    assert len(EpisodeStore(out / "episodes.jsonl").load()) == 1


# --- the real policies: the DDIM steps and replan period asked for ------------------------------------
def _count_calls(monkeypatch, obj, name) -> list:
    """A list that grows by one at each call of `obj.name` (a method or a torch submodule)."""
    calls = []
    real = getattr(obj, name)
    if hasattr(real, "register_forward_hook"):  # a submodule cannot be replaced by a function
        real.register_forward_hook(lambda *_: calls.append(1))
        return calls

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, counting)
    return calls


def _obs(seed: int = 0) -> Observation:
    rng = np.random.default_rng(seed)
    images = {c: rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for c in ("front", "wrist")}
    return Observation(images, rng.normal(size=11), "grasp the blue toy car", "panda")


def test_divla_inference_steps_and_execute_steps(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from divla_eval.divla.config import DiVLAConfig
    from divla_eval.divla.model import DiVLAModel
    from divla_eval.divla.policy import save_model
    from divla_eval.divla.tokenizer import build_tokenizer
    from divla_eval.policy import make_policy

    torch.manual_seed(0)
    texts = ["grasp the blue toy car", "place it in the basket", "the task is done"]
    save_model(DiVLAModel(DiVLAConfig(**TINY_DIVLA), build_tokenizer(texts, 300)), tmp_path / "ckpt")
    ckpt = str(tmp_path / "ckpt")

    def actions(policy, n_unet: int):
        unet = _count_calls(monkeypatch, policy.model, "_eps")
        policy.reset("grasp the blue toy car", seed=3)
        a = policy.infer(_obs()).actions
        assert len(unet) == n_unet and len(policy.model.infer_scheduler.timesteps) == n_unet
        return a

    default = make_policy("divla", ckpt)
    assert default.metadata.execute_steps == 4
    base = actions(default, 3)  # the config's 3 DDIM steps
    same = make_policy("divla", ckpt, options={"inference_steps": "3", "execute_steps": "4"})
    np.testing.assert_array_equal(actions(same, 3), base)  # the config's own values: bit-identical
    options = {"inference_steps": 2, "execute_steps": 8, "reasoning_every": 0}
    fast = make_policy("divla", ckpt, options=options)
    assert fast.metadata.execute_steps == 8 and fast.reasoning_every == 0
    assert not np.array_equal(actions(fast, 2), base)
    # the override lives in the policy: the model's config, and the saved one, keep 3 and 4
    assert fast.model.cfg.inference_steps == 3 and fast.model.cfg.execute_steps == 4
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["inference_steps"] == 3 and saved["execute_steps"] == 4
    with pytest.raises(DivlaEvalError, match="execute_steps=9 is out of range: valid 1..8"):
        make_policy("divla", ckpt, options={"execute_steps": 9})


def test_diffusion_policy_inference_steps_and_execute_steps(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from divla_eval.baselines.diffusion_policy.config import DiffusionPolicyConfig
    from divla_eval.baselines.diffusion_policy.model import DiffusionPolicyModel
    from divla_eval.baselines.diffusion_policy.policy import save_model
    from divla_eval.policy import make_policy

    torch.manual_seed(0)
    tiny = dict(
        encoder_channels=[8, 16],
        num_keypoints=4,
        feature_dim=8,
        chunk=8,
        execute_steps=4,
        unet_down_dims=[16, 32],
        step_embed_dim=8,
        train_diffusion_steps=20,
        inference_steps=3,
        image_size=28,
    )
    save_model(DiffusionPolicyModel(DiffusionPolicyConfig(**tiny)), tmp_path / "ckpt")
    ckpt = str(tmp_path / "ckpt")
    for options, steps, execute in [({}, 3, 4), ({"inference_steps": "2", "execute_steps": "1"}, 2, 1)]:
        policy = make_policy("diffusion_policy", ckpt, options=options)
        unet = _count_calls(monkeypatch, policy.model, "unet")
        policy.reset("", seed=0)
        policy.infer(_obs())
        assert len(unet) == steps and policy.metadata.execute_steps == execute


# --- oracle_reasoning: the expert's phrase in place of the generated one (a diagnostic) ---------------
class _Echo(_Chunky):
    """A fake reasoning policy that writes whatever phrase the runner hands it (None: "")."""

    INFERENCE_OPTIONS = {"oracle_reasoning": int}

    def __init__(self, oracle_reasoning: int = 0):
        self.metadata = PolicyMetadata(
            name="echo", execute_steps=4, reasoning=True, oracle_reasoning=bool(oracle_reasoning)
        )
        self.seen: list = []

    @classmethod
    def from_pretrained(cls, path, oracle_reasoning: int = 0):
        return cls(oracle_reasoning)

    def infer(self, obs):
        self.seen.append(obs.expert_reasoning)
        return ActionChunk(np.tile([0, 0, 0, 0, 0, 0, -1.0], (4, 1)), reasoning=obs.expert_reasoning or "")


@pytest.mark.parametrize("oracle", [0, 1])
def test_the_runner_hands_the_expert_phrase_only_to_an_oracle_policy(oracle, monkeypatch, tmp_path):
    monkeypatch.setitem(POLICIES._targets, "echo", _Echo)
    monkeypatch.setitem(POLICIES._descriptions, "echo", "")
    (tmp_path / "ckpt").mkdir()
    options = {"oracle_reasoning": oracle} if oracle else {}
    cfg = RunConfig(
        policy="echo", checkpoint=str(tmp_path / "ckpt"), episodes=1, max_steps=8, policy_options=options
    )
    run(cfg, tmp_path / "run", progress=False)
    (record,) = EpisodeStore(tmp_path / "run" / "episodes.jsonl").load()
    trace = record.reasoning_trace
    assert len(trace) == 2 and all(e["expert"] for e in trace)  # 8 steps, 4 actions per call
    if oracle:  # the phrase the policy got is the one it is scored against, at the same step
        assert [e["text"] for e in trace] == [e["expert"] for e in trace] and record.reasoning_accuracy == 1.0
    else:
        assert [e["text"] for e in trace] == ["", ""] and record.reasoning_accuracy == 0.0


def test_divla_oracle_reasoning_conditions_on_the_given_phrase(tmp_path):
    torch = pytest.importorskip("torch")
    from divla_eval.divla.config import DiVLAConfig
    from divla_eval.divla.model import DiVLAModel
    from divla_eval.divla.policy import save_model
    from divla_eval.divla.tokenizer import build_tokenizer
    from divla_eval.policy import make_policy

    torch.manual_seed(0)
    texts = ["grasp the blue toy car", "place it in the basket", "the task is done"]
    save_model(DiVLAModel(DiVLAConfig(**TINY_DIVLA), build_tokenizer(texts, 300)), tmp_path / "ckpt")
    ckpt = str(tmp_path / "ckpt")
    oracle = make_policy("divla", ckpt, options={"oracle_reasoning": 1})
    assert oracle.metadata.oracle_reasoning

    def call(policy, phrase):
        policy.reset("grasp the blue toy car", seed=3)
        obs = _obs()
        obs.expert_reasoning = phrase
        return policy.infer(obs)

    done = call(oracle, "the task is done")
    assert done.reasoning == "the task is done"
    gen = torch.Generator().manual_seed(3)  # what the policy's reset seeds its noise with
    o = _obs()
    images = {c: torch.from_numpy(o.images[c]).permute(2, 0, 1)[None].float().div(255) for c in o.images}
    forced = oracle.model.act(
        images,
        torch.as_tensor(o.proprio, dtype=torch.float32)[None],
        o.instruction,
        "panda",
        generator=gen,
        reasoning="the task is done",
    )
    np.testing.assert_allclose(done.actions, forced.actions[0].numpy(), rtol=0, atol=1e-6)
    assert not np.array_equal(call(oracle, "place it in the basket").actions, done.actions)
    with pytest.raises(DivlaEvalError, match="oracle_reasoning=1 needs the scripted expert's phrase"):
        call(oracle, None)
    # off by default: the phrase handed over is ignored, the policy generates its own
    own = make_policy("divla", ckpt)
    assert not own.metadata.oracle_reasoning
    np.testing.assert_array_equal(call(own, "the task is done").actions, call(own, None).actions)
    with pytest.raises(DivlaEvalError, match="oracle_reasoning=2 is out of range: valid 0..1"):
        make_policy("divla", ckpt, options={"oracle_reasoning": 2})
