"""DiVLA behind the harness' Policy protocol, and its checkpoint directory format.

A checkpoint directory holds:
    config.json          DiVLAConfig (with the exact HF vision and text configs)
    model.safetensors    every weight (fp32, or fp16 for the shipped reference checkpoint)
    tokenizer.json ...   the tokenizer (`PreTrainedTokenizerFast.save_pretrained`)
    divla_meta.json      what it was trained on (task, demos file, steps), for humans and manifests
Weights are safetensors only: no pickles are loaded from a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from divla_eval.checkpoint import CheckpointError, check_proprio
from divla_eval.divla.config import DiVLAConfig
from divla_eval.errors import DivlaEvalError
from divla_eval.learned import VisionLanguagePolicy
from divla_eval.policy import ActionChunk, Observation, PolicyMetadata


class DiVLAPolicy(VisionLanguagePolicy):
    """Registered as `divla`. Built from a checkpoint (`from_pretrained`) or around a model in memory.

    `reasoning_every` trades reasoning freshness for speed, because generating the phrase token by
    token is the autoregressive part of a call:
        1  (default) generate the phrase at every call, as the paper's model does;
        k  generate at the 1st, (k+1)th, ... call after `reset` and, in between, feed the last
           generated token ids back teacher-forced, so a call is one decoder pass (vision, prompt,
           reused phrase, action tokens) plus the diffusion head. The FiLM embedding is taken from
           that pass (the mean hidden state over the reused tokens), as in training, rather than
           copied from the older call: it costs nothing extra and sees the current images;
        0  generate once per episode (at the first call after `reset`) and reuse it ever after:
           "no reasoning generation" after the first call. Skipping generation altogether (an
           empty phrase) would be faster still, but the checkpoint was never trained without a
           phrase, so that would time a different policy than the one evaluated.

    `inference_steps` (DDIM steps per call) and `execute_steps` (actions run from each chunk before
    the next call, 1..chunk) override the checkpoint config's values at load; None keeps them, and
    the config itself (what `save_pretrained` writes) is never changed.

    `oracle_reasoning=1` is a diagnostic, not a benchmark setting: every call is conditioned on the
    scripted expert's phrase for the current state (teacher-forced, as in training) instead of a
    generated one. Paired with the same episodes run normally, it tells whether failures come from
    wrong reasoning (success rises with the right phrase) or from the motion (it does not).
    """

    name = "divla"
    config_class = DiVLAConfig
    model_class = "divla_eval.divla.model:DiVLAModel"
    meta_file = "divla_meta.json"
    INFERENCE_OPTIONS: dict[str, type] = {
        "reasoning_every": int,
        "inference_steps": int,
        "execute_steps": int,
        "oracle_reasoning": int,
    }
    """What `divla-eval run --policy-option KEY=VALUE` may set (passed to `from_pretrained`)."""
    timing_variants = {
        "reasoning every call": {"reasoning_every": 1},
        "reasoning every 4th call": {"reasoning_every": 4},
        "no reasoning generation after the first call": {"reasoning_every": 0},
    }
    """Settings `divla-eval bench` times one after another (see divla_eval.timing)."""

    def __init__(
        self,
        model,
        checkpoint_id: str | None = None,
        device: str = "cpu",
        reasoning_every: int = 1,
        inference_steps: int | None = None,
        execute_steps: int | None = None,
        oracle_reasoning: int = 0,
    ):
        import torch

        cfg = model.cfg
        super().__init__(
            model,
            device,
            inference_steps=inference_steps,
            execute_steps=execute_steps,
            oracle_reasoning=oracle_reasoning,
        )
        self.inference_steps = cfg.inference_steps if inference_steps is None else inference_steps
        """DDIM steps per call (the checkpoint config's unless overridden)."""
        self.metadata = PolicyMetadata(
            name=self.name,
            cameras=cfg.cameras,
            execute_steps=cfg.execute_steps if execute_steps is None else execute_steps,
            checkpoint_hash=checkpoint_id,
            reasoning=True,
            oracle_reasoning=bool(oracle_reasoning),
        )
        self._generator = torch.Generator(device=device).manual_seed(0)
        self.last_reasoning: str | None = None
        self.reasoning_every = reasoning_every
        self._calls = 0
        self._reasoning_ids: list[int] | None = None  # the last generated phrase, for reuse

    @property
    def reasoning_every(self) -> int:
        return self._reasoning_every

    @reasoning_every.setter
    def reasoning_every(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"reasoning_every must be an integer >= 0 (0: once per episode), got {value!r}")
        self._reasoning_every = value

    # --- the Policy protocol ------------------------------------------------------------------------
    def reset(self, instruction: str, seed: int) -> None:
        self._generator.manual_seed(int(seed))
        self._calls = 0
        self._reasoning_ids = None  # a phrase never carries over into another episode

    def infer(self, obs: Observation) -> ActionChunk:
        import torch

        images = {
            c: torch.from_numpy(np.ascontiguousarray(obs.images[c])).permute(2, 0, 1)[None].float().div(255)
            for c in self.model.cfg.cameras
        }
        proprio = torch.as_tensor(obs.proprio, dtype=torch.float32)[None]
        k = self.reasoning_every
        generate = self._reasoning_ids is None or (k > 0 and self._calls % k == 0)
        oracle = None
        if self.metadata.oracle_reasoning:
            if obs.expert_reasoning is None:
                raise DivlaEvalError(
                    "oracle_reasoning=1 needs the scripted expert's phrase, and this observation has "
                    "none (only `divla-eval run` on a task with a scripted expert provides it)"
                )
            oracle, generate = obs.expert_reasoning, True
        out = self.model.act(
            {c: v.to(self.device) for c, v in images.items()},
            proprio.to(self.device),
            obs.instruction,
            obs.embodiment,
            generator=self._generator,
            reasoning=oracle,
            reasoning_ids=None if generate else self._reasoning_ids,
            inference_steps=self.inference_steps,
        )
        self._calls += 1
        if generate:
            self._reasoning_ids = list(out.reasoning_ids[0])
            text = self.model.tokenizer.decode(out.reasoning_ids[0], skip_special_tokens=True).strip()
        else:
            text = self.last_reasoning
        self.last_reasoning = text
        return ActionChunk(actions=out.actions[0].cpu().numpy().astype(np.float64), reasoning=text)

    # --- checkpoints: the base's, but for one action head per embodiment ------------------------------
    @classmethod
    def check_config(cls, path: Path, config: dict, embodiment: str | None, proprio_dim: int | None) -> None:
        heads = config.get("embodiments", {})
        if embodiment is not None:
            if embodiment not in heads:
                raise CheckpointError(
                    f"{path} has action heads for {list(heads)}, not for {embodiment!r}: train (or "
                    "fine-tune) one for this robot first"
                )
            check_proprio(path, heads[embodiment][1], proprio_dim)


check_checkpoint = DiVLAPolicy.check_checkpoint
save_model = DiVLAPolicy.save_model
