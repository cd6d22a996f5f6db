"""OpenVLA's configuration: one typed dataclass, saved as config.json beside the weights.

OpenVLA (Kim et al. 2024) is a VLM that writes actions as text: every action dimension is cut into
256 bins between the 1st and 99th percentiles of the training actions, each bin is one reserved
vocabulary token, and one action (7 tokens, 14 on the bimanual robot) is decoded autoregressively per
call, with no chunking. The paper's backbone is Prismatic-7B (DINOv2 + SigLIP, Llama 2); here the
backbone is DiVLA's own (SigLIP vision, Qwen2 decoder) at DiVLA's default sizes, which are read from
`DiVLAConfig` below, so the two models differ in their action output only and a speed comparison
between them measures that difference. Like the paper's policy it reads no proprioception.

Not frozen (unlike Diffusion Policy's config): building the model writes the exact HF vision and text
configs into it, as DiVLA's does, so that a checkpoint rebuilds offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from divla_eval.config_io import JsonConfig
from divla_eval.divla.config import DiVLAConfig, check_token_merge, check_vision_stem
from divla_eval.nn import check_keypoint_path

LABEL = "OpenVLA"
_DIVLA = DiVLAConfig()  # the backbone sizes below follow DiVLA's defaults wherever those change


@dataclass
class OpenVLAConfig(JsonConfig):
    label = LABEL

    # --- vision: DiVLA's SigLIP encoder and view-adaptive tokens ---------------------------------------
    cameras: tuple[str, ...] = _DIVLA.cameras
    view_tokens: tuple[int, ...] = _DIVLA.view_tokens
    image_size: int = _DIVLA.image_size
    vision_hidden: int = _DIVLA.vision_hidden
    vision_layers: int = _DIVLA.vision_layers
    vision_heads: int = _DIVLA.vision_heads
    patch_size: int = _DIVLA.patch_size
    vision_stem: str = _DIVLA.vision_stem
    """"patch" (SigLIP's) or "conv": as DiVLA's `vision_stem`, so the two backbones stay alike."""
    token_merge: str = _DIVLA.token_merge
    """"mean" or "concat": as DiVLA's `token_merge` (the visual tokens are DiVLA's code)."""

    keypoint_token_points: int = 0
    """> 0: each camera also gets Diffusion Policy's image encoder (a small ResNet ending in this many
    spatial-softmax keypoints, `divla_eval.nn.keypoints`) whose feature, projected to the decoder's
    width, is one more visual token after the SigLIP tokens (one token per camera, whatever the
    count). Not OpenVLA's design: the from-scratch SigLIP does not learn where a small object lies at
    this scale (scripts/probe.py, docs/curves.md); OpenVLA has no action head to feed the keypoints to
    (DiVLA's and Octo's `keypoint_condition`), so they enter where its images do. 0: OpenVLA's."""
    keypoint_channels: tuple[int, ...] = (32, 64)
    """Residual stages of each keypoint encoder (Diffusion Policy's defaults)."""

    # --- language backbone: DiVLA's Qwen2 decoder -------------------------------------------------------
    text_hidden: int = _DIVLA.text_hidden
    text_layers: int = _DIVLA.text_layers
    text_heads: int = _DIVLA.text_heads
    text_kv_heads: int = _DIVLA.text_kv_heads
    text_intermediate: int = _DIVLA.text_intermediate
    vocab_size: int = _DIVLA.vocab_size
    """Size of the BPE vocabulary learnt from the instructions; the action tokens come on top."""

    # --- action tokens ------------------------------------------------------------------------------------
    n_bins: int = 256
    """Bins per action dimension, one reserved token each (the paper's 256)."""

    # --- the robot (set from the demonstrations when the model is built) -----------------------------
    embodiment: str = "panda"
    action_dim: int = 7

    # --- pretrained backbones (as DiVLA's) -----------------------------------------------------------
    vision_pretrained: str | None = None
    vlm_pretrained: str | None = None
    vision_config: dict[str, Any] | None = None
    """Filled in when the model is built: the exact HF configs, so a checkpoint rebuilds offline."""
    text_config: dict[str, Any] | None = None
    text_model_type: str = "qwen2"

    def __post_init__(self):
        self.cameras = tuple(self.cameras)
        self.view_tokens = tuple(int(v) for v in self.view_tokens)
        self.keypoint_channels = tuple(int(c) for c in self.keypoint_channels)
        if not self.cameras:
            raise ValueError("cameras: at least one (the policy sees the scene only through them)")
        if len(self.cameras) != len(self.view_tokens):
            raise ValueError(f"one token count per camera: {self.cameras} vs {self.view_tokens}")
        for n in self.view_tokens:
            if round(n**0.5) ** 2 != n:
                raise ValueError(f"view_tokens must be square numbers, got {n}")
        check_vision_stem(self.vision_stem, self.vision_pretrained)
        check_token_merge(self.token_merge, self.image_size, self.patch_size, self.view_tokens)
        if self.n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {self.n_bins}")
        if self.action_dim < 1:
            raise ValueError(f"action_dim must be >= 1, got {self.action_dim}")
        check_keypoint_path("keypoint_token_points", self.keypoint_token_points, self.keypoint_channels)
