"""Checkpoint-directory pieces shared by every learned policy (DiVLA and the baselines).

A learned policy's checkpoint is a directory with a config.json and a model.safetensors (plus whatever
the policy adds). The helpers here exist so that every policy refuses a bad directory with the same
one-line `CheckpointError` the CLI prints cleanly, hashes its weights the same way for the episode
records, and never unpickles anything: weights are safetensors only.

Nothing here imports torch at module level: the runner validates checkpoints before it loads a model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from divla_eval.errors import DivlaEvalError
from divla_eval.schema import read_json, short

WEIGHTS = "model.safetensors"


class CheckpointError(DivlaEvalError):
    """A checkpoint directory is missing, incomplete, damaged or made for another robot."""


def checkpoint_hash(path: Path) -> str:
    """Content hash of the weights file (recorded in every episode row)."""
    h = hashlib.sha256()
    with open(Path(path) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def check_files(path: Path, required: tuple[str, ...], kind: str) -> None:
    """Refuse a directory that does not exist or lacks one of the `required` files of a `kind`
    checkpoint, naming what is missing and how to make one."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    missing = [f for f in required if not (path / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{path} is not a {kind} checkpoint: missing {', '.join(missing)} "
            f"(a checkpoint holds {', '.join(required)}; make one with `divla-eval train`)"
        )


def read_config(path: Path, config_cls: type | None = None, policy: str | None = None) -> dict:
    """config.json of a checkpoint directory as a dict; whatever is wrong with it is a CheckpointError
    naming the file (unreadable, not UTF-8 JSON, not an object).

    With `policy`, a config of another registered policy is refused naming that policy; with
    `config_cls` (the policy's config dataclass), every key and value is checked as the model will
    read it (`JsonConfig.from_dict`: known keys, types, the config's own consistency checks), so that
    a damaged config is one line here, before anything is built, and never an error inside a model."""
    file = Path(path) / "config.json"
    config = read_json(file, CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{file} is damaged: expected a JSON object (a model config), got {short(config)}"
        )
    if policy is not None:
        check_policy_of(Path(path), config, policy)
    if config_cls is not None:
        try:
            config_cls.from_dict(config)
        except (DivlaEvalError, ValueError) as exc:
            label = getattr(config_cls, "label", config_cls.__name__)
            raise CheckpointError(f"{file} is not a valid {label} config: {exc}") from None
    return config


# A config.json key that only one policy's config has: how a checkpoint given to the wrong --policy is
# recognised, so the error can name the right one instead of a confusing config mismatch.
SIGNATURE_KEYS = {
    "divla": "embodiments",
    "diffusion_policy": "encoder_channels",
    "openvla": "n_bins",
    "octo": "text_encoder",
}
LABELS = {"divla": "DiVLA", "diffusion_policy": "Diffusion Policy", "openvla": "OpenVLA", "octo": "Octo"}


def check_policy_of(path: Path, config: dict, policy: str) -> None:
    """Refuse a checkpoint whose config belongs to another registered policy, naming that policy."""
    for other, key in SIGNATURE_KEYS.items():
        if other != policy and key in config:
            raise CheckpointError(
                f"{path} is a {LABELS[other]} checkpoint: evaluate it with --policy {other}"
            )


def save_weights(model, path: Path, half: bool = False) -> None:
    """Write model.safetensors under a temporary name, then rename it, so that a crash during
    resumable training never leaves a torn weights file."""
    from safetensors.torch import save_file

    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    tmp = path / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "dtype": "float16" if half else "float32"})
    tmp.replace(path / WEIGHTS)


def load_weights(model, path: Path) -> None:
    """Load model.safetensors into `model` as float32 (a half-precision file widens); a damaged file
    or weights that do not fit the model built from config.json are CheckpointErrors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path / WEIGHTS} is damaged: {exc}") from exc
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape than config.json says
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path}: the weights do not match config.json ({first})") from exc
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the weights do not match config.json "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def check_proprio(path: Path, trained: int | None, expected: int | None) -> None:
    """Refuse a checkpoint trained on another proprioception layout than the harness gives now
    (demos of format 1 held a 4-D quaternion per arm where format 2 holds 6 rotation numbers)."""
    if trained is None or expected is None or int(trained) == int(expected):
        return
    raise CheckpointError(
        f"{path} was trained on {trained}-D proprioception but this version observes {expected}-D "
        "(the layout changed in demo format 2): retrain it on demonstrations collected now"
    )


def check_inference_options(options: dict, config) -> None:
    """Refuse an inference option (`divla-eval run --policy-option KEY=VALUE`) outside what the
    checkpoint's config allows. `config` is its config.json as a dict (the runner's cheap look before
    anything is built) or the config object of a loaded model. The names and types were already
    checked against the policy's `INFERENCE_OPTIONS`; only the ranges the learned policies share
    are checked here."""

    def get(key):
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    limits = {
        "inference_steps": (1, get("train_diffusion_steps"), "the checkpoint's train_diffusion_steps"),
        "execute_steps": (1, get("chunk"), "the checkpoint's action chunk"),
        "reasoning_every": (0, None, "0: generate the phrase once per episode"),
        "oracle_reasoning": (0, 1, "1: condition on the scripted expert's phrase instead of generating one"),
    }
    for key, value in options.items():
        if key not in limits:
            continue
        low, high, why = limits[key]
        if value < low or (high is not None and value > high):
            span = f"{low}..{high}" if high is not None else f">= {low}"
            raise DivlaEvalError(f"policy option {key}={value} is out of range: valid {span} ({why})")
