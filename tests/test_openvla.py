"""OpenVLA baseline: action bins, reserved tokens, shapes, learning, KV-cache decoding, checkpoints,
train -> run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from divla_eval.baselines.openvla.config import OpenVLAConfig  # noqa: E402
from divla_eval.baselines.openvla.model import PROMPT, ActionBins, OpenVLAModel  # noqa: E402
from divla_eval.baselines.openvla.policy import OpenVLAPolicy, check_checkpoint, save_model  # noqa: E402
from divla_eval.checkpoint import CheckpointError  # noqa: E402
from divla_eval.cli import main  # noqa: E402
from divla_eval.divla.tokenizer import build_tokenizer  # noqa: E402
from divla_eval.policy import ActionChunk, Observation, PolicyMetadata  # noqa: E402

TEXTS = [
    "move any object from the right panel into the left basket",
    "put the blue toy car in the basket",
    "clear the table: cups into the bin, plates onto the rack",
]
TINY = {
    "view_tokens": [4, 1],
    "image_size": 28,
    "vision_hidden": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "text_hidden": 32,
    "text_layers": 2,
    "text_heads": 2,
    "text_kv_heads": 1,
    "text_intermediate": 64,
    "vocab_size": 300,
}


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """Shared 2-core machines: one torch thread (see tests/test_diffusion_policy.py for why)."""
    set_threads, before = torch.set_num_threads, torch.get_num_threads()
    set_threads(1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setenv("DIVLA_EVAL_TORCH_THREADS", "1")
    yield
    set_threads(before)


def tiny_model(**kw) -> OpenVLAModel:
    torch.manual_seed(0)
    tokenizer = build_tokenizer([PROMPT.format(instruction=t) for t in TEXTS], 300)
    model = OpenVLAModel(OpenVLAConfig(**{**TINY, **kw}), tokenizer)
    dim = model.cfg.action_dim
    model.bins.set_bounds(-torch.linspace(0.5, 1.0, dim), torch.linspace(0.5, 1.0, dim))
    return model


def batch(b: int = 3, dim: int = 7):
    g = torch.Generator().manual_seed(1)
    return dict(
        images={c: torch.rand(b, 3, 28, 28, generator=g) for c in ("front", "wrist")},
        instructions=[TEXTS[i % 2] for i in range(b)],  # prompts of two lengths: left padding is used
        actions=torch.rand(b, dim, generator=g) - 0.5,
    )


def obs(seed: int, embodiment: str = "panda") -> Observation:
    rng = np.random.default_rng(seed)
    images = {c: rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for c in ("front", "wrist")}
    return Observation(images, rng.normal(size=11), TEXTS[0], embodiment)


def test_bins_round_trip_within_half_a_bin_and_clip_outside():
    bins = ActionBins(3, 256)
    low, high = torch.tensor([-1.0, 0.0, 0.2]), torch.tensor([1.0, 0.05, 0.2])  # the last is constant
    bins.set_bounds(low, high)
    a = low + torch.rand(1000, 3, generator=torch.Generator().manual_seed(0)) * (high - low)
    a = torch.cat([a, low[None], high[None]])  # both ends of the range included
    b = bins.to_bins(a)
    assert b.min() >= 0 and b.max() <= 255 and b.dtype == torch.long
    error = (bins.from_bins(b) - a).abs()
    assert (error <= bins.width / 2 + 1e-6).all(), error.max(0).values
    assert set(b[:, 0].tolist()) >= {0, 255}  # the whole range is used, end bins included
    outside = torch.stack([low - 5, high + 5])
    assert bins.to_bins(outside).tolist() == [[0, 0, 0], [255, 255, 0]]  # a constant dimension: one bin
    decoded, half = bins.from_bins(bins.to_bins(outside)), bins.width / 2
    torch.testing.assert_close(decoded[:, :2], torch.stack([low + half, high - half])[:, :2])  # end centres
    torch.testing.assert_close(decoded[:, 2], torch.tensor([0.2, 0.2]))


def test_action_tokens_are_distinct_and_reserved():
    m = tiny_model()
    tok, first = m.tokenizer, m.first_action_id
    ids = tok.convert_tokens_to_ids([f"<act_{k}>" for k in range(256)])
    assert ids == list(range(first, first + 256)) and len(set(ids)) == 256
    assert (
        len(tok) == first + 256 == m.decoder.get_input_embeddings().num_embeddings == m.lm_head.out_features
    )
    ordinary = [*TEXTS, "pick up the act 5 and the <act thing", "0 1 2 255 bins?", "an unseen stapler"]
    for text in ordinary:
        assert max(tok(text).input_ids) < first, text
    assert all(max(p) < first for p in m.prompt_ids(ordinary))
    tokens = m.action_token_ids(torch.tensor([[-9.0] * 7, [9.0] * 7]))
    assert tokens.tolist() == [[first] * 7, [first + 255] * 7]


def test_shapes_and_loss():
    m = tiny_model()
    b = batch()
    assert m.encode_images(b["images"]).shape == (3, 4 + 1, 32)  # DiVLA's view-adaptive tokens
    out = m(**b)
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert 0 <= out["action_accuracy"] <= 1 and not out["action_accuracy"].requires_grad
    # untrained: about uniform over the whole vocabulary
    assert abs(out["loss"].item() - np.log(len(m.tokenizer))) < 1.0
    actions = m.act(b["images"], TEXTS[0])
    assert actions.shape == (3, 7)
    assert (actions >= m.bins.low).all() and (actions <= m.bins.high).all()


def test_the_conv_stem_option_is_divlas():
    """OpenVLA shares DiVLA's backbone, so a change to DiVLA's vision encoder is open to it too."""
    from divla_eval.divla.model import ConvStem

    m = tiny_model(vision_stem="conv")
    assert isinstance(m.vision.embeddings.patch_embedding, ConvStem)
    assert m.encode_images(batch()["images"]).shape == (3, 4 + 1, 32)
    with pytest.raises(ValueError, match="vision_stem must be one of patch, conv"):
        OpenVLAConfig(**{**TINY, "vision_stem": "cnn"})


def test_keypoint_tokens_follow_the_visual_tokens_are_trained_and_read(tmp_path):
    """`keypoint_token_points` (not OpenVLA's design): one Diffusion Policy keypoint token per camera after
    the SigLIP tokens. The action loss trains the encoders, acting reads them, and they survive a save."""
    m = tiny_model(keypoint_token_points=3, keypoint_channels=(8,))
    b = batch()
    prefix = m.visual_prefix(b["images"])
    assert prefix.shape == (3, 4 + 1 + 2, 32)  # the visual tokens, then one keypoint token per camera
    torch.testing.assert_close(prefix[:, :5], m.encode_images(b["images"]))
    with torch.no_grad():  # each keypoint token carries its camera's view embedding
        m.view_embed.normal_()
        prefix = m.visual_prefix(b["images"])
        for i, c in enumerate(("front", "wrist")):
            expected = m.keypoint_encoders[c](b["images"][c]) + m.view_embed[i]
            torch.testing.assert_close(prefix[:, 5 + i], expected)
        m.view_embed.zero_()  # back to its initial value for the checks below
    m(**b)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.keypoint_encoders.parameters())
    m.eval()
    acted = m.act(b["images"], TEXTS[0])
    for enc in m.keypoint_encoders.values():  # other keypoint tokens, other actions: read
        torch.nn.init.normal_(enc.proj.weight, std=5.0)
    changed = m.act(b["images"], TEXTS[0])
    assert not torch.equal(acted, changed)
    save_model(m, tmp_path / "kp", meta={"steps": 0})
    again = OpenVLAPolicy.from_pretrained(tmp_path / "kp").model
    torch.testing.assert_close(changed, again.act(b["images"], TEXTS[0]), rtol=0, atol=0)
    assert tiny_model().keypoint_encoders is None  # OpenVLA's path by default
    with pytest.raises(ValueError, match="keypoint_token_points must be >= 0"):
        OpenVLAConfig(**{**TINY, "keypoint_token_points": -1})
    with pytest.raises(ValueError, match="keypoint_channels 33: must be below 16 or a multiple of 2"):
        OpenVLAConfig(**{**TINY, "keypoint_token_points": 2, "keypoint_channels": (33,)})


def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch():
    m = tiny_model()
    b = batch()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = m(**b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0], losses
    # after fitting, greedy decoding reproduces the batch's actions to within a bin
    m.eval()
    first = m.act({c: v[:1] for c, v in b["images"].items()}, b["instructions"][0])
    assert (first - b["actions"][:1]).abs().max() < 0.2


def test_generation_decodes_action_dim_tokens_with_the_kv_cache(monkeypatch):
    m = tiny_model().eval()
    calls = []
    forward = m.decoder.forward

    def spy(*args, **kw):
        calls.append((kw["inputs_embeds"].shape[1], kw.get("cache") is not None))
        return forward(*args, **kw)

    monkeypatch.setattr(m.decoder, "forward", spy)
    images = {c: v[:1] for c, v in batch()["images"].items()}
    vis = m.encode_images(images)
    prompt = m.embed_tokens(torch.tensor(m.prompt_ids([TEXTS[0]])))
    prefix = torch.cat([vis, prompt], dim=1)
    bins = m.generate_bins(prefix)
    assert bins.shape == (1, 7)
    # one pass over the prefix, then one token per pass with the cache: 7 passes for 7 tokens
    assert calls == [(prefix.shape[1], False)] + [(1, True)] * 6
    # the cached decoding equals greedy choices over a full pass without a cache
    calls.clear()
    tokens = m.embed_tokens(bins[:, :-1] + m.first_action_id)
    hidden = m.decoder(inputs_embeds=torch.cat([prefix, tokens], dim=1), use_cache=False).last_hidden_state
    logits = m.lm_head(hidden[:, -7:])[..., m.first_action_id : m.first_action_id + 256]
    assert logits.argmax(-1).tolist() == bins.tolist()


def test_save_load_round_trip_gives_identical_actions(tmp_path):
    m = tiny_model().eval()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)  # a few steps, so the weights are not the init
    for _ in range(3):
        opt.zero_grad()
        m(**batch())["loss"].backward()
        opt.step()
    m.eval()
    save_model(m, tmp_path / "ckpt", meta={"steps": 3})
    policy = OpenVLAPolicy.from_pretrained(tmp_path / "ckpt")
    assert policy.metadata.checkpoint_hash and (tmp_path / "ckpt" / "openvla_meta.json").is_file()
    assert not list(tmp_path.glob("ckpt/*.bin")) and not list(tmp_path.glob("ckpt/*.pt"))
    assert policy.model.first_action_id == m.first_action_id
    torch.testing.assert_close(policy.model.bins.low, m.bins.low, rtol=0, atol=0)
    images = {c: v[:2] for c, v in batch()["images"].items()}
    torch.testing.assert_close(m.act(images, TEXTS[1]), policy.model.act(images, TEXTS[1]), rtol=0, atol=0)
    np.testing.assert_array_equal(OpenVLAPolicy(m).infer(obs(0)).actions, policy.infer(obs(0)).actions)


@pytest.mark.parametrize("embodiment, dim", [("panda", 7), ("bimanual_panda", 14)])
def test_policy_returns_one_action_of_the_robot_dimension(embodiment, dim):
    policy = OpenVLAPolicy(tiny_model(embodiment=embodiment, action_dim=dim))
    assert policy.metadata == PolicyMetadata(
        name="openvla", cameras=("front", "wrist"), execute_steps=1, reasoning=False
    )
    policy.reset(TEXTS[0], seed=0)
    chunk = policy.infer(obs(0, embodiment))
    assert isinstance(chunk, ActionChunk) and chunk.actions.shape == (1, dim) and chunk.reasoning is None
    assert chunk.actions.dtype == np.float64
    other = "panda" if embodiment != "panda" else "bimanual_panda"
    with pytest.raises(CheckpointError, match=f"trained for {embodiment!r}, not {other!r}"):
        policy.infer(obs(0, other))


def test_checkpoint_errors_are_one_line(tmp_path):
    def error(path, embodiment=None, load=False):
        with pytest.raises(CheckpointError) as info:
            OpenVLAPolicy.from_pretrained(path) if load else check_checkpoint(path, embodiment)
        assert len(str(info.value).splitlines()) == 1, str(info.value)
        return str(info.value)

    assert "does not exist" in error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "missing config.json, model.safetensors, tokenizer.json" in error(tmp_path / "empty")
    save_model(tiny_model(), tmp_path / "ok")
    # no proprioception is read, so its dimension does not matter; the robot does
    assert check_checkpoint(tmp_path / "ok", "panda", proprio_dim=9)["action_dim"] == 7
    assert "trained for 'panda', not for 'bimanual_panda'" in error(tmp_path / "ok", "bimanual_panda")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg, "action_dim": 6}))
    assert "do not match config.json" in error(tmp_path / "ok", load=True)
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg, "bogus": 1}))
    assert "unknown OpenVLA config keys ['bogus']" in error(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps({"text_config": {}, "embodiments": {}}))
    assert "is a DiVLA checkpoint" in error(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"garbage")
    assert "damaged" in error(tmp_path / "ok", load=True)


def test_a_pretrained_backbone_without_spare_rows_grows_its_vocabulary(tmp_path):
    """A local HF directory as `vlm_pretrained`: the action tokens get new embedding rows, the old
    ones keep their weights, and the checkpoint rebuilds without the directory."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer([PROMPT.format(instruction=t) for t in TEXTS], 300)
    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    qwen.save_pretrained(tmp_path / "qwen")
    m = OpenVLAModel(OpenVLAConfig(**{**TINY, "vlm_pretrained": str(tmp_path / "qwen")}), tok)
    assert m.lm_head.out_features == len(tok) == m.first_action_id + 256
    assert m.cfg.text_config["vocab_size"] == len(tok)
    torch.testing.assert_close(m.lm_head.weight[: m.first_action_id], qwen.lm_head.weight)
    embed = m.decoder.get_input_embeddings().weight[: m.first_action_id]
    torch.testing.assert_close(embed, qwen.model.embed_tokens.weight)
    save_model(m.eval(), tmp_path / "ckpt")
    images = {c: v[:1] for c, v in batch()["images"].items()}
    again = OpenVLAPolicy.from_pretrained(tmp_path / "ckpt").model
    torch.testing.assert_close(m.act(images, TEXTS[0]), again.act(images, TEXTS[0]), rtol=0, atol=0)


def test_train_then_evaluate_from_the_command_line(demos, tmp_path):
    out = tmp_path / "openvla"
    opts = [f"--model-option={k}={json.dumps(v)}" for k, v in TINY.items()]
    argv = ["train", "--policy", "openvla", "--task", "bin_picking", "--demos", str(demos), "--out", str(out)]
    assert main([*argv, "--steps", "2", "--batch-size", "4", "--no-progress", *opts]) == 0
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "openvla_meta.json",
        "train_log.jsonl",
    ):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["embodiment"], cfg["action_dim"], cfg["n_bins"]) == ("panda", 7, 256)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(r["loss"] > 0 for r in rows)
    assert "action_accuracy" in rows[0]
    # the bins span the 1st..99th percentiles of the training demos' actions
    from divla_eval.data.dataset import action_stats
    from divla_eval.train import _split

    stats = action_stats(demos, _split(demos))  # the demos trained on
    model = OpenVLAPolicy.from_pretrained(out).model
    np.testing.assert_allclose(model.bins.low.numpy(), stats["q01"], rtol=1e-6)
    np.testing.assert_allclose(model.bins.high.numpy(), stats["q99"], rtol=1e-6)

    run_dir = tmp_path / "run"
    argv = ["run", "--policy", "openvla", "--checkpoint", str(out), "--episodes", "1", "--max-steps", "3"]
    assert main([*argv, "--image-size", "28", "--out", str(run_dir), "--no-progress"]) == 0
    record = json.loads((run_dir / "episodes.jsonl").read_text().splitlines()[0])
    assert record["status"] == "ok", record["error"]
    assert record["policy"] == "openvla" and record["checkpoint_hash"]
    assert record["steps"] == 3 and record["latency_ms"]["n"] == 3  # one call per step: no chunking
    assert record["reasoning_trace"] == []


