"""Which torch device a command runs on: `--device auto|cpu|cuda|cuda:N|mps` (train, run, bench).

One resolver for every command, so "auto" means the same thing everywhere (CUDA when present, else
Apple's MPS when present, else the CPU) and a device that is not there is one line naming what is,
before any model is built or any file written. The device is an execution detail, like the thread
count: it is recorded (run manifests, training metadata) but is no part of a resume key.

torch is imported only when a spec asks for more than the CPU, so `run --policy scripted` works
without it.
"""

from __future__ import annotations

from divla_eval.errors import DivlaEvalError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
"""What `--device` accepts (cuda:N: the N-th CUDA GPU)."""

DEVICE_ENV = "DIVLA_EVAL_DEVICE"
"""Set by the runner to the resolved device, for its worker processes (as the torch thread share)."""


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _mps_available(torch) -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The `--device` values that work on this machine (auto and cpu always)."""
    torch = _torch()
    found = ["auto", "cpu"]
    if torch is not None and torch.cuda.is_available():
        found += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch is not None and _mps_available(torch):
        found.append("mps")
    return found


def _unavailable(spec: str, why: str) -> DivlaEvalError:
    return DivlaEvalError(f"--device {spec}: {why}; valid here: {', '.join(available_devices())}")


def resolve_device(spec: str) -> str:
    """A `--device` value -> the torch device string to use ("cpu", "cuda", "cuda:1", "mps").

    Raises DivlaEvalError (one line: what is wrong and the valid choices) for an unknown spelling or a
    device this machine does not have."""
    text = str(spec).strip().lower()
    if text == "cpu":
        return "cpu"
    if text == "auto":
        torch = _torch()
        if torch is not None and torch.cuda.is_available():
            return "cuda"
        if torch is not None and _mps_available(torch):
            return "mps"
        return "cpu"
    kind, sep, index = text.partition(":")
    if kind not in ("cuda", "mps") or (sep and (kind != "cuda" or not index.isdigit())):
        raise DivlaEvalError(f"unknown --device {spec!r}; valid: {', '.join(DEVICE_CHOICES)}")
    torch = _torch()
    if torch is None:
        raise _unavailable(text, "torch is not installed")
    if kind == "mps":
        if not _mps_available(torch):
            raise _unavailable(text, "MPS (Apple GPU) is not available on this machine")
        return "mps"
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise _unavailable(text, f"no CUDA GPU is visible to torch {torch.__version__} ({build})")
    count = torch.cuda.device_count()
    if sep and int(index) >= count:
        raise _unavailable(text, f"this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return f"cuda:{int(index)}" if sep else "cuda"


def describe_device(device: str) -> str:
    """For manifests and tables: the device string plus the GPU's name, e.g. "cuda (NVIDIA H100)"."""
    if not device.startswith("cuda"):
        return device
    torch = _torch()
    try:
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    except Exception:  # the name is a nicety; never fail a run over it
        return device


def mixed_precision(device: str) -> str:
    """accelerate's `mixed_precision` for a device: bf16 autocast on CUDA (half the activation memory
    and tensor-core speed, without fp16's loss scaling); "no" elsewhere, so CPU numbers stay exactly
    what they were in float32. A GPU without bf16 (before Ampere) trains in float32: fp16 would need
    a loss scaler that the shared loop does not have."""
    if not device.startswith("cuda"):
        return "no"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "no"
