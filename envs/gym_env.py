"""The gymnasium face of a task: `gymnasium.make("divla_eval/BinPicking-v0")`.

The runner uses the same class, with two extra entry points that keep rendering on demand:
`advance(action)` steps physics and judges success without drawing anything, and `observe()` draws
the cameras only when a policy call (or a video frame) consumes them. `step` is `advance` + `observe`.
"""

from __future__ import annotations

import string

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from divla_eval.envs.layout import FRONT_CAMERA, WRIST_CAMERA

CAMERAS = {"front": FRONT_CAMERA, "wrist": WRIST_CAMERA}
PROPRIO_DIM = 9
ACTION_DIM = 7
INSTRUCTION_CHARSET = string.ascii_letters + string.digits + " ,.'-:;()!?"


class SimulationFault(RuntimeError):
    """The simulator went into a state that invalidates the episode (recorded as an error)."""


class DivlaEnv(gym.Env):
    """A registered task as a gymnasium env.

    Observation: a dict with one uint8 HxWx3 image per camera in `cameras`, `proprio` (end-effector
    position, quaternion and finger positions) and the `instruction`. Action: OSC end-effector delta
    (dx, dy, dz, dax, day, daz) and gripper, each in [-1, 1]. Reward: 1.0 on the step that succeeds.
    `info["success"]` and `info["partial_score"]` are the task's judgement of the current state.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        task: str = "bin_picking",
        split: str = "unseen",
        difficulty: str | None = None,
        perturbations: tuple[tuple[str, int], ...] = (),
        cameras: tuple[str, ...] = ("front", "wrist"),
        image_size: int = 84,
        max_steps: int | None = None,
        render_mode: str | None = None,
        task_options: dict | None = None,
        run_seed: int = 0,
    ):
        from divla_eval.errors import DivlaEvalError
        from divla_eval.tasks import get_task

        self.task = get_task(task, **(task_options or {}))
        self.difficulty = difficulty if difficulty is not None else self.task.difficulties[0]
        self.task.validate(split, self.difficulty)
        self.perturbations = tuple(perturbations)
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise DivlaEvalError(f"unknown camera(s) {unknown}; valid: {', '.join(CAMERAS)}")
        self.split = split
        self.cameras = tuple(cameras)
        self.image_size = int(image_size)
        self.max_steps = max_steps or self.task.max_steps
        self.render_mode = render_mode
        self.run_seed = run_seed
        obs_spaces = {
            c: spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8) for c in self.cameras
        }
        obs_spaces["proprio"] = spaces.Box(-10.0, 10.0, (PROPRIO_DIM,), np.float32)  # metres, unit quat
        obs_spaces["instruction"] = spaces.Text(max_length=256, charset=INSTRUCTION_CHARSET)
        self.observation_space = spaces.Dict(obs_spaces)
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self.sim = None  # TabletopEnv, made at the first reset (it needs the first scene)
        self.episode = None
        self.steps = 0
        self._renderer = None
        self._renderer_model = None
        self.frames_rendered = 0

    # --- gymnasium API --------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode.

        `options["episode"]` (an EpisodeSpec) fixes the episode exactly, as the runner does; otherwise
        `options["episode_index"]` (default: drawn from the seeded RNG) names it within `split`.
        """
        super().reset(seed=seed)
        from divla_eval.envs.tabletop import TabletopEnv
        from divla_eval.tasks.base import EpisodeSpec

        options = options or {}
        spec = options.get("episode")
        if spec is None:
            index = options.get("episode_index")
            if index is None:
                index = int(self.np_random.integers(0, 10_000))
            spec = EpisodeSpec(
                self.task.name, self.split, int(index), self.run_seed, self.difficulty, self.perturbations
            )
        self.episode = self.task.episode(spec)
        if self.sim is None:
            self.sim = TabletopEnv(self.episode.builder, horizon=self.max_steps + 1)
        self.sim.reset_scene(self.episode.builder, spec.seed("scene"))
        self.steps = 0
        return self.observe(), self._info()

    def step(self, action):
        terminated, truncated, info = self.advance(action)
        return self.observe(), float(terminated), terminated, truncated, info

    def render(self):
        if self.render_mode == "rgb_array":
            return self.camera_image("front")
        return None

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        if self.sim is not None:
            self.sim.close()
            self.sim = None

    # --- runner API --------------------------------------------------------------------------------------
    def advance(self, action) -> tuple[bool, bool, dict]:
        """Step physics and judge the state; renders nothing."""
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        if not np.all(np.isfinite(action)):
            raise SimulationFault(f"non-finite action {action.tolist()}")
        self.sim.step(action)
        warnings = self.sim.sim.data._data.warning
        if warnings[mujoco.mjtWarning.mjWARN_BADQACC].number > 0:
            # MuJoCo resets an exploding state silently; an episode that went through that is not valid.
            raise SimulationFault("MuJoCo reported an unstable simulation (bad qacc); the state was reset")
        self.episode.on_step(self.sim)
        self.steps += 1
        info = self._info()
        return info["success"], self.steps >= self.max_steps and not info["success"], info

    def observe(self, cameras: tuple[str, ...] | None = None) -> dict:
        cams = self.cameras if cameras is None else cameras
        obs = {c: self.camera_image(c) for c in cams}
        obs["proprio"] = self.sim.proprio()
        obs["instruction"] = self.episode.instruction
        return obs

    def camera_image(self, camera: str) -> np.ndarray:
        from divla_eval.envs.rendering import CameraRenderer

        model = self.sim.sim.model._model
        if self._renderer is None or self._renderer_model is not model:
            if self._renderer is not None:
                self._renderer.close()  # one renderer per process: close before making the next
            self._renderer = CameraRenderer(model, self.image_size, self.image_size)
            self._renderer_model = model
        self.frames_rendered += 1
        return self._renderer.render(self.sim.sim.data._data, CAMERAS[camera])

    def get_state(self) -> np.ndarray:
        """Flattened MuJoCo state (time, qpos, qvel) of the current episode's scene."""
        return np.array(self.sim.sim.get_state().flatten())

    def set_state(self, state: np.ndarray) -> None:
        """Restore a state taken by `get_state` in the same episode (same scene model)."""
        self.sim.sim.set_state_from_flattened(np.asarray(state))
        self.sim.sim.forward()

    def _info(self) -> dict:
        ev = self.episode.evaluate(self.sim)
        return {
            "success": bool(ev.success),
            "partial_score": float(ev.partial_score),
            "episode": self.episode.spec.key,
        }
