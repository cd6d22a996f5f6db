"""The DiVLA network (Wen et al., Diffusion-VLA, arXiv 2412.03293), at any size.

Data flow of one call:

    camera images --SigLIP (shared)--> patch grid per view --pool--> 36 front + 16 wrist tokens
        --mm projector--> language-model embeddings
    [visual tokens, instruction, "reasoning:"] --Qwen2 decoder, greedy, KV cache--> reasoning text
    [..., reasoning, </s>, action tokens x K] --decoder--> K hidden states --projector (MLP+LN)-->
        global condition of a 1-D diffusion UNet over the action chunk (+ proprioception)
    reasoning embedding r (mean hidden state over the reasoning tokens) --FiLM--> every UNet block
    optional, not the paper's: each camera --Diffusion Policy's keypoint encoder--> a feature in that
        global condition (`keypoint_condition`)
    embodiment head: actions -> UNet channels -> actions, one small head per robot (single arm,
        bimanual); a new robot adds a head and leaves every shared weight alone.

Training teacher-forces the expert's reasoning phrase and minimises L_diff + alpha * L_ntp. Sequences
in a batch are left-padded, so the action tokens always sit at the last K positions.

The inference path (`DiVLAModel.act`) labels its stages for `torch.profiler` (`STAGES`); a label costs
under a microsecond when no profiler runs and changes no number. The labels do not nest, so their
times add up to the call's time less what lies between them (`divla_eval.timing.profile_policy`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from divla_eval.divla.config import DiVLAConfig
from divla_eval.nn.cond_unet1d import ConditionalUnet1D
from divla_eval.nn.diffusion import NormalizationStats, ddim_sample, make_schedulers, training_noise
from divla_eval.nn.keypoints import CameraKeypoints

STAGES = {
    "divla.vision": "SigLIP on every view, pooling, mm projector (and the keypoint encoders, if any)",
    "divla.prompt": "tokenise and embed the instruction",
    "divla.reasoning_prefix": "generation: the decoder pass over [visual tokens, prompt] (fills the cache)",
    "divla.reasoning_token": "generation: one decoder pass per generated reasoning token (KV cache)",
    "divla.action_pass": "generation: the decoder pass over [</s>, action tokens] after the phrase",
    "divla.forced_pass": "given phrase (reused ids or text): one decoder pass over the whole sequence",
    "divla.condition": "projector on the action tokens' hidden states + proprioception",
    "divla.ddim": "the DDIM sampling loop (UNet and embodiment head at every step)",
}
"""The `torch.profiler.record_function` labels of one inference call, in order."""


def _stage(label: str):
    """`record_function(label)` while a profiler runs, else nothing: an unprofiled record_function
    still costs several microseconds, the check under half of one."""
    return record_function(label) if torch.autograd._profiler_enabled() else contextlib.nullcontext()


PROMPT_SUFFIX = " reasoning:"
"""Ends the prompt, so the decoder knows where its own text begins (works with any tokenizer)."""


def build_vision(cfg: DiVLAConfig):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if cfg.vision_pretrained and cfg.vision_config is None:
        # float32 whatever the file holds (transformers' default dtype="auto" keeps a checkpoint's
        # bf16): trainable weights stay fp32, and bf16 compute comes from autocast on CUDA
        model = SiglipVisionModel.from_pretrained(cfg.vision_pretrained, dtype=torch.float32)
        cfg.vision_config = model.config.to_dict()
        return model
    if cfg.vision_config is None:
        cfg.vision_config = SiglipVisionConfig(
            hidden_size=cfg.vision_hidden,
            intermediate_size=2 * cfg.vision_hidden,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
        ).to_dict()
    model = SiglipVisionModel(SiglipVisionConfig(**_clean(cfg.vision_config)))
    if cfg.vision_stem == "conv":
        emb = model.embeddings
        emb.patch_embedding = ConvStem(emb.config.hidden_size, emb.patch_size)
    return model


def build_token_projector(cfg, vision_hidden: int, text_hidden: int) -> nn.Module:
    """The map from a view's pooled patch features to decoder-width visual tokens (`mm_projector`).
    token_merge "mean": one MLP for every view, over each token's averaged patch feature. "concat": one
    merger per view (Qwen2-VL's PatchMerger: LayerNorm, then an MLP) over each token's block of patch
    features laid side by side, whose size differs between views."""
    if cfg.token_merge == "mean":
        return nn.Sequential(
            nn.Linear(vision_hidden, text_hidden), nn.GELU(), nn.Linear(text_hidden, text_hidden)
        )
    side = cfg.image_size // cfg.patch_size
    mergers = []
    for n in cfg.view_tokens:
        width = vision_hidden * (side // math.isqrt(n)) ** 2
        mergers.append(
            nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, text_hidden),
                nn.GELU(),
                nn.Linear(text_hidden, text_hidden),
            )
        )
    return nn.ModuleList(mergers)


class ConvStem(nn.Module):
    """In place of SigLIP's patch embedding (a Conv2d of kernel = stride = patch size): two stride-2
    3x3 convolutions, a 1x1 projection to the encoder width, and an average pool to the patch grid
    SigLIP's position embeddings expect ([B, 3, H, W] -> [B, hidden, H // patch, W // patch]). At 84
    pixels and patch 14 the 21x21 feature map is pooled to 6x6 in bins of 3-4 cells (adaptive pooling),
    so a token sums convolutional features of its patch instead of a linear map of its pixels."""

    def __init__(self, hidden: int, patch_size: int, channels: tuple[int, int] = (32, 64)):
        super().__init__()
        c1, c2 = channels
        self.patch_size = patch_size
        self.convs = nn.Sequential(
            nn.Conv2d(3, c1, 3, stride=2, padding=1),
            nn.GroupNorm(8, c1),
            nn.GELU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.GroupNorm(8, c2),
            nn.GELU(),
            nn.Conv2d(c2, hidden, 1),
        )

    @property
    def weight(self) -> torch.Tensor:
        """SigLIP's embeddings cast the pixels to `patch_embedding.weight.dtype`."""
        return self.convs[0].weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        return F.adaptive_avg_pool2d(self.convs(pixels), grid)


def build_language_model(cfg: DiVLAConfig, vocab_size: int, special_ids: dict[str, int]):
    """(decoder, lm_head): a Qwen2 decoder without its head, and the head, so that the action tokens'
    hidden states and the next-token logits come from one pass."""
    from transformers import Qwen2Config, Qwen2Model

    if cfg.vlm_pretrained and cfg.text_config is None:
        return _load_pretrained_language_model(cfg)
    if cfg.text_config is None:
        cfg.text_config = Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_intermediate,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            num_key_value_heads=cfg.text_kv_heads,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **special_ids,
        ).to_dict()
        cfg.text_model_type = "qwen2"
    if cfg.text_model_type == "qwen2_vl":
        from transformers import Qwen2VLTextConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

        text_cfg = Qwen2VLTextConfig(**_clean(cfg.text_config))
        decoder = Qwen2VLTextModel(text_cfg)
    else:
        text_cfg = Qwen2Config(**_clean(cfg.text_config))
        decoder = Qwen2Model(text_cfg)
    return decoder, nn.Linear(text_cfg.hidden_size, text_cfg.vocab_size, bias=False)


