"""Diffusion Policy behind the harness' Policy protocol, and its checkpoint directory format.

A checkpoint directory holds:
    config.json                     DiffusionPolicyConfig
    model.safetensors               every weight, the normalisation statistics included
    diffusion_policy_meta.json      what it was trained on (task, demos file, steps), for humans
Weights are safetensors only: no pickles are loaded from a checkpoint. This module imports torch only
when a model is built, so the runner can validate a checkpoint directory cheaply.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from divla_eval.baselines.diffusion_policy.config import LABEL, DiffusionPolicyConfig
from divla_eval.checkpoint import (
    CheckpointError,
    check_files,
    check_inference_options,
    check_proprio,
    checkpoint_hash,
    load_weights,
    read_config,
    save_weights,
)
from divla_eval.policy import (
    ActionChunk,
    Observation,
    ObservationHistory,
    PolicyMetadata,
    use_torch_thread_share,
)

REQUIRED_FILES = ("config.json", "model.safetensors")
META_FILE = "diffusion_policy_meta.json"


def check_checkpoint(path: str | Path, embodiment: str | None = None, proprio_dim: int | None = None) -> dict:
    """Validate a checkpoint directory without loading torch (files, config, robot); returns its
    config dict."""
    path = Path(path)
    check_files(path, REQUIRED_FILES, LABEL)
    d = read_config(path, DiffusionPolicyConfig, "diffusion_policy")  # checked: from_dict cannot fail
    cfg = DiffusionPolicyConfig.from_dict(d)
    if embodiment is not None and embodiment != cfg.embodiment:
        raise CheckpointError(
            f"{path} was trained for {cfg.embodiment!r}, not for {embodiment!r}: train one on this robot's "
            "demonstrations first"
        )
    check_proprio(path, cfg.proprio_dim, proprio_dim)
    return d


class DiffusionPolicy:
    """Registered as `diffusion_policy`; built from a checkpoint (`from_pretrained`).

    It keeps the last `obs_horizon` observations itself: the runner passes the steps between calls
    through `observe`, and at an episode's first call the one observation is repeated, as the
    training samples repeat a demo's first frame.
    """

    requires_checkpoint = True
    check_checkpoint = staticmethod(check_checkpoint)  # what the runner's validation calls
    INFERENCE_OPTIONS: dict[str, type] = {"inference_steps": int, "execute_steps": int}
    """What `divla-eval run --policy-option KEY=VALUE` may set (passed to `from_pretrained`): DDIM
    steps per call and actions run from each chunk (1..chunk), overriding the checkpoint config's
    values without changing the config."""
    check_inference_options = staticmethod(check_inference_options)  # their ranges, against config.json

    def __init__(
        self,
        model,
        checkpoint_id: str | None = None,
        device: str = "cpu",
        inference_steps: int | None = None,
        execute_steps: int | None = None,
    ):
        import torch

        overrides = {"inference_steps": inference_steps, "execute_steps": execute_steps}
        check_inference_options({k: v for k, v in overrides.items() if v is not None}, model.cfg)
        use_torch_thread_share()

        self.model = model.to(device).eval()
        self.device = device
        cfg: DiffusionPolicyConfig = model.cfg
        self.inference_steps = cfg.inference_steps if inference_steps is None else inference_steps
        """DDIM steps per call (the checkpoint config's unless overridden)."""
        self.metadata = PolicyMetadata(
            name="diffusion_policy",
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

    # --- construction and files ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str = "cpu",
        inference_steps: int | None = None,
        execute_steps: int | None = None,
    ) -> DiffusionPolicy:
        """Load a checkpoint directory; the keyword options are `INFERENCE_OPTIONS` (see the class)."""
        from divla_eval.baselines.diffusion_policy.model import DiffusionPolicyModel

        path = Path(path)
        cfg = DiffusionPolicyConfig.from_dict(check_checkpoint(path))
        overrides = {"inference_steps": inference_steps, "execute_steps": execute_steps}
        # before the weights are read: an out-of-range option costs nothing
        check_inference_options({k: v for k, v in overrides.items() if v is not None}, cfg)
        model = DiffusionPolicyModel(cfg)
        load_weights(model, path)
        return cls(
            model,
            checkpoint_id=checkpoint_hash(path),
            device=device,
            inference_steps=inference_steps,
            execute_steps=execute_steps,
        )

    def save_pretrained(self, path: str | Path, half: bool = False, meta: dict | None = None) -> Path:
        save_model(self.model, path, half=half, meta=meta)
        return Path(path)


def save_model(model, path: str | Path, half: bool = False, meta: dict | None = None) -> None:
    """Write a checkpoint directory; the weights file is replaced atomically (resumable training)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.cfg.save(path / "config.json")
    save_weights(model, path, half=half)
    if meta is not None:
        (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
