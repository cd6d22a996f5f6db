"""Diffusion Policy's configuration: one typed dataclass, saved as config.json beside the weights.

The structure follows Chi et al. 2023 (CNN variant): one ResNet-style image encoder per camera with
GroupNorm (BatchNorm's running statistics break with EMA weights and small batches, the paper's own
change) ending in a spatial-softmax keypoint layer; the features of the last `obs_horizon` steps and
the proprioception form the global condition of a FiLM-conditioned 1-D UNet that denoises a chunk of
`chunk` actions, of which the first `execute_steps` run before the next call (the paper's T_o = 2,
T_p = 16, T_a = 8); DDPM with 100 squared-cosine steps to train, 10 DDIM steps to act.

The sizes are cut down for a 2-core CPU: the paper's ResNet-18 encoders (11M parameters each) and
its (256, 512, 1024) UNet would take seconds per step. The defaults have 5.3M parameters (83k per
camera encoder, 5.1M in the UNet); a step of 32 samples at 84 px took 0.43 s with one thread on a
2-core machine busy with other jobs (DiVLA's defaults: 0.33 s, measured the same way). The encoders
dominate that time (they see T_o = 2 frames per camera), the UNet the parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass

from divla_eval.config_io import JsonConfig
from divla_eval.nn import check_group_channels

LABEL = "Diffusion Policy"


@dataclass(frozen=True)
class DiffusionPolicyConfig(JsonConfig):
    """Frozen: a built model's config is what its weights mean; change it with `dataclasses.replace`."""

    label = LABEL

    # --- observations ---------------------------------------------------------------------------------
    cameras: tuple[str, ...] = ("front", "wrist")
    obs_horizon: int = 2
    """Consecutive steps conditioned on (T_o); the policy adapter keeps this many observations."""
    image_size: int = 84
    """Resolution trained on (set from the demonstrations); the policy refuses other sizes."""
    shift_pad: int = 4
    """Random-shift augmentation in pixels (the paper random-crops 84 -> 76, i.e. about +-4 px)."""

    # --- image encoder (one per camera) ---------------------------------------------------------------
    encoder_channels: tuple[int, ...] = (32, 64)
    """Channels of the residual stages after a stride-2 stem and a 2x max-pool; each later stage
    halves the resolution (84 px -> 21 -> 11 with the defaults)."""
    num_keypoints: int = 32
    """Spatial-softmax keypoints per camera (robomimic's default, which the paper uses)."""
    feature_dim: int = 64
    """Per-camera feature after the keypoint layer's linear projection."""

    # --- action chunk and denoiser --------------------------------------------------------------------
    chunk: int = 16
    """Actions predicted per call (T_p)."""
    execute_steps: int = 8
    """Actions executed per call before the next one (T_a, the runner's replanning period)."""
    unet_down_dims: tuple[int, ...] = (64, 128, 256)
    step_embed_dim: int = 64
    kernel_size: int = 5
    unet_groups: int = 8
    train_diffusion_steps: int = 100
    inference_steps: int = 10

    # --- the robot (set from the demonstrations when the model is built) -----------------------------
    embodiment: str = "panda"
    action_dim: int = 7
    proprio_dim: int = 11

    def __post_init__(self):
        # JSON gives lists; tuples keep the config hashable and comparable with the defaults
        object.__setattr__(self, "cameras", tuple(self.cameras))
        object.__setattr__(self, "encoder_channels", tuple(int(c) for c in self.encoder_channels))
        object.__setattr__(self, "unet_down_dims", tuple(int(c) for c in self.unet_down_dims))
        if not self.cameras:
            raise ValueError("cameras: at least one (the policy sees the scene only through them)")
        if self.obs_horizon < 1:
            raise ValueError(f"obs_horizon must be >= 1, got {self.obs_horizon}")
        if not self.encoder_channels or not self.unet_down_dims:
            raise ValueError("encoder_channels and unet_down_dims need at least one entry each")
        check_group_channels("encoder channels", self.encoder_channels)
        for c in self.unet_down_dims:
            if c % self.unet_groups:
                raise ValueError(f"unet_down_dims {c}: must be a multiple of unet_groups={self.unet_groups}")
        if self.chunk % 2 ** (len(self.unet_down_dims) - 1):
            raise ValueError(f"chunk {self.chunk} must be divisible by 2**(len(unet_down_dims)-1)")
        if not 1 <= self.execute_steps <= self.chunk:
            raise ValueError(f"execute_steps must be in 1..chunk, got {self.execute_steps}")
        if not 1 <= self.inference_steps <= self.train_diffusion_steps:
            raise ValueError("inference_steps must be in 1..train_diffusion_steps")

    @property
    def cond_dim(self) -> int:
        """Global condition of the UNet: each observation step's camera features and proprioception."""
        return self.obs_horizon * (len(self.cameras) * self.feature_dim + self.proprio_dim)
