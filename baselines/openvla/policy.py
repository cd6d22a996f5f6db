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

import numpy as np

from divla_eval.baselines.openvla.config import LABEL, OpenVLAConfig
from divla_eval.checkpoint import CheckpointError
from divla_eval.learned import VisionLanguagePolicy
from divla_eval.policy import ActionChunk, Observation, PolicyMetadata


class OpenVLAPolicy(VisionLanguagePolicy):
    """Registered as `openvla`; built from a checkpoint (`from_pretrained`). One action per call,
    executed before the next call (no chunking, as the paper)."""

    name = "openvla"
    config_class = OpenVLAConfig
    model_class = "divla_eval.baselines.openvla.model:OpenVLAModel"
    meta_file = "openvla_meta.json"
    INFERENCE_OPTIONS: dict[str, type] = {}
    """None: greedy decoding of one action per call has no step count or chunk to change."""
    reads_proprio = False
    """So a change of the proprioception layout leaves its checkpoints valid."""

    def __init__(self, model, checkpoint_id: str | None = None, device: str = "cpu"):
        super().__init__(model, device)
        cfg: OpenVLAConfig = model.cfg
        self.metadata = PolicyMetadata(
            name=self.name,
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


check_checkpoint = OpenVLAPolicy.check_checkpoint
save_model = OpenVLAPolicy.save_model
