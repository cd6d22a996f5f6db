"""divla-eval: a simulation benchmark and evaluation harness for vision-language-action robot policies.

`divla_eval.evaluate(policy, task=...)` evaluates a policy object or name from Python and returns an
`EvaluationResult`. Both are loaded on first use, so `import divla_eval` stays light (no torch,
robosuite or MuJoCo) for the command line and for packages that only declare a policy plugin.

Importing it registers the gymnasium ids (`gymnasium.make("divla_eval/BinPicking-v0")`, one per task;
`divla_eval.tasks.ENV_IDS`) with string entry points, so nothing from the simulator is imported until an
env is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from divla_eval import envs as _envs  # noqa: F401  (quiets robosuite's import-time logging)
from divla_eval import tasks as _tasks  # noqa: F401  (registers the gymnasium ids, lazily)

if TYPE_CHECKING:
    from divla_eval.api import EvaluationResult, evaluate

__all__ = ["EvaluationResult", "evaluate"]


def __getattr__(name: str):
    if name in __all__:
        from divla_eval import api

        return getattr(api, name)
    raise AttributeError(f"module 'divla_eval' has no attribute {name!r}")
