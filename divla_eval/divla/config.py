"""DiVLA's configuration: one typed dataclass, saved as config.json beside the weights.

The defaults are the small model that trains on a 2-core CPU (3.0M parameters, ~0.3 s per step of
32 samples here). Measured on bin picking, where the action head is what limits: a 256-wide 4-layer
decoder with a (32, 64) UNet (4.1M) took 0.64 s per step and its diffusion loss stalled at 0.2; this
128-wide 2-layer decoder with a (64, 128) UNet reached 0.07 in 1600 steps. A user with
real weights points `vision_pretrained` at a SigLIP directory and `vlm_pretrained` at a Qwen2 or
Qwen2-VL directory; the sizes below are then read from those checkpoints instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from divla_eval.config_io import JsonConfig
from divla_eval.nn import check_keypoint_path

VISION_STEMS = ("patch", "conv")
VISUAL_CONDITION_SOURCES = ("encoder", "decoder")
TOKEN_MERGES = ("mean", "concat")


def check_token_merge(merge: str, image_size: int, patch_size: int, view_tokens: tuple[int, ...]) -> None:
    """`token_merge` of DiVLA's visual tokens (and OpenVLA's, which shares them)."""
    if merge not in TOKEN_MERGES:
        raise ValueError(f"token_merge must be one of {', '.join(TOKEN_MERGES)}, got {merge!r}")
    side = image_size // patch_size
    if merge == "concat" and any(side % math.isqrt(n) for n in view_tokens):
        raise ValueError(
            f"token_merge 'concat' needs each view's token side to divide the patch grid's side {side} "
            f"(image_size {image_size} // patch_size {patch_size}); view_tokens {list(view_tokens)} do not"
        )


def check_vision_stem(stem: str, vision_pretrained: str | None) -> None:
    """`vision_stem` of DiVLA's SigLIP encoder (and OpenVLA's, which shares it)."""
    if stem not in VISION_STEMS:
        raise ValueError(f"vision_stem must be one of {', '.join(VISION_STEMS)}, got {stem!r}")
    if stem != "patch" and vision_pretrained:
        raise ValueError(
            f"vision_stem {stem!r} replaces the pretrained SigLIP's patch embedding; use 'patch' with "
            "vision_pretrained"
        )


@dataclass
class DiVLAConfig(JsonConfig):
    label = "DiVLA"

    # --- vision: one SigLIP encoder shared by every camera --------------------------------------------
    cameras: tuple[str, ...] = ("front", "wrist")
    view_tokens: tuple[int, ...] = (36, 16)
    """Visual tokens per camera (view-adaptive tokenisation): the front view keeps its whole patch
    grid, the wrist view is pooled to 16 tokens as in the paper. Each must be a square number."""
    image_size: int = 84
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    patch_size: int = 14
    token_merge: str = "mean"
    """How a view's patch grid becomes its `view_tokens`. "mean": each token averages the patches it
    covers (adaptive average pooling). "concat": each token concatenates their features and a per-view
    MLP maps them to the decoder width, as Qwen2-VL's PatchMerger does for 2x2 patches: where inside
    the token's block an object lies is kept, which averaging loses. With `patch_size` 7 at 84 px the
    grid is 12x12: 2x2 blocks make the front view's 36 tokens, 3x3 blocks the wrist view's 16."""
    vision_stem: str = "patch"
    """How pixels become SigLIP's input tokens. "patch": SigLIP's own linear embedding of each
    patch_size square (what a pretrained SigLIP has). "conv": a small convolutional stem whose feature
    map is pooled to the same patch grid (the "hybrid" ViT of Dosovitskiy et al. 2021, sec. 3.1): a
    from-scratch encoder gets the locality prior a pretrained one brings, for a diagnostic of whether
    the from-scratch ViT is what slows the small model down. Not with `vision_pretrained`."""

    # --- language backbone (Qwen2 decoder) ------------------------------------------------------------
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    vocab_size: int = 512
    """Target size of the BPE vocabulary learnt from the demonstrations (from-scratch backbones only)."""
    max_reasoning_tokens: int = 24

    # --- action path ------------------------------------------------------------------------------------
    num_action_tokens: int = 4
    projector_dim: int = 128
    chunk: int = 16
    """Actions predicted per call."""
    execute_steps: int = 8
    """Actions executed per call before the next one (the runner's replanning period)."""
    action_latent: int = 64
    """Channels of the shared diffusion UNet; each embodiment's head maps its actions in and out."""
    proprio_latent: int = 32
    visual_condition_dim: int = 0
    """> 0: the action head is also conditioned on every visual token straight from the encoder, each
    projected to this many channels (a direct path from the images, as Diffusion Policy's keypoints).
    Not the paper's design: a diagnostic for a small from-scratch model whose action head, reached only
    through the action tokens, learns to ignore the images (docs/curves.md). 0: the paper's path."""
    visual_condition_source: str = "encoder"
    """Where the `visual_condition_dim` path takes the visual tokens from. "encoder": as the decoder
    receives them. "decoder": the decoder's last hidden states at the visual positions, the VLM's output
    embeddings there (what TinyVLA's and DexVLA's heads are conditioned on, pooled, where this keeps
    every position). The visual tokens come first and the decoder is causal, so these have read both
    views together but not the instruction."""
    keypoint_condition: int = 0
    """> 0: each camera also gets Diffusion Policy's image encoder (a small ResNet ending in this many
    spatial-softmax keypoints, `divla_eval.nn.keypoints`), whose feature goes straight to the action
    head beside the action tokens. Not the paper's design: at this scale the from-scratch SigLIP does
    not learn where a small object lies (scripts/probe.py, docs/curves.md), which the keypoints'
    expected coordinates give by construction. Trained by the diffusion loss alone. 0: the paper's path."""
    keypoint_channels: tuple[int, ...] = (32, 64)
    """Residual stages of each keypoint encoder (Diffusion Policy's defaults)."""
    keypoint_feature_dim: int = 64
    """Per-camera feature of the keypoint path (the keypoints' linear projection)."""
    unet_down_dims: tuple[int, ...] = (64, 128)
    step_embed_dim: int = 32
    diffusion_samples: int = 1
    """Noise draws (timestep and noise) per observation in each training batch. The vision encoder
    and the decoder, the expensive part, run once per observation and only the small UNet runs this
    many times, so the diffusion loss gets a less noisy gradient for little extra time (the "diffusion
    batch multiplier" of Li et al., 2024, MAR)."""
    train_diffusion_steps: int = 100
    inference_steps: int = 10
    embodiments: dict[str, tuple[int, int]] = field(default_factory=lambda: {"panda": (7, 11)})
    """Embodiment name -> (action dim, proprio dim); each gets its own in/out head."""

    # --- reasoning and loss -------------------------------------------------------------------------
    reasoning_injection: bool = True
    """FiLM the reasoning embedding into every action-head block. False is TinyVLA's head (ablation)."""
    alpha: float = 10.0
    """L = L_diff + alpha * L_ntp."""

    # --- fine-tuning ------------------------------------------------------------------------------------
    freeze_vision: bool = False
    freeze_vlm: bool = False
    lora_rank: int = 0
    """> 0 tunes the language backbone through LoRA adapters of this rank (peft); 0 tunes it fully."""
    lora_alpha: int = 0
    """LoRA's scale numerator (the adapters' output is scaled by alpha / rank); 0: 2 * lora_rank."""
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Decoder layers that get adapters: the attention projections; add "gate_proj", "up_proj" and
    "down_proj" to adapt the MLPs as well (more capacity, about 3x the adapter parameters)."""
    gradient_checkpointing: bool = False
    """Recompute the decoder's activations in the backward pass instead of keeping them: about a third
    more compute for a fraction of the activation memory. For real backbones (a 1.5B-parameter Qwen2
    decoder over ~100 tokens per sample), where activations, not weights, limit the batch."""

    # --- pretrained backbones -------------------------------------------------------------------------
    vision_pretrained: str | None = None
    vlm_pretrained: str | None = None
    vision_config: dict[str, Any] | None = None
    """Filled in when the model is built: the exact HF configs, so a checkpoint rebuilds offline."""
    text_config: dict[str, Any] | None = None
    text_model_type: str = "qwen2"
    """"qwen2" (a Qwen2 decoder) or "qwen2_vl" (the text decoder of a Qwen2-VL checkpoint)."""

    def __post_init__(self):
        self.cameras = tuple(self.cameras)
        self.view_tokens = tuple(int(v) for v in self.view_tokens)
        self.unet_down_dims = tuple(self.unet_down_dims)
        self.keypoint_channels = tuple(int(c) for c in self.keypoint_channels)
        self.lora_targets = tuple(self.lora_targets)
        self.embodiments = {k: tuple(v) for k, v in self.embodiments.items()}
        if len(self.cameras) != len(self.view_tokens):
            raise ValueError(f"one token count per camera: {self.cameras} vs {self.view_tokens}")
        for n in self.view_tokens:
            if round(n**0.5) ** 2 != n:
                raise ValueError(f"view_tokens must be square numbers, got {n}")
        if self.chunk % 2 ** (len(self.unet_down_dims) - 1):
            raise ValueError(f"chunk {self.chunk} must be divisible by 2**(len(unet_down_dims)-1)")
        check_vision_stem(self.vision_stem, self.vision_pretrained)
        check_token_merge(self.token_merge, self.image_size, self.patch_size, self.view_tokens)
        if self.visual_condition_dim < 0:
            raise ValueError(f"visual_condition_dim must be >= 0, got {self.visual_condition_dim}")
        if self.visual_condition_source not in VISUAL_CONDITION_SOURCES:
            raise ValueError(
                f"visual_condition_source must be one of {', '.join(VISUAL_CONDITION_SOURCES)}, "
                f"got {self.visual_condition_source!r}"
            )
        check_keypoint_path("keypoint_condition", self.keypoint_condition, self.keypoint_channels)
        if self.diffusion_samples < 1:
            raise ValueError(f"diffusion_samples must be >= 1, got {self.diffusion_samples}")
        if not 1 <= self.execute_steps <= self.chunk:
            raise ValueError(f"execute_steps must be in 1..chunk, got {self.execute_steps}")
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise ValueError(f"lora_rank, lora_alpha must be >= 0: {self.lora_rank}, {self.lora_alpha}")
        if self.lora_rank > 0 and not self.lora_targets:
            raise ValueError("lora_targets must name at least one decoder layer when lora_rank > 0")
