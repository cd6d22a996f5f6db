"""Octo's training recipe for the shared loop in `divla_eval.train`.

Trained from scratch on the benchmark's demonstrations, like every baseline here (Octo's released
models are pretrained on Open X-Embodiment, which is not available offline); only the text encoder
comes pretrained, and it stays frozen.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from divla_eval.baselines.octo.config import LABEL, OctoConfig
from divla_eval.config_io import build as build_config
from divla_eval.errors import DivlaEvalError
from divla_eval.train import Recipe, check_options, random_shift

FROM_DATA = ("image_size", "embodiment", "action_dim", "proprio_dim", "text_dim")
"""Config fields read from the demonstrations (and the text encoder); an option could only
contradict them."""


def config_from_options(options: dict) -> OctoConfig:
    check_options(OctoConfig, options, LABEL)
    fixed = sorted(set(options) & set(FROM_DATA))
    if fixed:
        raise DivlaEvalError(f"{LABEL} option(s) {fixed} are read from the demonstrations, not set")
    try:  # a zero divisor or a wrong nesting in the options is a ValueError too
        return build_config(OctoConfig, options)
    except ValueError as exc:
        raise DivlaEvalError(f"invalid {LABEL} options: {exc}") from exc


def dataset_kwargs(options: dict) -> dict:
    cfg = config_from_options(options)
    return {"chunk": cfg.chunk, "obs_horizon": cfg.obs_horizon, "cameras": cfg.cameras}


def build(dataset, options: dict):
    """A fresh model for the dataset's robot and resolution and the text encoder's width, with its
    action and proprioception statistics in the weights."""
    from divla_eval.baselines.octo.model import OctoModel, load_text_encoder
    from divla_eval.tasks import get_task

    cfg = config_from_options(options)
    task = get_task(dataset.env_args["env_kwargs"]["task"])
    actions = np.concatenate(list(dataset.actions.values()))
    proprio = np.concatenate(list(dataset.proprio.values()))
    image = dataset[0]["images"][cfg.cameras[0]]  # [T_o, 3, H, W]
    if image.shape[-1] != image.shape[-2]:
        raise DivlaEvalError(f"{dataset.path}: images are {tuple(image.shape[-2:])}, not square")
    encoder = load_text_encoder(cfg.text_encoder)
    try:
        cfg = dataclasses.replace(
            cfg,
            image_size=int(image.shape[-1]),
            embodiment=task.embodiment,
            action_dim=actions.shape[1],
            proprio_dim=proprio.shape[1],
            text_dim=encoder.dim,
        )
    except ValueError as exc:  # e.g. images too small for the stem and patch size
        raise DivlaEvalError(f"invalid {LABEL} options for {dataset.path}: {exc}") from exc
    model = OctoModel(cfg, text_encoder=encoder)
    model.set_stats(actions.min(0), actions.max(0), proprio.mean(0), proprio.std(0))
    return model


def loss(model, batch, generator) -> dict:
    """Every observation step of every camera is shifted on its own, as for Diffusion Policy."""
    images = {}
    for c, v in batch["images"].items():  # uint8 [B, T_o, 3, H, W]
        shifted = random_shift(v.flatten(0, 1).float().div(255), generator, pad=model.cfg.shift_pad)
        images[c] = shifted.view(v.shape)
    text = model.encode_text(batch["instruction"])
    return model(images, batch["proprio"], text, batch["actions"], generator=generator)


def save(model, path, meta: dict) -> None:
    from divla_eval.baselines.octo.policy import save_model

    save_model(model, path, meta=meta)


def load(path):
    from divla_eval.baselines.octo.policy import OctoPolicy

    return OctoPolicy.from_pretrained(path).model


RECIPE = Recipe(
    build=build, loss=loss, save=save, load=load, dataset_kwargs=dataset_kwargs, config=OctoConfig
)
