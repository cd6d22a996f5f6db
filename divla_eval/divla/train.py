"""DiVLA's training recipe for the shared loop in `divla_eval.train`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from divla_eval.config_io import build as build_config
from divla_eval.divla.config import DiVLAConfig
from divla_eval.errors import DivlaEvalError
from divla_eval.train import Recipe, check_options, random_shift


def config_from_options(options: dict) -> DiVLAConfig:
    check_options(DiVLAConfig, options, "DiVLA")
    for name in ("vision_pretrained", "vlm_pretrained"):  # offline: a local checkpoint directory only
        if options.get(name) is not None and not Path(options[name]).is_dir():
            raise DivlaEvalError(f"{name}: {options[name]} is not a directory (a local HF checkpoint)")
    try:  # a zero divisor or a wrong nesting in the options is a ValueError too
        return build_config(DiVLAConfig, options)
    except ValueError as exc:
        raise DivlaEvalError(f"invalid DiVLA options: {exc}") from exc


def dataset_kwargs(options: dict) -> dict:
    cfg = config_from_options(options)
    return {"chunk": cfg.chunk, "obs_horizon": 1, "cameras": cfg.cameras}


def build(dataset, options: dict):
    """A fresh model for the dataset's robot: the tokenizer learnt from its texts, its action and
    proprioception statistics in the embodiment head."""
    from divla_eval.divla.model import DiVLAModel
    from divla_eval.divla.tokenizer import build_tokenizer
    from divla_eval.tasks import get_task

    cfg = config_from_options(options)
    task = get_task(dataset.env_args["env_kwargs"]["task"])
    actions = np.concatenate(list(dataset.actions.values()))
    proprio = np.concatenate(list(dataset.proprio.values()))
    cfg.embodiments = {task.embodiment: (actions.shape[1], proprio.shape[1])}
    if cfg.vlm_pretrained:  # a real backbone brings its own vocabulary
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.vlm_pretrained)
    else:
        texts = list(dataset.instructions.values()) + [t for r in dataset.reasoning.values() for t in r]
        tokenizer = build_tokenizer(texts, cfg.vocab_size)
    model = DiVLAModel(cfg, tokenizer)
    model.heads[task.embodiment].set_stats(actions.min(0), actions.max(0), proprio.mean(0), proprio.std(0))
    return model


def loss(model, batch, generator) -> dict:
    images = {  # the last observation step, shifted
        c: random_shift(v[:, -1].float().div(255), generator) for c, v in batch["images"].items()
    }
    return model(
        images,
        batch["proprio"][:, -1],
        batch["instruction"],
        batch["reasoning"],
        batch["actions"],
        embodiment=next(iter(model.cfg.embodiments)),
        generator=generator,
    )


def save(model, path, meta: dict) -> None:
    from divla_eval.divla.policy import save_model

    save_model(model, path, meta=meta)


def load(path):
    from divla_eval.divla.policy import DiVLAPolicy

    return DiVLAPolicy.from_pretrained(path).model


RECIPE = Recipe(
    build=build, loss=loss, save=save, load=load, dataset_kwargs=dataset_kwargs, config=DiVLAConfig
)
