"""DiVLA: shapes, losses, FiLM wiring, embodiment heads, KV-cache generation, checkpoints."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TINY_DIVLA

torch = pytest.importorskip("torch")

from divla_eval.divla.config import DiVLAConfig  # noqa: E402
from divla_eval.divla.model import ConvStem, DiVLAModel  # noqa: E402
from divla_eval.divla.policy import CheckpointError, DiVLAPolicy, check_checkpoint, save_model  # noqa: E402
from divla_eval.divla.tokenizer import build_tokenizer  # noqa: E402
from divla_eval.policy import Observation  # noqa: E402

TEXTS = [
    "move any object from the right panel into the left basket",
    "grasp the blue toy car",
    "place it in the basket",
    "the task is done",
]


def tiny_config(**kw) -> DiVLAConfig:
    """The shared tiny config (conftest), with room for 6 phrase tokens."""
    return DiVLAConfig(**{**TINY_DIVLA, "max_reasoning_tokens": 6, **kw})


def tiny_model(**kw) -> DiVLAModel:
    torch.manual_seed(0)
    return DiVLAModel(tiny_config(**kw), build_tokenizer(TEXTS, 300))


def batch(b: int = 3, size: int = 28):
    g = torch.Generator().manual_seed(1)
    return dict(
        images={c: torch.rand(b, 3, size, size, generator=g) for c in ("front", "wrist")},
        proprio=torch.randn(b, 11, generator=g),
        instructions=[TEXTS[0]] * b,
        reasonings=[TEXTS[1 + i % 3] for i in range(b)],
        actions=torch.rand(b, 8, 7, generator=g) * 2 - 1,
        embodiment="panda",
    )


def single_obs(b):
    return {c: v[:1] for c, v in b["images"].items()}, b["proprio"][:1]


def test_stage_shapes():
    m = tiny_model()
    b = batch()
    vis = m.encode_images(b["images"])
    assert vis.shape == (3, 4 + 1, 32)  # view-adaptive: 4 front tokens, 1 wrist token
    losses = m(**b)
    assert set(losses) == {"loss", "l_diff", "l_ntp"} and all(torch.isfinite(v) for v in losses.values())
    assert torch.allclose(losses["loss"], losses["l_diff"] + 10.0 * losses["l_ntp"])
    images, proprio = single_obs(b)
    out = m.act(images, proprio, TEXTS[0], "panda", generator=torch.Generator().manual_seed(0))
    assert out.actions.shape == (1, 8, 7)
    assert out.reasoning_embedding.shape == (1, 32)
    assert len(out.reasoning_ids[0]) <= 6


def test_several_noise_draws_per_observation_share_one_encoder_pass():
    m = tiny_model(diffusion_samples=4)
    calls = []
    m.vision.register_forward_hook(lambda *_: calls.append(1))
    seen = []
    m.unet.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    out = m(**batch(), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["l_diff"]) and len(calls) == 1 and seen == [3 * 4]


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


def test_reasoning_embedding_reaches_the_action_head_through_film():
    m = tiny_model()
    for film in (mod for mod in m.unet.modules() if mod.__class__.__name__ == "FiLM"):
        torch.nn.init.normal_(film.proj[1].weight, std=0.3)  # trained FiLM layers are not the identity
    head = m.heads["panda"]
    x, t = torch.randn(1, 8, 7), torch.tensor(5)
    cond = torch.randn(1, 2 * 16 + 8)
    r1, r2 = torch.randn(1, 32), torch.randn(1, 32)
    with torch.no_grad():
        assert not torch.allclose(m._eps(head, x, t, cond, r1), m._eps(head, x, t, cond, r2))
    ablated = tiny_model(reasoning_injection=False)  # TinyVLA's head: no FiLM from the reasoning
    assert all(blk.film is None for blk in ablated.unet.modules() if hasattr(blk, "film"))
    with torch.no_grad():
        h = ablated.heads["panda"]
        torch.testing.assert_close(ablated._eps(h, x, t, cond, r1), ablated._eps(h, x, t, cond, r2))


def test_forced_reasoning_changes_the_action():
    m = tiny_model()
    for film in (mod for mod in m.unet.modules() if mod.__class__.__name__ == "FiLM"):
        torch.nn.init.normal_(film.proj[1].weight, std=0.3)
    images, proprio = single_obs(batch())
    noise = torch.randn(1, 8, 7)
    a = m.act(images, proprio, TEXTS[0], "panda", noise=noise.clone(), reasoning="grasp the blue toy car")
    b = m.act(images, proprio, TEXTS[0], "panda", noise=noise.clone(), reasoning="the task is done")
    assert not torch.allclose(a.actions, b.actions)
    assert not torch.allclose(a.reasoning_embedding, b.reasoning_embedding)


def test_new_embodiment_head_leaves_shared_weights_untouched():
    m = tiny_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.add_embodiment("bimanual_panda", action_dim=14, proprio_dim=22)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {k for k in after if k not in before} == {
        k for k in after if k.startswith("heads.bimanual_panda.")
    }
    images, proprio = single_obs(batch())
    out = m.act(images, torch.randn(1, 22), TEXTS[0], "bimanual_panda")
    assert out.actions.shape == (1, 8, 14)
    with pytest.raises(ValueError, match="exists already"):
        m.add_embodiment("panda", 7, 11)


def test_generation_feeds_one_token_per_step_through_the_kv_cache():
    m = tiny_model(max_reasoning_tokens=5)
    vocab = m.lm_head.out_features

    class AlwaysSeven(torch.nn.Module):  # a head that never predicts </s>: five full steps
        def forward(self, h):
            return torch.nn.functional.one_hot(torch.full(h.shape[:-1], 7), vocab).float()

    m.lm_head = AlwaysSeven()
    lengths = []
    hook = m.decoder.register_forward_pre_hook(
        lambda mod, args, kw: lengths.append((kw["inputs_embeds"].shape[1], kw.get("cache") is not None)),
        with_kwargs=True,
    )
    images, proprio = single_obs(batch())
    out = m.act(images, proprio, TEXTS[0], "panda")
    hook.remove()
    prefix = lengths[0][0]
    assert prefix > 5 and lengths[0][1] is False
    # five one-token steps on the cache, then </s> + the action tokens on the cache
    assert lengths[1:] == [(1, True)] * 5 + [(1 + 2, True)]
    assert out.reasoning_ids[0] == [7] * 5


def test_save_load_round_trip_gives_identical_actions(tmp_path):
    m = tiny_model()
    m.heads["panda"].set_stats(-np.ones(7) * 0.5, np.ones(7), np.zeros(11), np.ones(11) * 2)
    save_model(m, tmp_path / "ckpt", meta={"steps": 0})
    policy = DiVLAPolicy.from_pretrained(tmp_path / "ckpt")
    images, proprio = single_obs(batch())
    noise = torch.randn(1, 8, 7)
    a = m.eval().act(images, proprio, TEXTS[0], "panda", noise=noise.clone())
    b = policy.model.act(images, proprio, TEXTS[0], "panda", noise=noise.clone())
    torch.testing.assert_close(a.actions, b.actions, rtol=0, atol=0)
    assert a.reasoning_ids == b.reasoning_ids
    assert policy.metadata.checkpoint_hash and policy.metadata.execute_steps == 4
    obs = Observation(
        images={c: (v[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8) for c, v in images.items()},
        proprio=proprio[0].numpy(),
        instruction=TEXTS[0],
        embodiment="panda",
    )
    policy.reset(TEXTS[0], seed=3)
    first = policy.infer(obs)
    policy.reset(TEXTS[0], seed=3)
    again = policy.infer(obs)
    assert first.actions.shape == (8, 7) and isinstance(first.reasoning, str)
    np.testing.assert_array_equal(first.actions, again.actions)  # seeded noise: deterministic


def test_conv_stem_feeds_siglip_the_same_token_grid_and_survives_a_save(tmp_path):
    m = tiny_model(vision_stem="conv")
    b = batch()
    assert m.encode_images(b["images"]).shape == (3, 4 + 1, 32)  # the patch grid SigLIP's positions expect
    m(**b)["loss"].backward()  # the stem learns with the rest
    stem = m.vision.embeddings.patch_embedding
    assert isinstance(stem, ConvStem)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.parameters())
    save_model(m, tmp_path / "conv")
    again = DiVLAPolicy.from_pretrained(tmp_path / "conv").model
    assert again.cfg.vision_stem == "conv" and isinstance(again.vision.embeddings.patch_embedding, ConvStem)
    images, proprio = single_obs(b)
    noise = torch.randn(1, 8, 7)
    a = m.eval().act(images, proprio, TEXTS[0], "panda", noise=noise.clone())
    torch.testing.assert_close(a.actions, again.act(images, proprio, TEXTS[0], "panda", noise=noise).actions)


def test_concat_merge_keeps_where_in_its_block_a_feature_lies_and_survives_a_save(tmp_path):
    """token_merge "concat" (Qwen2-VL's PatchMerger) against "mean": two patch features swapped inside
    one token's block change that token, and only that one, under concat; averaging cannot tell."""
    b = batch(b=1)
    images = {c: v for c, v in b["images"].items()}
    feats = torch.randn(2, 16, 32)  # [batch x views, 4x4 patches (28 px, patch 7), vision width]
    swapped = feats.clone()
    swapped[0, [0, 1]] = feats[0, [1, 0]]  # front view, row 0, columns 0 and 1: token 0's 2x2 block
    for merge in ("mean", "concat"):
        m = tiny_model(patch_size=7, token_merge=merge)
        tokens = []
        for f in (feats, swapped):
            m.vision.forward = lambda f=f, **_: SimpleNamespace(last_hidden_state=f)
            tokens.append(m.encode_images(images))
        assert tokens[0].shape == (1, 4 + 1, 32)  # front 2x2 tokens from 2x2 blocks, wrist 1 from all 16
        moved = (tokens[0] - tokens[1]).abs().amax(-1)[0] > 1e-6
        assert moved.tolist() == ([True, False, False, False, False] if merge == "concat" else [False] * 5)
    m = tiny_model(patch_size=7, token_merge="concat")
    m(**batch())["loss"].backward()  # the mergers learn with the rest
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.mm_projector.parameters())
    save_model(m, tmp_path / "concat")
    again = DiVLAPolicy.from_pretrained(tmp_path / "concat").model
    images, proprio = single_obs(b)
    noise = torch.randn(1, 8, 7)
    a = m.eval().act(images, proprio, TEXTS[0], "panda", noise=noise.clone())
    torch.testing.assert_close(a.actions, again.act(images, proprio, TEXTS[0], "panda", noise=noise).actions)
    with pytest.raises(ValueError, match="token_merge 'concat' needs each view's token side to divide"):
        tiny_config(token_merge="concat", view_tokens=(9, 1))  # patch 14 at 28 px: a 2x2 grid
    with pytest.raises(ValueError, match="token_merge must be one of mean, concat"):
        tiny_config(token_merge="max")


