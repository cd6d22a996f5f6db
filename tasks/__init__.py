"""The paper's evaluation tasks, one module each, registered by name, each with its gymnasium id.

Targets are lazy "module:attr" strings, so listing tasks (or importing this package, which
`import divla_eval` does to register the gymnasium ids) imports no simulator.
"""

import dataclasses

import gymnasium as gym

from divla_eval.registry import Registry

TASKS: Registry = Registry("task")
TASKS.register(
    "bin_picking",
    "divla_eval.tasks.bin_picking:BinPicking",
    description="zero-shot bin picking: move objects from the right panel into the left basket",
)
TASKS.register(
    "sorting",
    "divla_eval.tasks.sorting:Sorting",
    description="factory sorting: toy cars, gloves, plush toys and hex wrenches into their 4 zones",
)
TASKS.register(
    "novel_instruction",
    "divla_eval.tasks.novel_instruction:NovelInstruction",
    description="novel multi-step instructions: put two named objects in the basket in the given order",
)
TASKS.register(
    "bussing",
    "divla_eval.tasks.bussing:Bussing",
    description="bimanual table bussing: utensils onto the left tray, trash into the right bin",
)
TASKS.register(
    "multitask",
    "divla_eval.tasks.multitask:MultiTask",
    description="five Franka tasks: select object, flip pot, cube to coloured box, cup on plate, cube in box",
)


#: The gymnasium id of every task: `gymnasium.make("divla_eval/BinPicking-v0", split="unseen")`.
ENV_IDS = {
    "divla_eval/BinPicking-v0": "bin_picking",
    "divla_eval/Sorting-v0": "sorting",
    "divla_eval/MultiTask-v0": "multitask",
    "divla_eval/NovelInstruction-v0": "novel_instruction",
    "divla_eval/Bussing-v0": "bussing",
}

for _env_id, _task in ENV_IDS.items():
    if _env_id not in gym.registry:
        gym.register(id=_env_id, entry_point="divla_eval.tasks:make_env", kwargs={"task": _task})


#: Task fields that describe the task itself rather than a user-settable option.
_FIXED_FIELDS = {"name", "version", "splits", "difficulties", "options", "robots", "embodiment"}


def task_options(name: str) -> dict:
    """The options a task accepts (`--task-option KEY=VALUE`), with their defaults."""
    cls = TASKS.get(name)
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in _FIXED_FIELDS}


def task_option_types(name: str) -> dict:
    """The options a task accepts, with their declared types (the dataclass's annotations)."""
    from divla_eval.schema import field_types

    types = field_types(TASKS.get(name))
    return {key: types[key] for key in task_options(name)}


def parse_task_options(name: str, options: dict) -> dict:
    """Check option names against the task's and convert text values to the declared type (one typed
    parser for every kind of option: `divla_eval.options`); ranges are the task's `check_options`."""
    from divla_eval.options import parse_options

    return parse_options(options, task_option_types(name), kind="task", owner=name)


def get_task(name: str, **options):
    """Instantiate a registered task; unknown names or options raise an error listing the valid ones."""
    task = TASKS.get(name)(**parse_task_options(name, options))
    task.check_options()
    return task


def make_env(task: str = "bin_picking", task_options: dict | None = None, **env_kwargs):
    """A `DivlaEnv` of a registered task by name (the gymnasium entry point, and robomimic's rebuild
    from a demo file's `env_kwargs`); `env_kwargs` are DivlaEnv's (split, difficulty, cameras, ...)."""
    from divla_eval.envs.gym_env import DivlaEnv

    return DivlaEnv(get_task(task, **(task_options or {})), **env_kwargs)
