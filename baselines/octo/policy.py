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

import json
from importlib import metadata
from pathlib import Path

import numpy as np

from divla_eval.baselines.octo.config import LABEL, TEXT_ENCODER_PACKAGES, OctoConfig, text_encoder_dir
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
from divla_eval.errors import DivlaEvalError
from divla_eval.policy import (
    ActionChunk,
    Observation,
    ObservationHistory,
    PolicyMetadata,
    use_torch_thread_share,
)

REQUIRED_FILES = ("config.json", "model.safetensors")
META_FILE = "octo_meta.json"


def check_checkpoint(path: str | Path, embodiment: str | None = None, proprio_dim: int | None = None) -> dict:
    """Validate a checkpoint directory without loading torch (files, config, robot, text encoder);
    returns its config dict."""
    path = Path(path)
    check_files(path, REQUIRED_FILES, LABEL)
    d = read_config(path, OctoConfig, "octo")  # checked: from_dict cannot fail
    cfg = OctoConfig.from_dict(d)
    if embodiment is not None and embodiment != cfg.embodiment:
        raise CheckpointError(
            f"{path} was trained for {cfg.embodiment!r}, not for {embodiment!r}: train one on this robot's "
            "demonstrations first"
        )
    check_proprio(path, cfg.proprio_dim, proprio_dim)
    try:
        text_encoder_dir(cfg.text_encoder)
    except DivlaEvalError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return d


class OctoPolicy:
    """Registered as `octo`; built from a checkpoint (`from_pretrained`).

    The instruction is encoded once per episode, at `reset`. Like Diffusion Policy it keeps the last
    `obs_horizon` observations itself (the runner passes the steps between calls through `observe`),
    and at an episode's first call the one observation is repeated, as training samples repeat a
    demo's first frame.
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
        cfg: OctoConfig = model.cfg
        self.inference_steps = cfg.inference_steps if inference_steps is None else inference_steps
        """DDIM steps per call (the checkpoint config's unless overridden)."""
        self.metadata = PolicyMetadata(
            name="octo",
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

    # --- construction and files ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str = "cpu",
        inference_steps: int | None = None,
        execute_steps: int | None = None,
    ) -> OctoPolicy:
        """Load a checkpoint directory; the keyword options are `INFERENCE_OPTIONS` (see the class)."""
        from divla_eval.baselines.octo.model import OctoModel

        path = Path(path)
        cfg = OctoConfig.from_dict(check_checkpoint(path))
        overrides = {"inference_steps": inference_steps, "execute_steps": execute_steps}
        # before the weights are read: an out-of-range option costs nothing
        check_inference_options({k: v for k, v in overrides.items() if v is not None}, cfg)
        model = OctoModel(cfg)
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


def text_encoder_version(name: str) -> str | None:
    """The installed version of a packaged text encoder (None for a local directory)."""
    if name not in TEXT_ENCODER_PACKAGES:
        return None
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def save_model(model, path: str | Path, half: bool = False, meta: dict | None = None) -> None:
    """Write a checkpoint directory; the weights file is replaced atomically (resumable training)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.cfg.save(path / "config.json")
    save_weights(model, path, half=half)
    if meta is not None:
        name = model.cfg.text_encoder
        meta = {**meta, "text_encoder": {"name": name, "version": text_encoder_version(name)}}
        (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
