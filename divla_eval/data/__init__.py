"""Demonstrations: recording the scripted expert to robomimic-style HDF5 and loading them for training.

`collect` needs only the simulator stack; `DemoDataset`, `collate` and `action_stats` live in
`divla_eval.data.dataset`, which imports torch, so they are resolved on first access here and
`import divla_eval.data` stays as light as the rest of the harness.
"""

from __future__ import annotations

_LAZY = {
    "CollectConfig": "divla_eval.data.collect",
    "CollectSummary": "divla_eval.data.collect",
    "collect": "divla_eval.data.collect",
    "DemoDataset": "divla_eval.data.dataset",
    "collate": "divla_eval.data.dataset",
    "action_stats": "divla_eval.data.dataset",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
