"""Simulation layer: robosuite scenes, the object library, rendering and the gymnasium wrapper.

Importing this package (which `import divla_eval` does) registers one gymnasium id per task
(`divla_eval/BinPicking-v0`, ...), lazily: the entry points are strings, so nothing from robosuite or
MuJoCo is imported until an env is made. Keep this module light for that reason.
"""

import gymnasium as gym

from divla_eval.envs import _quiet_robosuite  # noqa: F401  (before anything imports robosuite)

ENV_IDS = {
    "divla_eval/BinPicking-v0": "bin_picking",
    "divla_eval/Sorting-v0": "sorting",
    "divla_eval/MultiTask-v0": "multitask",
    "divla_eval/NovelInstruction-v0": "novel_instruction",
    "divla_eval/Bussing-v0": "bussing",
}

for _env_id, _task in ENV_IDS.items():
    if _env_id not in gym.registry:
        gym.register(id=_env_id, entry_point="divla_eval.envs.gym_env:DivlaEnv", kwargs={"task": _task})