def _load_pretrained_language_model(cfg: DiVLAConfig):
    """A real checkpoint directory: Qwen2 (causal LM) or Qwen2-VL (its text decoder; its own vision
    tower is dropped, DiVLA's vision is SigLIP)."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(cfg.vlm_pretrained).model_type
    if model_type == "qwen2_vl":
        from transformers import Qwen2VLForConditionalGeneration

        full = Qwen2VLForConditionalGeneration.from_pretrained(cfg.vlm_pretrained, dtype=torch.float32)
        decoder, head = full.model.language_model, full.lm_head
        cfg.text_model_type = "qwen2_vl"
    elif model_type == "qwen2":
        from transformers import Qwen2ForCausalLM

        full = Qwen2ForCausalLM.from_pretrained(cfg.vlm_pretrained, dtype=torch.float32)
        decoder, head = full.model, full.lm_head
        cfg.text_model_type = "qwen2"
    else:
        raise ValueError(f"{cfg.vlm_pretrained}: model_type {model_type!r}; DiVLA takes qwen2 or qwen2_vl")
    cfg.text_config = decoder.config.to_dict()
    if head.weight is decoder.get_input_embeddings().weight:  # tied: untie, safetensors stores each once
        head = nn.Linear(head.in_features, head.out_features, bias=False)
        head.weight.data.copy_(decoder.get_input_embeddings().weight.data)
    return decoder, head


def _clean(d: dict) -> dict:
    """An HF config dict without the keys that describe the saved file rather than the model."""
    return {k: v for k, v in d.items() if k not in ("transformers_version", "architectures", "_name_or_path")}


class EmbodimentHead(NormalizationStats, nn.Module):
    """The robot-specific ends of the action head: actions in, actions out, proprioception in, and
    the robot's normalisation statistics (buffers, so they travel inside the weights file)."""

    def __init__(self, action_dim: int, proprio_dim: int, latent: int, proprio_latent: int):
        super().__init__()
        self.action_dim, self.proprio_dim = action_dim, proprio_dim
        self.inp = nn.Linear(action_dim, latent)
        self.out = nn.Sequential(nn.Linear(latent, latent), nn.Mish(), nn.Linear(latent, action_dim))
        self.proprio = nn.Sequential(nn.Linear(proprio_dim, proprio_latent), nn.Mish())
        self._register_stats(action_dim, proprio_dim)


