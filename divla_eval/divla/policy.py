"""DiVLA behind the harness' Policy protocol, and its checkpoint directory format.

A checkpoint directory holds:
    config.json          DiVLAConfig (with the exact HF vision and text configs)
    model.safetensors    every weight (fp32, or fp16 for the shipped reference checkpoint)
    tokenizer.json ...   the tokenizer (`PreTrainedTokenizerFast.save_pretrained`)
    divla_meta.json      what it was trained on (task, demos file, steps), for humans and manifests
Weights are safetensors only: no pickles are loaded from a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from divla_eval.checkpoint import (  # shared by every learned policy
    CheckpointError,
    check_files,
    check_proprio,
    checkpoint_hash,
    load_weights,
    read_config,
    save_weights,
)
from divla_eval.policy import ActionChunk, Observation, PolicyMetadata, use_torch_thread_share

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def check_checkpoint(path: str | Path, embodiment: str | None = None, proprio_dim: int | None = None) -> dict:
    """Validate a checkpoint directory without loading torch; returns its config dict."""
    path = Path(path)
    check_files(path, REQUIRED_FILES, "DiVLA")
    cfg = read_config(path)
    heads = cfg.get("embodiments", {})
    if embodiment is not None:
        if embodiment not in heads:
            raise CheckpointError(
                f"{path} has action heads for {list(heads)}, not for {embodiment!r}: train (or fine-tune) "
                "one for this robot first"
            )
        check_proprio(path, heads[embodiment][1], proprio_dim)
    return cfg


class DiVLAPolicy:
    """Registered as `divla`. Built from a checkpoint (`from_pretrained`) or for training
    (`for_training`)."""

    requires_checkpoint = True
    check_checkpoint = staticmethod(check_checkpoint)  # what the runner's validation calls

    def __init__(self, model, checkpoint_id: str | None = None, device: str = "cpu"):
        import torch

        use_torch_thread_share()

        self.model = model.to(device).eval()
        self.device = device
        cfg = model.cfg
        self.metadata = PolicyMetadata(
            name="divla",
            cameras=cfg.cameras,
            execute_steps=cfg.execute_steps,
            checkpoint_hash=checkpoint_id,
            reasoning=True,
        )
        self._generator = torch.Generator(device=device).manual_seed(0)
        self.last_reasoning: str | None = None

    # --- the Policy protocol ------------------------------------------------------------------------
    def reset(self, instruction: str, seed: int) -> None:
        self._generator.manual_seed(int(seed))

    def infer(self, obs: Observation) -> ActionChunk:
        import torch

        images = {
            c: torch.from_numpy(np.ascontiguousarray(obs.images[c])).permute(2, 0, 1)[None].float().div(255)
            for c in self.model.cfg.cameras
        }
        proprio = torch.as_tensor(obs.proprio, dtype=torch.float32)[None]
        out = self.model.act(
            {c: v.to(self.device) for c, v in images.items()},
            proprio.to(self.device),
            obs.instruction,
            obs.embodiment,
            generator=self._generator,
        )
        text = self.model.tokenizer.decode(out.reasoning_ids[0], skip_special_tokens=True).strip()
        self.last_reasoning = text
        return ActionChunk(actions=out.actions[0].cpu().numpy().astype(np.float64), reasoning=text)

    # --- construction and files ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> DiVLAPolicy:
        from divla_eval.divla.model import DiVLAModel

        path = Path(path)
        check_checkpoint(path)
        model = DiVLAModel(_load_config(path), _load_tokenizer(path))
        load_weights(model, path)
        return cls(model, checkpoint_id=checkpoint_hash(path), device=device)

    def save_pretrained(self, path: str | Path, half: bool = False, meta: dict | None = None) -> Path:
        save_model(self.model, path, half=half, meta=meta)
        return Path(path)


def save_model(model, path: str | Path, half: bool = False, meta: dict | None = None) -> None:
    """Write a checkpoint directory atomically enough for resumable training: the weights file is
    written under a temporary name and renamed, so a crash never leaves a torn model.safetensors."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.cfg.save(path / "config.json")
    model.tokenizer.save_pretrained(path)
    save_weights(model, path, half=half)
    if meta is not None:
        (path / "divla_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def _load_config(path: Path):
    from divla_eval.divla.config import DiVLAConfig

    cfg = DiVLAConfig.load(path / "config.json")
    # the HF configs inside rebuild the architecture; the weights come from model.safetensors
    cfg.vision_pretrained = cfg.vlm_pretrained = None
    return cfg


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # tokenizers raises plain Exceptions on a damaged JSON file
        raise CheckpointError(f"{path}: cannot read the tokenizer ({exc})") from exc
