"""Diffusion Policy behind the harness' Policy protocol, and its checkpoint directory format.

A checkpoint directory holds:
    config.json                     DiffusionPolicyConfig
    model.safetensors               every weight, the normalisation statistics included
    diffusion_policy_meta.json      what it was trained on (task, demos file, steps), for humans
Weights are safetensors only: no pickles are loaded from a checkpoint. This module imports torch only
when a model is built, so the runner can validate a checkpoint directory cheaply.
"""

from __future__ import annotations

import numpy as np

from divla_eval.baselines.diffusion_policy.config import LABEL, DiffusionPolicyConfig
from divla_eval.learned import LearnedPolicy
from divla_eval.policy import ActionChunk, Observation, ObservationHistory, PolicyMetadata


class DiffusionPolicy(LearnedPolicy):
    """Registered as `diffusion_policy`; built from a checkpoint (`from_pretrained`).

    It keeps the last `obs_horizon` observations itself: the runner passes the steps between calls
    through `observe`, and at an episode's first call the one observation is repeated, as the
    training samples repeat a demo's first frame.
    """

    name = "diffusion_policy"
    config_class = DiffusionPolicyConfig
    model_class = "divla_eval.baselines.diffusion_policy.model:DiffusionPolicyModel"
    meta_file = "diffusion_policy_meta.json"
    INFERENCE_OPTIONS: dict[str, type] = {"inference_steps": int, "execute_steps": int}
    """What `divla-eval run --policy-option KEY=VALUE` may set (passed to `from_pretrained`): DDIM
    steps per call and actions run from each chunk (1..chunk), overriding the checkpoint config's
    values without changing the config."""

    def __init__(
        self,
        model,
        checkpoint_id: str | None = None,
        device: str = "cpu",
        inference_steps: int | None = None,
        execute_steps: int | None = None,
    ):
        import torch

        super().__init__(model, device, inference_steps=inference_steps, execute_steps=execute_steps)
        cfg: DiffusionPolicyConfig = model.cfg
        self.inference_steps = cfg.inference_steps if inference_steps is None else inference_steps
        """DDIM steps per call (the checkpoint config's unless overridden)."""
        self.metadata = PolicyMetadata(
            name=self.name,
            cameras=cfg.cameras,
            execute_steps=cfg.execute_steps if execute_steps is None else execute_steps,
            checkpoint_hash=checkpoint_id,
            reasoning=False,
            obs_horizon=cfg.obs_horizon,
        )
        self._generator = torch.Generator(device=device).manual_seed(0)
        self._history = ObservationHistory(LABEL, cfg)

    # --- the Policy protocol ------------------------------------------------------------------------
    def reset(self, instruction: str, seed: int) -> None:
        """A new episode: forget the previous one's observations; reseed the sampling noise. The
        instruction is ignored: the paper's policy has no language input."""
        self._history.clear()
        self._generator.manual_seed(int(seed))

    def observe(self, obs: Observation) -> None:
        """Remember an observation (the runner passes the steps between calls through here)."""
        self._history.add(obs)

    def infer(self, obs: Observation) -> ActionChunk:
        self.observe(obs)
        images, proprio = self._history.tensors()
        actions = self.model.act(
            {c: v.to(self.device) for c, v in images.items()},
            proprio.to(self.device),
            generator=self._generator,
            inference_steps=self.inference_steps,
        )
        return ActionChunk(actions=actions[0].cpu().numpy().astype(np.float64))

    @staticmethod
    def infer_batch(policies: list[DiffusionPolicy], observations: list[Observation]) -> list[ActionChunk]:
        """One forward pass for several sessions of the same model (the policy server's batching). Each
        session draws its initial noise from its own generator, as `infer` would, so a session's
        actions do not depend on who it was batched with (up to float rounding of the batched ops)."""
        import torch

        first = policies[0]
        if any(p.model is not first.model or p.inference_steps != first.inference_steps for p in policies):
            raise ValueError("infer_batch needs sessions of one model with one inference_steps")
        cfg = first.model.cfg
        views = []
        for policy, obs in zip(policies, observations):
            policy.observe(obs)
            views.append(policy._history.tensors())
        images = {c: torch.cat([v[0][c] for v in views]).to(first.device) for c in cfg.cameras}
        proprio = torch.cat([v[1] for v in views]).to(first.device)
        noise = torch.cat(
            [
                torch.randn((1, cfg.chunk, cfg.action_dim), generator=p._generator, device=p.device)
                for p in policies
            ]
        )
        actions = first.model.act(images, proprio, noise=noise, inference_steps=first.inference_steps)
        return [ActionChunk(actions=a.cpu().numpy().astype(np.float64)) for a in actions]


check_checkpoint = DiffusionPolicy.check_checkpoint
save_model = DiffusionPolicy.save_model