@dataclass
class DiVLAOutput:
    actions: torch.Tensor
    """[B, chunk, action_dim] in the robot's action units."""
    reasoning_ids: list[list[int]]
    reasoning_embedding: torch.Tensor


class DiVLAModel(nn.Module):
    def __init__(self, cfg: DiVLAConfig, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:  # padding is masked out; any id will do
            tokenizer.pad_token = tokenizer.eos_token
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        self.vision = build_vision(cfg)
        self.decoder, self.lm_head = build_language_model(cfg, len(tokenizer), special)
        vh = self.vision.config.hidden_size
        th = self.decoder.config.hidden_size
        self.mm_projector = build_token_projector(cfg, vh, th)
        self.view_embed = nn.Parameter(torch.zeros(len(cfg.cameras), th))
        self.action_tokens = nn.Parameter(torch.randn(cfg.num_action_tokens, th) * 0.02)
        # LLaVA-style projector from the action tokens' hidden states into the action head
        self.projector = nn.Sequential(
            nn.Linear(th, cfg.projector_dim),
            nn.GELU(),
            nn.Linear(cfg.projector_dim, cfg.projector_dim),
            nn.LayerNorm(cfg.projector_dim),
        )
        # the optional direct path from the visual tokens to the action head (`visual_condition_dim`)
        d_vis = cfg.visual_condition_dim
        self.visual_condition = nn.Sequential(nn.LayerNorm(th), nn.Linear(th, d_vis)) if d_vis > 0 else None
        # the optional keypoint path from the pixels to the action head (`keypoint_condition`)
        self.keypoint_encoders = None
        if cfg.keypoint_condition > 0:
            self.keypoint_encoders = CameraKeypoints(
                cfg.cameras, cfg.keypoint_channels, cfg.keypoint_condition, cfg.keypoint_feature_dim
            )
        d_kp = cfg.keypoint_feature_dim * len(cfg.cameras) if self.keypoint_encoders is not None else 0
        self.unet = ConditionalUnet1D(
            input_dim=cfg.action_latent,
            cond_dim=cfg.num_action_tokens * cfg.projector_dim
            + cfg.proprio_latent
            + d_vis * sum(cfg.view_tokens)
            + d_kp,
            film_dim=th if cfg.reasoning_injection else 0,
            down_dims=cfg.unet_down_dims,
            step_embed_dim=cfg.step_embed_dim,
        )
        self.heads = nn.ModuleDict()
        for name, (action_dim, proprio_dim) in cfg.embodiments.items():
            self.heads[name] = EmbodimentHead(action_dim, proprio_dim, cfg.action_latent, cfg.proprio_latent)
        self.train_scheduler, self.infer_scheduler = make_schedulers(cfg.train_diffusion_steps)
        self._apply_finetuning()

    # --- set-up -----------------------------------------------------------------------------------------
    def _apply_finetuning(self) -> None:
        cfg = self.cfg
        if cfg.freeze_vision:
            self.vision.requires_grad_(False)
        if cfg.gradient_checkpointing:  # before peft wraps the decoder; active in train mode only
            # transformers >= 5.25 names it activation checkpointing (the old name warns)
            enable = getattr(self.decoder, "activation_checkpointing_enable", None)
            enable = enable or self.decoder.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        if cfg.lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                target_modules=list(cfg.lora_targets),
                lora_dropout=0.0,
            )
            self.decoder = get_peft_model(self.decoder, lora)  # freezes the base weights itself
            self.lm_head.requires_grad_(False)
        elif cfg.freeze_vlm:
            self.decoder.requires_grad_(False)
            self.lm_head.requires_grad_(False)

    def add_embodiment(self, name: str, action_dim: int, proprio_dim: int) -> EmbodimentHead:
        """A new robot: a freshly initialised head; the shared weights are not touched."""
        if name in self.heads:
            raise ValueError(f"embodiment {name!r} exists already (heads: {list(self.heads)})")
        head = EmbodimentHead(action_dim, proprio_dim, self.cfg.action_latent, self.cfg.proprio_latent)
        self.heads[name] = head.to(self.action_tokens.device)
        self.cfg.embodiments[name] = (action_dim, proprio_dim)
        return head

    # --- pieces -----------------------------------------------------------------------------------------
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(ids)

    def encode_images(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """images: camera -> float [B, 3, H, W] in [0, 1]. Returns [B, sum(view_tokens), hidden]."""
        views = torch.stack([images[c] for c in self.cfg.cameras], dim=1)  # [B, V, 3, H, W]
        b, v = views.shape[:2]
        pixels = (views.flatten(0, 1) - 0.5) / 0.5  # SigLIP's normalisation
        size = self.vision.config.image_size
        feats = self.vision(
            pixel_values=pixels, interpolate_pos_encoding=pixels.shape[-1] != size
        ).last_hidden_state  # [B*V, P, vh]
        side = int(math.isqrt(feats.shape[1]))
        grid = feats.transpose(1, 2).reshape(b, v, -1, side, side)
        tokens = []
        for i, n in enumerate(self.cfg.view_tokens):
            k = int(math.isqrt(n))
            if self.cfg.token_merge == "concat":  # each token: its (side/k)^2 patches side by side
                s = side // k
                blocks = grid[:, i].reshape(b, -1, k, s, k, s).permute(0, 2, 4, 3, 5, 1).reshape(b, n, -1)
                t = self.mm_projector[i](blocks)  # [B, n, th]
            else:
                pooled = F.adaptive_avg_pool2d(grid[:, i], k) if k != side else grid[:, i]
                t = self.mm_projector(pooled.flatten(2).transpose(1, 2))  # [B, n, th]
            tokens.append(t + self.view_embed[i])
        return torch.cat(tokens, dim=1)

    def encode_keypoints(self, images: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The `keypoint_condition` path: camera -> float [B, 3, H, W] in [0, 1] to
        [B, cameras * keypoint_feature_dim], or None when the model has no such path."""
        if self.keypoint_encoders is None:
            return None
        return torch.cat(self.keypoint_encoders(images), dim=-1)

    def prompt_ids(self, instruction: str) -> list[int]:
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []  # Qwen2's tokenizer has none
        return [*bos, *tok(instruction + PROMPT_SUFFIX, add_special_tokens=False).input_ids]

    def reasoning_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids[: self.cfg.max_reasoning_tokens]
        return [*ids, self.tokenizer.eos_token_id]

    def _condition(
        self, action_hidden, proprio, head: EmbodimentHead, vis: torch.Tensor, keypoints: torch.Tensor | None
    ):
        """The UNet's global condition: the projected action tokens, the proprioception and, with
        `visual_condition_dim`, every visual token `vis` [B, n_vis, hidden] projected, and with
        `keypoint_condition` the keypoint features [B, cameras * keypoint_feature_dim]."""
        parts = [self.projector(action_hidden).flatten(1), head.proprio(head.normalize_proprio(proprio))]
        if self.visual_condition is not None:
            parts.append(self.visual_condition(vis).flatten(1))
        if keypoints is not None:
            parts.append(keypoints)
        return torch.cat(parts, dim=-1)

    def _visual_source(
        self, vis: torch.Tensor, hidden: torch.Tensor, vis_start: torch.Tensor
    ) -> torch.Tensor:
        """The visual tokens the `visual_condition_dim` path reads: the encoder's `vis` [B, n_vis, h],
        or (`visual_condition_source="decoder"`) the decoder's last hidden states at their positions,
        which start at `vis_start` [B] in each row of `hidden` [B, L, h]."""
        if self.cfg.visual_condition_source == "encoder":
            return vis
        at = vis_start.to(hidden.device)[:, None] + torch.arange(vis.shape[1], device=hidden.device)
        return hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))

    def _eps(self, head, x, t, cond, r_emb):
        film = r_emb if self.cfg.reasoning_injection else None
        return head.out(self.unet(head.inp(x), t, cond, film))

    # --- training ---------------------------------------------------------------------------------------
    def forward(
        self,
        images: dict[str, torch.Tensor],
        proprio: torch.Tensor,
        instructions: list[str],
        reasonings: list[str],
        actions: torch.Tensor,
        embodiment: str,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses on a batch of raw `actions` [B, chunk, A] and `proprio` [B, P]. Chunks that run past
        a demo's end repeat its last action and train like the rest ("stay put"), as in Diffusion Policy."""
        head = self.heads[embodiment]
        vis = self.encode_images(images)
        b, n_vis, dev = vis.shape[0], vis.shape[1], vis.device
        k = self.cfg.num_action_tokens
        prompts = [self.prompt_ids(s) for s in instructions]
        reasons = [self.reasoning_ids(s) for s in reasonings]
        text_len = [len(p) + len(r) for p, r in zip(prompts, reasons)]
        seq_len = n_vis + max(text_len) + k
        pad = self.tokenizer.pad_token_id
        ids = torch.full((b, seq_len - n_vis - k), pad, dtype=torch.long)
        labels = torch.full((b, seq_len), -100, dtype=torch.long)
        mask = torch.zeros(b, seq_len, dtype=torch.long)
        is_reason = torch.zeros(b, seq_len, dtype=torch.bool)
        vis_start = torch.zeros(b, dtype=torch.long)
        for i, (p, r) in enumerate(zip(prompts, reasons)):
            off = max(text_len) - text_len[i]  # left padding
            ids[i, off:] = torch.tensor(p + r)
            start = off + n_vis  # first text position in the full sequence
            mask[i, off:] = 1
            r0 = start + len(p)
            labels[i, r0 : r0 + len(r)] = torch.tensor(r)
            is_reason[i, r0 : r0 + len(r)] = True
            vis_start[i] = off
        ids, labels, mask, is_reason = ids.to(dev), labels.to(dev), mask.to(dev), is_reason.to(dev)
        text_emb = self.embed_tokens(ids)
        # assemble [pad.., vis, prompt, reasoning, act] per row: visual tokens go right after the padding
        emb = torch.zeros(b, seq_len, vis.shape[-1], device=dev, dtype=vis.dtype)
        for i in range(b):
            off = int(vis_start[i])
            emb[i, off : off + n_vis] = vis[i]
            emb[i, off + n_vis : seq_len - k] = text_emb[i, off:]
        emb[:, seq_len - k :] = self.action_tokens
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.decoder(
            inputs_embeds=emb, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        # next-token prediction on the reasoning (and its </s>): the hidden state at p-1 predicts the
        # token at p; the vocabulary projection runs only where there is a target
        targets = labels[:, 1:]
        where = targets != -100
        l_ntp = F.cross_entropy(self.lm_head(hidden[:, :-1][where]), targets[where])
        weights = is_reason.float()
        r_emb = (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)
        vis_cond = self._visual_source(vis, hidden, vis_start)
        cond = self._condition(hidden[:, -k:], proprio, head, vis_cond, self.encode_keypoints(images))
        actions = head.normalize_actions(actions)
        n = self.cfg.diffusion_samples  # several noise draws per observation: the encoders run once
        cond, r_emb_rep, actions = cond.repeat(n, 1), r_emb.repeat(n, 1), actions.repeat(n, 1, 1)
        noise, t = training_noise(actions.shape, self.cfg.train_diffusion_steps, generator, dev)
        noisy = self.train_scheduler.add_noise(actions, noise, t)
        l_diff = F.mse_loss(self._eps(head, noisy, t, cond, r_emb_rep), noise)
        return {"loss": l_diff + self.cfg.alpha * l_ntp, "l_diff": l_diff, "l_ntp": l_ntp}

    # --- inference --------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_reasoning(self, prefix: torch.Tensor):
        """Greedy decoding with the decoder's KV cache. prefix: [1, L, hidden] embeddings.

        Returns (token ids, the cache, the hidden states of the generated tokens so far, the prefix's
        last hidden states). Each step feeds one token: the cache holds every earlier key and value.
        """
        with _stage("divla.reasoning_prefix"):
            out = self.decoder(inputs_embeds=prefix, use_cache=True)
            cache, hiddens, ids, prefix_hidden = out.cache, [], [], out.last_hidden_state
            logits = self.lm_head(out.last_hidden_state[:, -1])
        eos = self.tokenizer.eos_token_id
        for _ in range(self.cfg.max_reasoning_tokens):
            tok = int(logits.argmax(-1))
            if tok == eos:
                break
            ids.append(tok)
            with _stage("divla.reasoning_token"):
                out = self.decoder(
                    inputs_embeds=self.embed_tokens(torch.tensor([[tok]], device=prefix.device)),
                    cache=cache,
                    use_cache=True,
                )
                cache = out.cache
                hiddens.append(out.last_hidden_state[:, -1])
                logits = self.lm_head(out.last_hidden_state[:, -1])
        return ids, cache, hiddens, prefix_hidden

    @torch.no_grad()
    def act(
        self,
        images: dict[str, torch.Tensor],
        proprio: torch.Tensor,
        instruction: str,
        embodiment: str,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        reasoning: str | None = None,
        reasoning_ids: list[int] | None = None,
        inference_steps: int | None = None,
    ) -> DiVLAOutput:
        """One policy call for one observation (batch 1). `reasoning` forces the phrase instead of
        generating it (teacher forcing at test time; used to check that FiLM is wired).
        `reasoning_ids` forces exact token ids (without </s>) instead: a phrase generated at an
        earlier call, reused without a decode/encode round trip that could change its tokens.
        `inference_steps` overrides the config's DDIM step count for this call (the config, which
        is what a checkpoint saves, is left as it is). Stages are labelled for the profiler (`STAGES`)."""
        head = self.heads[embodiment]
        dev = proprio.device
        with _stage("divla.vision"):
            vis = self.encode_images(images)
            keypoints = self.encode_keypoints(images)
        with _stage("divla.prompt"):
            prompt = self.embed_tokens(torch.tensor([self.prompt_ids(instruction)], device=dev))
            prefix = torch.cat([vis, prompt], dim=1)
        eos = self.tokenizer.eos_token_id
        if reasoning is None and reasoning_ids is None:
            ids, cache, hiddens, prefix_hidden = self.generate_reasoning(prefix)
            with _stage("divla.action_pass"):
                eos_emb = self.embed_tokens(torch.tensor([[eos]], device=dev))
                tail = torch.cat([eos_emb, self.action_tokens[None]], dim=1)
                out = self.decoder(inputs_embeds=tail, cache=cache, use_cache=True).last_hidden_state
                hiddens.append(out[:, 0])
                r_emb = torch.stack(hiddens, 1).mean(1)
        else:
            with _stage("divla.forced_pass"):
                ids = list(reasoning_ids) if reasoning_ids is not None else self.reasoning_ids(reasoning)[:-1]
                reason = self.embed_tokens(torch.tensor([ids + [eos]], device=dev))
                seq = torch.cat([prefix, reason, self.action_tokens[None]], dim=1)
                hidden = self.decoder(inputs_embeds=seq, use_cache=False).last_hidden_state
                prefix_hidden = hidden
                n = reason.shape[1]
                out = hidden[:, -(n + self.cfg.num_action_tokens) :]
                r_emb = out[:, :n].mean(1)
                out = out[:, n - 1 :]  # keep the layout [eos, actions...] of the generating branch
        with _stage("divla.condition"):
            vis_start = torch.zeros(1, dtype=torch.long)  # no padding at batch 1: visual tokens first
            vis_cond = self._visual_source(vis, prefix_hidden, vis_start)
            cond = self._condition(out[:, 1:], proprio, head, vis_cond, keypoints)
        x = (
            noise
            if noise is not None
            else torch.randn((1, self.cfg.chunk, head.action_dim), generator=generator, device=dev)
        )

        def eps(x_t, t):
            return self._eps(head, x_t, t, cond, r_emb)

        steps = self.cfg.inference_steps if inference_steps is None else inference_steps
        with _stage("divla.ddim"):
            x = ddim_sample(self.infer_scheduler, eps, x, steps)
        return DiVLAOutput(
            actions=head.unnormalize_actions(x), reasoning_ids=[ids], reasoning_embedding=r_emb
        )
