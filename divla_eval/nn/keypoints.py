"""Diffusion Policy's image encoder (Chi et al. 2023, after robomimic): a small ResNet with GroupNorm
ending in spatial-softmax keypoints. Shared by Diffusion Policy (its only view of the images) and
DiVLA's optional `keypoint_condition` path.

    [N, 3, H, W] in [0, 1] --stride-2 stem, 2x max-pool--> residual stages (each later one stride 2)
        --1x1 conv to K maps, softmax over positions--> K expected (x, y) --linear--> feature
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from divla_eval.nn import norm_groups


class ResidualBlock(nn.Module):
    """ResNet's basic block with GroupNorm in place of BatchNorm: batch statistics would differ
    between training batches, EMA weights and single-observation inference."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.GroupNorm(norm_groups(c_out), c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.GroupNorm(norm_groups(c_out), c_out),
        )
        self.skip = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(norm_groups(c_out), c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class SpatialSoftmax(nn.Module):
    """Keypoints as expected image coordinates (Levine et al. 2016; robomimic's pooling, which the
    paper keeps): unlike average pooling it preserves *where* things are, which is what an action
    needs."""

    def __init__(self, channels: int, num_keypoints: int):
        super().__init__()
        self.keypoints = nn.Conv2d(channels, num_keypoints, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.keypoints(x)  # [N, K, H, W]
        n, k, h, w = f.shape
        attn = f.flatten(2).softmax(-1).view(n, k, h, w)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
        ex = (attn.sum(2) * xs).sum(-1)  # [N, K]
        ey = (attn.sum(3) * ys).sum(-1)
        return torch.stack([ex, ey], dim=-1).flatten(1)  # [N, 2K]: (x, y) per keypoint


class KeypointEncoder(nn.Module):
    """One camera: stride-2 stem + max-pool (as ResNet's), residual stages, keypoints, projection."""

    def __init__(self, channels: tuple[int, ...], num_keypoints: int, feature_dim: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, 2, 1, bias=False),
            nn.GroupNorm(norm_groups(channels[0]), channels[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        stages, c_in = [], channels[0]
        for i, c in enumerate(channels):
            stages.append(ResidualBlock(c_in, c, stride=1 if i == 0 else 2))
            c_in = c
        self.stages = nn.Sequential(*stages)
        self.pool = SpatialSoftmax(c_in, num_keypoints)
        self.proj = nn.Linear(2 * num_keypoints, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [N, 3, H, W] in [0, 1] -> [N, feature_dim]."""
        return self.proj(self.pool(self.stages(self.stem(images * 2 - 1))))


class CameraKeypoints(nn.ModuleDict):
    """One `KeypointEncoder` per camera: Diffusion Policy's image encoders and the keypoint path of
    DiVLA, Octo and OpenVLA. A ModuleDict, so the weights keep the names `<attribute>.<camera>.*` that
    the shipped checkpoints have."""

    def __init__(
        self, cameras: tuple[str, ...], channels: tuple[int, ...], num_keypoints: int, feature_dim: int
    ):
        super().__init__({c: KeypointEncoder(channels, num_keypoints, feature_dim) for c in cameras})

    def forward(self, images: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """camera -> float [N, 3, H, W] in [0, 1] to each camera's feature [N, feature_dim], in the
        cameras' order."""
        return [encoder(images[camera]) for camera, encoder in self.items()]