def test_the_direct_visual_condition_reaches_the_action_head_and_survives_a_save(tmp_path):
    m = tiny_model(visual_condition_dim=2)
    b = batch()
    out = m(**b)
    out["l_diff"].backward()  # the diffusion loss alone trains the path
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.visual_condition.parameters())
    save_model(m, tmp_path / "vis")
    again = DiVLAPolicy.from_pretrained(tmp_path / "vis").model
    images, proprio = single_obs(b)
    noise = torch.randn(1, 8, 7)
    a = m.eval().act(images, proprio, TEXTS[0], "panda", noise=noise.clone(), reasoning=TEXTS[1])
    c = again.act(images, proprio, TEXTS[0], "panda", noise=noise.clone(), reasoning=TEXTS[1])
    torch.testing.assert_close(a.actions, c.actions)
    generated = [x.act(images, proprio, TEXTS[0], "panda", noise=noise.clone()).actions for x in (m, again)]
    torch.testing.assert_close(*generated)  # the generating branch conditions on it too
    assert tiny_model().visual_condition is None  # the paper's path by default
    with pytest.raises(ValueError, match="visual_condition_dim must be >= 0"):
        tiny_config(visual_condition_dim=-1)


def test_the_keypoint_condition_is_trained_by_the_actions_alone_and_read_when_acting(tmp_path):
    """`keypoint_condition`: Diffusion Policy's keypoint encoders feed the action head directly. The
    reasoning loss must not reach them (they exist for the actions' sake), the head must read the same
    features in training and when acting, and they survive a save."""
    m = tiny_model(keypoint_condition=3, keypoint_channels=(8,), keypoint_feature_dim=5)
    b = batch()
    m(**b)["l_ntp"].backward()
    assert all(p.grad is None for p in m.keypoint_encoders.parameters())
    m.zero_grad()
    m(**b)["l_diff"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.keypoint_encoders.parameters())
    m.eval()
    seen = []
    original = m._condition

    def keep(action_hidden, proprio, head, vis, keypoints):
        seen.append(keypoints.detach().clone())
        return original(action_hidden, proprio, head, vis, keypoints)

    m._condition = keep
    with torch.no_grad():
        m(**b)
    images, proprio = single_obs(b)
    noise = torch.randn(1, 8, 7)
    acted = m.act(images, proprio, TEXTS[0], "panda", noise=noise.clone()).actions
    trained, generated = seen
    assert generated.shape == (1, 2 * 5)  # two cameras' features side by side
    torch.testing.assert_close(generated[0], trained[0], atol=1e-5, rtol=1e-4)
    m.encode_keypoints = lambda images: torch.zeros(1, 10)  # other features, other actions: read
    assert not torch.allclose(acted, m.act(images, proprio, TEXTS[0], "panda", noise=noise.clone()).actions)
    del m.encode_keypoints
    m._condition = original
    save_model(m, tmp_path / "kp")
    again = DiVLAPolicy.from_pretrained(tmp_path / "kp").model
    torch.testing.assert_close(acted, again.act(images, proprio, TEXTS[0], "panda", noise=noise).actions)
    assert tiny_model().keypoint_encoders is None  # the paper's path by default
    with pytest.raises(ValueError, match="keypoint_condition must be >= 0"):
        tiny_config(keypoint_condition=-1)
    with pytest.raises(ValueError, match="keypoint_channels 33: must be below 16 or a multiple of 2"):
        tiny_config(keypoint_condition=2, keypoint_channels=(33,))


