"""divla-eval's tasks as vla-eval benchmarks (allenai's vla-evaluation-harness, PyPI `vla-eval`).

vla-eval takes a third-party benchmark by import string, so every vla-eval model server (OpenVLA, pi0,
GR00T, LeRobot policies ...) can be scored on our tasks unchanged:

    benchmarks:
      - benchmark: "divla_eval.integrations.vla_eval:MultiTaskBenchmark"
        episodes_per_task: 20
        params: {split: flip_pot, seed: 0, image_size: 224}

One class per registered task (`BinPickingBenchmark`, `SortingBenchmark`, `MultiTaskBenchmark`,
`NovelInstructionBenchmark`, `BussingBenchmark`; `benchmark_class(name)` for any registered one),
subclasses of `DivlaEvalBenchmark`. Constructor params: split (None: the task's default splits, one
vla-eval task each), difficulty, perturbations ("lighting:3" strings), image_size, cameras, seed (the
run seed), max_steps, task_options.

Episodes are divla-eval's named episodes: vla-eval's `episode_idx` of task `{task}/{split}` is our
episode index, so episode i here has the scene, objects and perturbation parameters of episode i of
`divla-eval run --seed SEED` (the task dict carries the run seed, and `get_result` the episode key and
scene seed). One action per observation: a server that answers a chunk has its first action executed
(vla-eval's chunking servers buffer the rest and answer one action per observation). Metrics: success
and the task's partial score. Rendering is MuJoCo's EGL, which runs on the CPU through Mesa's llvmpipe,
so both of vla-eval's render modes are declared.

vla-eval is an optional extra (`pip install 'divla-eval[vla-eval]'`); nothing else imports this module.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from vla_eval.benchmarks.base import StepBenchmark, StepResult
from vla_eval.specs import GRIPPER_CLOSE_POS, IMAGE_RGB, LANGUAGE, POSITION_DELTA, DimSpec

from divla_eval.tasks import ENV_IDS, TASKS, get_task

ROTATION_DELTA = DimSpec("rotation", 3, "delta_axis_angle", (-1, 1), description="OSC_POSE rotation delta")
STATE = DimSpec("state", 0, "eef_pos3_rot6_fingers2_per_arm", description="divla-eval proprio, 11 per arm")


class DivlaEvalBenchmark(StepBenchmark):
    """A registered divla-eval task as a vla-eval `StepBenchmark`; subclasses set `TASK`."""

    TASK: ClassVar[str] = ""
    render_backends = frozenset({"gpu", "cpu"})

    @classmethod
    def configure_render(cls, mode: str) -> dict[str, str]:
        """EGL either way: our renderer draws through EGL, on a GPU or on Mesa's llvmpipe (CPU)."""
        from vla_eval.render import apply_env

        return apply_env({"MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl"})

    def __init__(
        self,
        split: str | None = None,
        difficulty: str | None = None,
        perturbations: list[str] | tuple[str, ...] = (),
        image_size: int = 84,
        cameras: list[str] | tuple[str, ...] = ("front", "wrist"),
        seed: int = 0,
        max_steps: int | None = None,
        task_options: dict | None = None,
    ) -> None:
        from divla_eval.api import _perturbation

        super().__init__()
        self.task = get_task(self.TASK, **(task_options or {}))
        self.splits = [split] if split is not None else list(self.task.default_splits)
        self.difficulty = difficulty if difficulty is not None else self.task.difficulties[0]
        for s in self.splits:
            self.task.validate(s, self.difficulty)
        self.perturbations = tuple(_perturbation(p) for p in perturbations)
        self.image_size, self.cameras = int(image_size), tuple(cameras)
        self.seed, self.max_steps = int(seed), max_steps
        self._env = None
        self._spec = None

    # --- what vla-eval asks --------------------------------------------------------------------------
    def get_tasks(self) -> list[dict]:
        return [
            {
                "name": f"{self.task.name}/{split}",
                "suite": self.task.name,
                "split": split,
                "difficulty": self.difficulty,
                "perturbations": [f"{n}:{lvl}" for n, lvl in self.perturbations],
                "run_seed": self.seed,
            }
            for split in self.splits
        ]

    def get_metadata(self) -> dict[str, Any]:
        budget = max(self.task.max_steps_for(s, self.difficulty) for s in self.splits)
        return {"max_steps": self.max_steps or budget, "task_version": self.task.version}

    def get_metric_keys(self) -> dict[str, str]:
        return {"success": "mean", "partial_score": "mean"}

    def get_action_spec(self) -> dict[str, DimSpec]:
        if len(self.task.robots) > 1:
            dim = 7 * len(self.task.robots)
            return {"actions": DimSpec("actions", dim, "osc_delta_pose_gripper_per_arm", (-1, 1))}
        return {"position": POSITION_DELTA, "rotation": ROTATION_DELTA, "gripper": GRIPPER_CLOSE_POS}

    def get_observation_spec(self) -> dict[str, DimSpec]:
        return {**{c: IMAGE_RGB for c in self.cameras}, "language": LANGUAGE, "state": STATE}

    # --- the episode ---------------------------------------------------------------------------------
    def reset(self, task: dict) -> Any:
        from divla_eval.envs.gym_env import DivlaEnv

        split = task["split"]
        if self._env is None or self._env.split != split:
            self.cleanup()
            self._env = DivlaEnv(
                self.task,
                split=split,
                difficulty=self.difficulty,
                cameras=self.cameras,
                image_size=self.image_size,
                max_steps=self.max_steps,
                run_seed=self.seed,
            )
        self._spec = self.task.spec(
            split, int(task.get("episode_idx", 0)), self.seed, self.difficulty, self.perturbations
        )
        self._env.reset(options={"episode": self._spec})
        return self._env.observe()

    def step(self, action: dict) -> StepResult:
        dim = self._env.action_space.shape[0]
        actions = np.asarray(action["actions"] if isinstance(action, dict) else action, dtype=np.float64)
        result = self._env.advance(actions.reshape(-1, dim)[0])  # one action per observation
        obs = self._env.observe() if not result.done else None
        info = {"success": result.success, "partial_score": result.partial_score}
        return StepResult(obs=obs, reward=float(result.terminated), done=result.done, info=info)

    def make_obs(self, raw_obs: Any, task: dict) -> dict:
        return {
            "images": {c: raw_obs[c] for c in self.cameras},
            "task_description": raw_obs["instruction"],
            "state": np.asarray(raw_obs["proprio"], dtype=np.float32),
        }

    def get_step_result(self, step_result: StepResult) -> dict:
        info = step_result.info or {}
        env, spec = self._env, self._spec
        return {
            "success": bool(info.get("success", False)),
            "partial_score": float(info.get("partial_score", 0.0)),
            "episode_key": spec.key if spec is not None else "",
            "scene_seed": spec.seed("scene") if spec is not None else None,
            "steps": env.steps if env is not None else 0,
        }

    def cleanup(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


def benchmark_class(name: str) -> type[DivlaEvalBenchmark]:
    """The vla-eval benchmark class of registered task `name` (unknown: the registry's one-line error)."""
    TASKS.check_name(name)
    gym_id = next((k for k, v in ENV_IDS.items() if v == name), name)
    stem = gym_id.split("/")[-1].rsplit("-v", 1)[0] if "/" in gym_id else name.title().replace("_", "")
    cls = type(f"{stem}Benchmark", (DivlaEvalBenchmark,), {"TASK": name, "__module__": __name__})
    cls.__doc__ = f"divla-eval's `{name}` task as a vla-eval benchmark (see the module docstring)."
    return cls


BENCHMARKS: dict[str, type[DivlaEvalBenchmark]] = {}
for _name in TASKS.names():
    _cls = benchmark_class(_name)
    BENCHMARKS[_name] = _cls
    globals()[_cls.__name__] = _cls  # importable as divla_eval.integrations.vla_eval:<Stem>Benchmark
