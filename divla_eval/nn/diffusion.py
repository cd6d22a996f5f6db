"""The diffusion pieces every diffusion action head shares (DiVLA's and the Diffusion Policy baseline's),
so that the two differ in their conditioning only, never in how actions are scaled, noised or sampled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler


def make_schedulers(train_steps: int) -> tuple[DDPMScheduler, DDIMScheduler]:
    """(DDPM to train, DDIM to act) over the same squared-cosine noise schedule, predicting the noise
    and clipping samples to [-1, 1], the range the actions are normalised to (as Diffusion Policy)."""
    sched = dict(
        num_train_timesteps=train_steps,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        prediction_type="epsilon",
    )
    return DDPMScheduler(**sched), DDIMScheduler(**sched, set_alpha_to_one=True, steps_offset=0)


def training_noise(
    shape: tuple[int, ...], train_steps: int, generator: torch.Generator | None, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise of `shape`, one timestep per row) for a training batch, drawn where the generator lives
    and then moved to `device`. The training loop's generator is on the CPU, so a run draws the same
    numbers on any device (a CPU generator cannot draw on a GPU at all)."""
    where = generator.device if generator is not None else device
    noise = torch.randn(shape, generator=generator, device=where).to(device)
    t = torch.randint(0, train_steps, (shape[0],), generator=generator, device=where).to(device)
    return noise, t


def ddim_sample(
    sched: DDIMScheduler,
    eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """Denoise `x` (pure noise) in `steps` DDIM steps; eps(x_t, t) predicts the noise."""
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(eps(x, t), t, x).prev_sample
    return x


class NormalizationStats:
    """A robot's action and proprioception statistics as buffers of the module that mixes this in, so
    they travel inside its weights file (under the module's own names: action_min, action_max,
    proprio_mean, proprio_std). Call `_register_stats` in `__init__`, then `set_stats` once the data is
    known."""

    def _register_stats(self, action_dim: int, proprio_dim: int) -> None:
        self.register_buffer("action_min", -torch.ones(action_dim))
        self.register_buffer("action_max", torch.ones(action_dim))
        self.register_buffer("proprio_mean", torch.zeros(proprio_dim))
        self.register_buffer("proprio_std", torch.ones(proprio_dim))

    def set_stats(self, action_min, action_max, proprio_mean, proprio_std) -> None:
        for name, value in zip(
            ("action_min", "action_max", "proprio_mean", "proprio_std"),
            (action_min, action_max, proprio_mean, proprio_std),
        ):
            getattr(self, name).copy_(torch.as_tensor(value, dtype=torch.float32))

    def normalize_actions(self, a: torch.Tensor) -> torch.Tensor:
        """To [-1, 1] per dimension (min-max, as Diffusion Policy), the range the sampler clips to;
        constant dimensions map to 0."""
        span = (self.action_max - self.action_min).clamp(min=1e-6)
        return (2 * (a - self.action_min) / span - 1).clamp(-1, 1)

    def unnormalize_actions(self, a: torch.Tensor) -> torch.Tensor:
        span = (self.action_max - self.action_min).clamp(min=1e-6)
        return (a + 1) / 2 * span + self.action_min

    def normalize_proprio(self, p: torch.Tensor) -> torch.Tensor:
        return (p - self.proprio_mean) / self.proprio_std.clamp(min=1e-3)
