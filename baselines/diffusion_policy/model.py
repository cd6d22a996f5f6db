"""The Diffusion Policy network (Chi et al. 2023, CNN variant), at any size.

Data flow of one call:

    each camera, each of the last T_o steps --its own ResNet-style encoder (GroupNorm)-->
        spatial softmax: K keypoints (expected x, y of a softmax over positions) --linear--> feature
    [camera features, standardised proprioception] per step, T_o steps concatenated
        = the global condition of a FiLM-conditioned 1-D UNet (`divla_eval.nn.cond_unet1d`)
    noise [T_p, action_dim] --10 DDIM steps of the UNet--> a chunk in [-1, 1] --min-max--> actions

Kept in a module of its own (the adapter in policy.py imports it lazily) so that validating a
checkpoint directory does not import torch. No language input: the paper's policy has none, so on a
task with several instructions it can only infer the goal from the scene.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from divla_eval.baselines.diffusion_policy.config import DiffusionPolicyConfig
from divla_eval.nn.cond_unet1d import ConditionalUnet1D
from divla_eval.nn.diffusion import NormalizationStats, ddim_sample, make_schedulers, training_noise
from divla_eval.nn.keypoints import CameraKeypoints


class DiffusionPolicyModel(NormalizationStats, nn.Module):
    def __init__(self, cfg: DiffusionPolicyConfig):
        super().__init__()
        self.cfg = cfg
        # one per camera, not shared
        self.encoders = CameraKeypoints(cfg.cameras, cfg.encoder_channels, cfg.num_keypoints, cfg.feature_dim)
        self.unet = ConditionalUnet1D(
            input_dim=cfg.action_dim,
            cond_dim=cfg.cond_dim,
            down_dims=cfg.unet_down_dims,
            step_embed_dim=cfg.step_embed_dim,
            kernel=cfg.kernel_size,
            groups=cfg.unet_groups,
        )
        # the robot's normalisation statistics: buffers, so they travel inside the weights file
        self._register_stats(cfg.action_dim, cfg.proprio_dim)
        self.train_scheduler, self.infer_scheduler = make_schedulers(cfg.train_diffusion_steps)

    # --- conditioning ---------------------------------------------------------------------------------
    def encode(self, images: dict[str, torch.Tensor], proprio: torch.Tensor) -> torch.Tensor:
        """images: camera -> float [B, T_o, 3, H, W] in [0, 1]; proprio: [B, T_o, P] (oldest first).
        Returns the global condition [B, T_o * (cameras * feature_dim + P)]."""
        b, t = proprio.shape[:2]
        feats = [f.view(b, t, -1) for f in self.encoders({c: v.flatten(0, 1) for c, v in images.items()})]
        return torch.cat([*feats, self.normalize_proprio(proprio)], dim=-1).flatten(1)

    # --- training -------------------------------------------------------------------------------------
    def forward(
        self,
        images: dict[str, torch.Tensor],
        proprio: torch.Tensor,
        actions: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The epsilon-prediction loss on raw `actions` [B, T_p, A]. Chunks that run past a demo's end
        repeat its last action and train like the rest ("stay put"), as in the paper."""
        cond = self.encode(images, proprio)
        x0 = self.normalize_actions(actions)
        noise, t = training_noise(x0.shape, self.cfg.train_diffusion_steps, generator, x0.device)
        noisy = self.train_scheduler.add_noise(x0, noise, t)
        l_diff = F.mse_loss(self.unet(noisy, t, cond), noise)
        return {"loss": l_diff}

    # --- inference ------------------------------------------------------------------------------------
    @torch.no_grad()
    def act(
        self,
        images: dict[str, torch.Tensor],
        proprio: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        inference_steps: int | None = None,
    ) -> torch.Tensor:
        """A chunk of actions [B, T_p, A] in the robot's units for observations shaped as in `encode`."""
        cond = self.encode(images, proprio)
        shape = (cond.shape[0], self.cfg.chunk, self.cfg.action_dim)
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=cond.device)
        # `inference_steps`: a policy's override of the config's DDIM steps (the config is left as is)
        steps = self.cfg.inference_steps if inference_steps is None else inference_steps
        x = ddim_sample(self.infer_scheduler, lambda x_t, t: self.unet(x_t, t, cond), x, steps)
        return self.unnormalize_actions(x)
