"""One base for the learned policies (DiVLA and the baselines): checkpoint I/O and inference options,
as LeRobot's `PreTrainedPolicy` does.

A subclass says what its checkpoint is made of with class attributes:
    name               the registered policy name (a checkpoint of another policy is refused naming it)
    config_class       its config dataclass (a JsonConfig), written as config.json
    model_class        "module:Class" of the nn.Module built from that config (imported only then)
    meta_file          what it was trained on (task, demos file, steps), for humans: <name>_meta.json
    required_files     what a checkpoint directory must hold
    INFERENCE_OPTIONS  what `divla-eval run --policy-option KEY=VALUE` may set: name -> type, passed to
                       `from_pretrained` and on to the constructor (None keeps the config's value)
and implements the Policy protocol (`reset`, `infer`, `metadata`). Whatever else differs is a hook:
`check_config` (what the config must say for this robot), `build_model` (a model that takes more than
its config), `save_files` (files beside the weights) and `meta_record`.

Its constructor is `cls(model, checkpoint_id=None, device="cpu", **inference_options)` and calls this
one first. Weights are safetensors only: nothing is unpickled. Nothing here imports torch at module
level: the runner validates a checkpoint directory before it loads a model.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import ClassVar

from divla_eval.checkpoint import (
    WEIGHTS,
    CheckpointError,
    check_files,
    check_inference_options,
    check_proprio,
    checkpoint_hash,
    load_weights,
    read_config,
    save_weights,
)
from divla_eval.policy import use_torch_thread_share


class LearnedPolicy:
    """A policy built from a trained checkpoint directory (see the module docstring). Its class is a
    `RequiresCheckpoint`, `ChecksCheckpoint` and `Configurable` factory (`divla_eval.policy`)."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    model_class: ClassVar[str]
    meta_file: ClassVar[str]
    required_files: ClassVar[tuple[str, ...]] = ("config.json", WEIGHTS)
    INFERENCE_OPTIONS: ClassVar[dict[str, type]] = {}
    requires_checkpoint: ClassVar[bool] = True
    reads_proprio: ClassVar[bool] = True
    """Whether the model reads proprioception, so a checkpoint trained on another layout is refused."""
    check_inference_options = staticmethod(check_inference_options)
    """The ranges of the inference options, against a checkpoint's config (dict or object)."""

    def __init__(self, model, device: str = "cpu", **options):
        """Put `model` (its weights loaded) on `device` for inference. `options`: the inference options
        this instance was given (None: the config's value), their ranges checked against its config."""
        self.check_inference_options({k: v for k, v in options.items() if v is not None}, model.cfg)
        use_torch_thread_share()
        self.model = model.to(device).eval()
        self.device = device

    # --- reading a checkpoint ------------------------------------------------------------------------
    @classmethod
    def check_checkpoint(
        cls, path: str | Path, embodiment: str | None = None, proprio_dim: int | None = None
    ) -> dict:
        """Validate a checkpoint directory without loading torch (files, config, robot); returns its
        config dict (what the runner's validation calls)."""
        path = Path(path)
        check_files(path, cls.required_files, cls.config_class.label)
        config = read_config(path, cls.config_class, cls.name)  # every field checked: from_dict cannot fail
        cls.check_config(path, config, embodiment, proprio_dim)
        return config

    @classmethod
    def check_config(cls, path: Path, config: dict, embodiment: str | None, proprio_dim: int | None) -> None:
        """What a well-formed config must say for this robot: by default, the one embodiment it was
        trained for and (`reads_proprio`) the proprioception layout it was trained on."""
        cfg = cls.config_class.from_dict(config)
        if embodiment is not None and embodiment != cfg.embodiment:
            raise CheckpointError(
                f"{path} was trained for {cfg.embodiment!r}, not for {embodiment!r}: train one on this "
                "robot's demonstrations first"
            )
        if cls.reads_proprio:
            check_proprio(path, cfg.proprio_dim, proprio_dim)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", **options):
        """Load a checkpoint directory; the keyword options are `INFERENCE_OPTIONS`. An out-of-range
        option is refused before the weights are read."""
        unknown = sorted(set(options) - set(cls.INFERENCE_OPTIONS))
        if unknown:
            valid = ", ".join(sorted(cls.INFERENCE_OPTIONS)) or "none"
            raise TypeError(f"{cls.__name__}.from_pretrained: unknown options {unknown}; valid: {valid}")
        path = Path(path)
        config = cls.check_checkpoint(path)
        cls.check_inference_options({k: v for k, v in options.items() if v is not None}, config)
        model = cls.build_model(path, cls.config_class.from_dict(config))
        load_weights(model, path)
        return cls(model, checkpoint_id=checkpoint_hash(path), device=device, **options)

    @classmethod
    def build_model(cls, path: Path, cfg):
        """The model a checkpoint's config describes, before its weights are loaded."""
        return import_class(cls.model_class)(cfg)

    # --- writing one -----------------------------------------------------------------------------------
    @classmethod
    def save_model(cls, model, path: str | Path, half: bool = False, meta: dict | None = None) -> None:
        """Write a checkpoint directory (what training calls). The weights file is written under a
        temporary name and renamed, so a crash never leaves a torn model.safetensors (resumable
        training); `half`: fp16 weights (the shipped reference checkpoints)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model.cfg.save(path / "config.json")
        cls.save_files(model, path)
        save_weights(model, path, half=half)
        if meta is not None:
            record = cls.meta_record(model, meta)
            (path / cls.meta_file).write_text(json.dumps(record, indent=2, sort_keys=True))

    def save_pretrained(self, path: str | Path, half: bool = False, meta: dict | None = None) -> Path:
        self.save_model(self.model, path, half=half, meta=meta)
        return Path(path)

    @classmethod
    def save_files(cls, model, path: Path) -> None:
        """Files a checkpoint holds besides config.json and the weights (none by default)."""

    @classmethod
    def meta_record(cls, model, meta: dict) -> dict:
        """What `meta_file` records (the caller's `meta`, by default)."""
        return meta


class VisionLanguagePolicy(LearnedPolicy):
    """A learned policy on a Hugging Face vision-language backbone (DiVLA, OpenVLA): its checkpoint also
    holds the tokenizer (`PreTrainedTokenizerFast.save_pretrained`), and the exact HF configs inside
    config.json rebuild the architecture, so no pretrained backbone is read at load."""

    required_files = ("config.json", WEIGHTS, "tokenizer.json")

    @classmethod
    def build_model(cls, path: Path, cfg):
        # the HF configs inside rebuild the architecture; the weights come from model.safetensors
        cfg.vision_pretrained = cfg.vlm_pretrained = None
        return import_class(cls.model_class)(cfg, load_tokenizer(path))

    @classmethod
    def save_files(cls, model, path: Path) -> None:
        model.tokenizer.save_pretrained(path)


def load_tokenizer(path: Path):
    """A checkpoint's tokenizer; a damaged file is one CheckpointError line."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # tokenizers raises plain Exceptions on a damaged JSON file
        raise CheckpointError(f"{path}: cannot read the tokenizer ({exc})") from exc


def import_class(target: str):
    """The object a "module:attr" string names (a model class, imported only when a model is built)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
