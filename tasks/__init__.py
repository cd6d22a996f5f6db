"""The paper's evaluation tasks, one module each, registered by name.

Targets are lazy "module:attr" strings, so listing tasks imports no simulator.
"""

from divla_eval.registry import Registry

TASKS: Registry = Registry("task")
TASKS.register(
    "bin_picking",
    "divla_eval.tasks.bin_picking:BinPicking",
    description="zero-shot bin picking: move objects from the right panel into the left basket",
)


def get_task(name: str, **options):
    """Instantiate a registered task; unknown names raise an error listing the valid ones."""
    return TASKS.get(name)(**options)
