"""Octo behind the harness' Policy protocol, and its checkpoint directory format.

A checkpoint directory holds:
    config.json         OctoConfig, including which frozen text encoder it reads instructions with
    model.safetensors   every trained weight and the normalisation statistics; not the text encoder's
                        (frozen and 88 MB: it is loaded from its installed package instead)
    octo_meta.json      what it was trained on (task, demos file, steps, text encoder version), for humans
Weights are safetensors only: no pickles are loaded from a checkpoint. This module imports torch only
when a model is built, so the runner can validate a checkpoint directory cheaply.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np

from divla_eval.baselines.octo.config import LABEL, TEXT_ENCODER_PACKAGES, OctoConfig, text_encoder_dir
from divla_eval.checkpoint import CheckpointError
from divla_eval.errors import DivlaEvalError
from divla_eval.learned import LearnedPolicy
from divla_eval.policy import ActionChunk, Observation, ObservationHistory, PolicyMetadata


class OctoPolicy(LearnedPolicy):
    """Registered as `octo`; built from a checkpoint (`from_pretrained`).

    The instruction is encoded once per episode, at `reset`. Like Diffusion Policy it keeps the last
    `obs_horizon` observations itself (the runner passes the steps between calls through `observe`),
    and at an episode's first call the one observation is repeated, as training samples repeat a
    demo's first frame.
    """

    name = "octo"
    config_class = OctoConfig
    model_class = "divla_eval.baselines.octo.model:OctoModel"
    meta_file = "octo_meta.json"
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
        cfg: OctoConfig = model.cfg
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
        self._text = None

    # --- the Policy protocol ------------------------------------------------------------------------
    def reset(self, instruction: str, seed: int) -> None:
        """A new episode: encode its instruction, forget the previous one's observations, reseed the
        sampling noise."""
        self._text = self.model.encode_text([instruction])
        self._history.clear()
        self._generator.manual_seed(int(seed))

    def observe(self, obs: Observation) -> None:
        """Remember an observation (the runner passes the steps between calls through here)."""
        self._history.add(obs)

    def infer(self, obs: Observation) -> ActionChunk:
        if self._text is None:  # called without reset: read the observation's own instruction
            self._text = self.model.encode_text([obs.instruction])
        self.observe(obs)
        images, proprio = self._history.tensors()
        actions = self.model.act(
            {c: v.to(self.device) for c, v in images.items()},
            proprio.to(self.device),
            self._text,
            generator=self._generator,
            inference_steps=self.inference_steps,
        )
        return ActionChunk(actions=actions[0].cpu().numpy().astype(np.float64))

    # --- checkpoints: the base's, and the frozen text encoder they read instructions with ------------
    @classmethod
    def check_config(cls, path: Path, config: dict, embodiment: str | None, proprio_dim: int | None) -> None:
        super().check_config(path, config, embodiment, proprio_dim)
        try:
            text_encoder_dir(OctoConfig.from_dict(config).text_encoder)
        except DivlaEvalError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc

    @classmethod
    def meta_record(cls, model, meta: dict) -> dict:
        name = model.cfg.text_encoder
        return {**meta, "text_encoder": {"name": name, "version": text_encoder_version(name)}}


def text_encoder_version(name: str) -> str | None:
    """The installed version of a packaged text encoder (None for a local directory)."""
    if name not in TEXT_ENCODER_PACKAGES:
        return None
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


check_checkpoint = OctoPolicy.check_checkpoint
save_model = OctoPolicy.save_model
