"""Simulation layer: robosuite scenes, the object library, rendering and the gymnasium wrapper.

It knows no task by name (tasks -> envs): the gymnasium ids are registered by `divla_eval.tasks`.
Keep this module light: `import divla_eval` imports it.
"""

from divla_eval.envs import _quiet_robosuite  # noqa: F401  (before anything imports robosuite)
