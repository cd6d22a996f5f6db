"""OpenVLA behind the harness' Policy protocol, and its checkpoint directory format.

A checkpoint directory holds:
    config.json          OpenVLAConfig (with the exact HF vision and text configs)
    model.safetensors    every weight, the action bins' percentile bounds included
    tokenizer.json ...   the tokenizer with its action tokens (`PreTrainedTokenizerFast.save_pretrained`)
    openvla_meta.json    what it was trained on (task, demos file, steps), for humans
Weights are safetensors only: no pickles are loaded from a checkpoint. This module imports torch only
when a model is built, so the runner can validate a checkpoint directory cheaply.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from divla_eval.baselines.openvla.config import LABEL, OpenVLAConfig
from divla_eval.checkpoint import (
    CheckpointError,
    check_files,
    checkpoint_hash,
    load_weights,
    read_config,
    save_weights,
)
from divla_eval.policy import ActionChunk, Observation, PolicyMetadata, use_torch_thread_share

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
META_FILE = "openvla_meta.json"


def check_checkpoint(path: str | Path, embodiment: str | None = None, proprio_dim: int | None = None) -> dict:
    """Validate a checkpoint directory without loading torch (files, config, robot); returns its
    config dict. `proprio_dim` is accepted for the runner's sake and ignored: OpenVLA reads no
    proprioception, so a change of its layout leaves the checkpoint valid."""
    path = Path(path)
    check_files(path, REQUIRED_FILES, LABEL)
    d = read_config(path, OpenVLAConfig, "openvla")  # checked: from_dict cannot fail
    cfg = OpenVLAConfig.from_dict(d)
    if embodiment is not None and embodiment != cfg.embodiment:
        raise CheckpointError(
            f"{path} was trained for {cfg.embodiment!r}, not for {embodiment!r}: train one on this robot's "
            "demonstrations first"
        )
    return d


class OpenVLAPolicy:
    """Registered as `openvla`; built from a checkpoint (`from_pretrained`). One action per call,
    executed before the next call (no chunking, as the paper)."""

    requires_checkpoint = True
    check_checkpoint = staticmethod(check_checkpoint)  # what the runner's validation calls
    INFERENCE_OPTIONS: dict[str, type] = {}
    """None: greedy decoding of one action per call has no step count or chunk to change."""

    def __init__(self, model, checkpoint_id: str | None = None, device: str = "cpu"):
        use_torch_thread_share()

        self.model = model.to(device).eval()
        self.device = device
        cfg: OpenVLAConfig = model.cfg
        self.metadata = PolicyMetadata(
            name="openvla",
            cameras=cfg.cameras,
            execute_steps=1,
            checkpoint_hash=checkpoint_id,
            reasoning=False,
        )

    # --- the Policy protocol ------------------------------------------------------------------------
    def reset(self, instruction: str, seed: int) -> None:
        """Nothing to forget or reseed: greedy decoding of one observation is deterministic."""

    def infer(self, obs: Observation) -> ActionChunk:
        import torch

        cfg = self.model.cfg
        if obs.embodiment != cfg.embodiment:
            raise CheckpointError(f"this {LABEL} was trained for {cfg.embodiment!r}, not {obs.embodiment!r}")
        images = {
            c: torch.from_numpy(np.ascontiguousarray(obs.images[c])).permute(2, 0, 1)[None].float().div(255)
            for c in cfg.cameras
        }
        action = self.model.act({c: v.to(self.device) for c, v in images.items()}, obs.instruction)
        return ActionChunk(actions=action.cpu().numpy().astype(np.float64))  # [1, action_dim]

    # --- construction and files ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> OpenVLAPolicy:
        from divla_eval.baselines.openvla.model import OpenVLAModel
        from divla_eval.divla.policy import _load_tokenizer  # DiVLA's: one clean error for a bad file

        path = Path(path)
        cfg = OpenVLAConfig.from_dict(check_checkpoint(path))
        # the HF configs inside rebuild the architecture; the weights come from model.safetensors
        cfg.vision_pretrained = cfg.vlm_pretrained = None
        model = OpenVLAModel(cfg, _load_tokenizer(path))
        load_weights(model, path)
        return cls(model, checkpoint_id=checkpoint_hash(path), device=device)

    def save_pretrained(self, path: str | Path, half: bool = False, meta: dict | None = None) -> Path:
        save_model(self.model, path, half=half, meta=meta)
        return Path(path)


def save_model(model, path: str | Path, half: bool = False, meta: dict | None = None) -> None:
    """Write a checkpoint directory; the weights file is replaced atomically (resumable training)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.cfg.save(path / "config.json")
    model.tokenizer.save_pretrained(path)
    save_weights(model, path, half=half)
    if meta is not None:
        (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
