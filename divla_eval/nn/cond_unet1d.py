"""A FiLM-conditioned 1-D temporal UNet over an action chunk (Chi et al. 2023, Diffusion Policy).

Why it is written here: diffusers' `UNet1DModel` takes no conditioning vector (only extra input
channels), and both DiVLA's action head and the Diffusion Policy baseline need one: the denoising
step and the observation features enter every residual block as a FiLM scale and shift. diffusers
still supplies the sinusoidal timestep embedding and, in the callers, the noise schedulers.

On top of the Diffusion Policy design, each block can take a second FiLM input, `film`: DiVLA's
reasoning embedding, "injected into every layer of the action head" as h = gamma(r) * h + beta(r).
It is a separate projection (not folded into the global condition) so that the ablation without
reasoning injection (`film_dim=0`, TinyVLA's head) removes exactly those layers and nothing else.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import Timesteps
from torch import nn


class Conv1dBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish, the Diffusion Policy building block."""

    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int):
        super().__init__(
            nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2),
            nn.GroupNorm(groups, c_out),
            nn.Mish(),
        )


class FiLM(nn.Module):
    """Per-channel scale and shift from a vector. Starts as the identity (gamma = 1, beta = 0), so a
    freshly added conditioning input does not disturb what the block already computes."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * channels))
        nn.init.zeros_(self.proj[1].weight)
        nn.init.zeros_(self.proj[1].bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(cond).unsqueeze(-1).chunk(2, dim=1)
        return (1 + gamma) * h + beta


class CondResBlock1D(nn.Module):
    def __init__(self, c_in: int, c_out: int, cond_dim: int, film_dim: int, kernel: int, groups: int):
        super().__init__()
        self.block1 = Conv1dBlock(c_in, c_out, kernel, groups)
        self.block2 = Conv1dBlock(c_out, c_out, kernel, groups)
        self.cond = FiLM(cond_dim, c_out)
        self.cond.proj[1].reset_parameters()  # the global condition must act from the start
        self.film = FiLM(film_dim, c_out) if film_dim else None
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor, film: torch.Tensor | None) -> torch.Tensor:
        h = self.cond(self.block1(x), cond)
        if self.film is not None:
            h = self.film(h, film)
        h = self.block2(h)
        if self.film is not None:
            h = self.film(h, film)
        return h + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """Denoiser eps(x_t, t | cond[, film]) over x of shape [B, T, C] (T: chunk length, C: channels).

    `T` must be divisible by 2 ** (len(down_dims) - 1).
    """

    def __init__(
        self,
        input_dim: int,
        cond_dim: int,
        film_dim: int = 0,
        down_dims: tuple[int, ...] = (64, 128, 256),
        step_embed_dim: int = 64,
        kernel: int = 5,
        groups: int = 8,
    ):
        super().__init__()
        self.step_embed = nn.Sequential(
            Timesteps(step_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0),
            nn.Linear(step_embed_dim, 4 * step_embed_dim),
            nn.Mish(),
            nn.Linear(4 * step_embed_dim, step_embed_dim),
        )
        c = step_embed_dim + cond_dim
        dims = (input_dim, *down_dims)
        block = dict(cond_dim=c, film_dim=film_dim, kernel=kernel, groups=groups)
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(down_dims) - 1
            self.down.append(
                nn.ModuleList(
                    [
                        CondResBlock1D(c_in, c_out, **block),
                        CondResBlock1D(c_out, c_out, **block),
                        nn.Conv1d(c_out, c_out, 3, 2, 1) if not last else nn.Identity(),
                    ]
                )
            )
        mid = down_dims[-1]
        self.mid = nn.ModuleList([CondResBlock1D(mid, mid, **block), CondResBlock1D(mid, mid, **block)])
        self.up = nn.ModuleList()
        for c_out, c_in in reversed(list(zip(down_dims[:-1], down_dims[1:]))):
            self.up.append(
                nn.ModuleList(
                    [
                        CondResBlock1D(2 * c_in, c_out, **block),
                        CondResBlock1D(c_out, c_out, **block),
                        nn.ConvTranspose1d(c_out, c_out, 4, 2, 1),
                    ]
                )
            )
        self.final = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel, groups), nn.Conv1d(down_dims[0], input_dim, 1)
        )

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        cond: torch.Tensor,
        film: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if timestep.dim() == 0:
            timestep = timestep.expand(x.shape[0])
        g = torch.cat([self.step_embed(timestep.to(x.device)), cond], dim=-1)
        h = x.transpose(1, 2)  # [B, C, T]
        skips = []
        for res1, res2, down in self.down:
            h = res2(res1(h, g, film), g, film)
            skips.append(h)
            h = down(h)
        for res in self.mid:
            h = res(h, g, film)
        for res1, res2, up in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = up(res2(res1(h, g, film), g, film))
        return self.final(h).transpose(1, 2)