def test_bad_training_options_are_one_line_errors(demos, tmp_path, capsys):
    argv = [
        "train",
        "--policy",
        "openvla",
        "--demos",
        str(demos),
        "--out",
        str(tmp_path / "x"),
        "--steps",
        "1",
    ]
    assert main([*argv, "--no-progress", "--model-option", "action_dim=14"]) == 2
    err = capsys.readouterr().err
    assert "read from the demonstrations" in err and len(err.strip().splitlines()) == 1


def test_ship_checkpoint_writes_a_half_precision_copy_that_acts_alike(tmp_path):
    """scripts/ship_checkpoint.py recognises a baseline from its config, keeps its meta and command,
    and the fp16 copy acts (nearly) as the fp32 original; the reference scripts evaluate that copy."""
    import subprocess
    import sys

    from safetensors import safe_open

    m = tiny_model().eval()
    save_model(m, tmp_path / "run", meta={"steps": 3})
    (tmp_path / "run" / "train_log.jsonl").write_text('{"step": 0}\n')
    script = Path(__file__).parents[1] / "scripts" / "ship_checkpoint.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run"), str(tmp_path / "ship"), "--command", "train X"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "openvla" in out
    with safe_open(str(tmp_path / "ship" / "model.safetensors"), "pt") as f:
        assert f.metadata()["dtype"] == "float16"
    meta = json.loads((tmp_path / "ship" / "openvla_meta.json").read_text())
    assert meta["steps"] == 3 and meta["command"] == "train X" and meta["dtype"] == "float16"
    assert (tmp_path / "ship" / "train_log.jsonl").is_file()
    shipped = OpenVLAPolicy.from_pretrained(tmp_path / "ship")
    torch.testing.assert_close(shipped.model.bins.low, m.bins.low, rtol=1e-3, atol=1e-3)
    bad = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "nothing"), str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "no config.json" in bad.stderr and "Traceback" not in bad.stderr
