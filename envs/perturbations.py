"""Registry of visual perturbations (distractors, background, lighting, ...).

The perturbations themselves arrive with the task-suite issue; the registry exists now so that the CLI,
records and reports already carry a perturbation field for every episode.
"""

from divla_eval.registry import Registry

PERTURBATIONS: Registry = Registry("perturbation")
