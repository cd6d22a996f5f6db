"""OpenVLA's training recipe for the shared loop in `divla_eval.train`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from divla_eval.baselines.openvla.config import LABEL, OpenVLAConfig
from divla_eval.config_io import build as build_config
from divla_eval.errors import DivlaEvalError
from divla_eval.train import Recipe, check_options, random_shift

FROM_DATA = ("embodiment", "action_dim")
"""Config fields read from the demonstrations; an option could only contradict them."""


def config_from_options(options: dict) -> OpenVLAConfig:
    check_options(OpenVLAConfig, options, LABEL)
    fixed = sorted(set(options) & set(FROM_DATA))
    if fixed:
        raise DivlaEvalError(f"{LABEL} option(s) {fixed} are read from the demonstrations, not set")
    for name in ("vision_pretrained", "vlm_pretrained"):  # offline: a local checkpoint directory only
        if options.get(name) is not None and not Path(options[name]).is_dir():
            raise DivlaEvalError(f"{name}: {options[name]} is not a directory (a local HF checkpoint)")
    try:  # a zero divisor or a wrong nesting in the options is a ValueError too
        return build_config(OpenVLAConfig, options)
    except ValueError as exc:
        raise DivlaEvalError(f"invalid {LABEL} options: {exc}") from exc


def dataset_kwargs(options: dict) -> dict:
    cfg = config_from_options(options)
    return {"chunk": 1, "obs_horizon": 1, "cameras": cfg.cameras}  # one action, one observation


def build(dataset, options: dict):
    """A fresh model for the dataset's robot: the tokenizer learnt from its prompts, the action bins
    between the 1st and 99th percentiles of its training actions."""
    from divla_eval.baselines.openvla.model import PROMPT, OpenVLAModel
    from divla_eval.data.dataset import stats_of
    from divla_eval.divla.tokenizer import build_tokenizer
    from divla_eval.tasks import get_task

    cfg = config_from_options(options)
    task = get_task(dataset.env_args["env_kwargs"]["task"])
    stats = stats_of(dataset.actions.values(), dataset.path)  # the demos trained on, not the held-out ones
    cfg = dataclasses.replace(cfg, embodiment=task.embodiment, action_dim=len(stats["q01"]))
    if cfg.vlm_pretrained:  # a real backbone brings its own vocabulary
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.vlm_pretrained)
    else:
        prompts = [PROMPT.format(instruction=s) for s in dataset.instructions.values()]
        tokenizer = build_tokenizer(prompts, cfg.vocab_size)
    model = OpenVLAModel(cfg, tokenizer)
    model.bins.set_bounds(stats["q01"], stats["q99"])
    return model


def loss(model, batch, generator) -> dict:
    images = {  # the one observation step, shifted (the augmentation every policy here trains with)
        c: random_shift(v[:, -1].float().div(255), generator) for c, v in batch["images"].items()
    }
    return model(images, batch["instruction"], batch["actions"][:, 0])


def save(model, path, meta: dict) -> None:
    from divla_eval.baselines.openvla.policy import save_model

    save_model(model, path, meta=meta)


def load(path):
    from divla_eval.baselines.openvla.policy import OpenVLAPolicy

    return OpenVLAPolicy.from_pretrained(path).model


RECIPE = Recipe(
    build=build, loss=loss, save=save, load=load, dataset_kwargs=dataset_kwargs, config=OpenVLAConfig
)