def test_the_decoder_visual_condition_is_the_same_in_training_and_in_both_inference_branches():
    """`visual_condition_source="decoder"`: the head reads the decoder's hidden states at the visual
    positions. Training finds them behind each row's left padding; acting (forced or generated
    phrase) at the start of the sequence: each must hand the head the same tokens for the same
    observation, or the head is trained on one thing and run on another."""
    m = tiny_model(visual_condition_dim=2, visual_condition_source="decoder").eval()
    seen = []
    original = m._condition

    def keep(action_hidden, proprio, head, vis, keypoints):
        seen.append(vis.detach().clone())
        return original(action_hidden, proprio, head, vis, keypoints)

    m._condition = keep
    b = batch()
    b["reasonings"] = ["it", TEXTS[3], "grasp the"]  # 3, 7 and 6 tokens: rows padded 4, 0 and 1
    with torch.no_grad():
        m(**b)
        encoded = m.encode_images(b["images"])
    trained = seen.pop()
    assert not torch.allclose(trained, encoded, atol=1e-3)  # the decoder's, not the encoder's
    for i in range(3):
        images = {c: v[i : i + 1] for c, v in b["images"].items()}
        proprio = b["proprio"][i : i + 1]
        m.act(images, proprio, TEXTS[0], "panda", reasoning=b["reasonings"][i])
        m.act(images, proprio, TEXTS[0], "panda")
        generated, forced = seen.pop(), seen.pop()
        torch.testing.assert_close(forced[0], trained[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(generated[0], trained[i], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="visual_condition_source must be one of encoder, decoder"):
        tiny_config(visual_condition_source="vlm")


def test_vision_stem_choices_are_checked():
    with pytest.raises(ValueError, match="vision_stem must be one of patch, conv, got 'cnn'"):
        tiny_config(vision_stem="cnn")
    with pytest.raises(ValueError, match="replaces the pretrained SigLIP's patch embedding"):
        tiny_config(vision_stem="conv", vision_pretrained="/some/siglip")


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
    m = tiny_model()
    save_model(m, tmp_path / "half", half=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "half" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("action_tokens").dtype == torch.float16
    policy = DiVLAPolicy.from_pretrained(tmp_path / "half")
    assert policy.model.action_tokens.dtype == torch.float32
    torch.testing.assert_close(policy.model.action_tokens, m.action_tokens.half().float())


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        check_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing config.json, model.safetensors"):
        check_checkpoint(tmp_path / "empty")
    save_model(tiny_model(), tmp_path / "ok")
    assert check_checkpoint(tmp_path / "ok", "panda")["chunk"] == 8
    with pytest.raises(CheckpointError, match="not for 'bimanual_panda'"):
        check_checkpoint(tmp_path / "ok", "bimanual_panda")
    # a model trained on the old quaternion proprioception (9-D) is refused, not run into a shape error
    assert check_checkpoint(tmp_path / "ok", "panda", proprio_dim=11)
    with pytest.raises(CheckpointError, match="trained on 11-D proprioception but this version observes 9-D"):
        check_checkpoint(tmp_path / "ok", "panda", proprio_dim=9)
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="damaged"):
        DiVLAPolicy.from_pretrained(tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert cfg["embodiments"] == {"panda": [7, 11]}


def test_lora_and_freezing_train_only_what_they_should():
    m = tiny_model(lora_rank=4, freeze_vision=True)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("vision" not in n for n in trainable)
    decoder_trainable = {n for n in trainable if n.startswith("decoder.")}
    assert decoder_trainable and all("lora_" in n for n in decoder_trainable)
    assert not m.lm_head.weight.requires_grad
    assert m(**batch())["loss"].requires_grad


def test_from_pretrained_backbones_accepts_real_qwen2_vl_and_siglip_directories(tmp_path):
    """A user with weights points the config at HF checkpoint directories; here tiny ones we save."""
    from transformers import (
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    tok = build_tokenizer(TEXTS, 300)
    siglip = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        )
    )
    siglip.save_pretrained(tmp_path / "siglip")
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    qwen2 = Qwen2ForCausalLM(Qwen2Config(**text))
    qwen2.save_pretrained(tmp_path / "qwen2")
    vl = Qwen2VLForConditionalGeneration(
        Qwen2VLConfig(
            text_config={**text, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}},
            vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2),
        )
    )
    vl.save_pretrained(tmp_path / "qwen2_vl")
    for name, source in (("qwen2", qwen2.model), ("qwen2_vl", vl.model.language_model)):
        cfg = tiny_config(vision_pretrained=str(tmp_path / "siglip"), vlm_pretrained=str(tmp_path / name))
        m = DiVLAModel(cfg, tok)
        assert cfg.text_model_type == name
        torch.testing.assert_close(
            m.decoder.layers[0].self_attn.q_proj.weight, source.layers[0].self_attn.q_proj.weight
        )
        torch.testing.assert_close(
            m.vision.embeddings.patch_embedding.weight,
            siglip.embeddings.patch_embedding.weight,
        )
        images, proprio = single_obs(batch())  # 28 px images on a 56 px SigLIP: positions interpolated
        assert m.act(images, proprio, TEXTS[0], "panda").actions.shape == (1, 8, 7)
        save_model(m, tmp_path / f"divla_{name}")  # and the result is a normal DiVLA checkpoint
        again = DiVLAPolicy.from_pretrained(tmp_path / f"divla_{name}").model
        torch.testing.assert_close(
            again.decoder.layers[1].mlp.up_proj.weight, m.decoder.layers[1].mlp.up_proj.weight
        )
