"""The gymnasium face of a task: `gymnasium.make("divla_eval/BinPicking-v0")`.

The env is handed a Task instance (`divla_eval.tasks.make_env` builds one from a registered name):
dependencies point one way, tasks -> envs, and a run resolves its task once and passes it down.

The runner uses the same class, with two extra entry points that keep rendering on demand:
`advance(action)` steps physics and judges success without drawing anything (a `StepResult`), and
`observe()` draws the cameras only when a policy call (or a video frame) consumes them. `step` is
`advance` + `observe`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from divla_eval.envs.layout import FRONT_CAMERA, TABLE_TOP_Z, WRIST_CAMERA, WRIST_CAMERA_LEFT
from divla_eval.envs.perturbations import AppearanceSnapshot, for_episode, params_of

CAMERAS = {"front": FRONT_CAMERA, "wrist": WRIST_CAMERA, "wrist_left": WRIST_CAMERA_LEFT}
PROPRIO_DIM = 11  # per arm: position 3, rotation 6 (two matrix columns), fingers 2
ARM_ACTION_NAMES = ("dx", "dy", "dz", "dax", "day", "daz", "gripper")  # OSC_POSE delta + gripper
ACTION_DIM = len(ARM_ACTION_NAMES)  # per arm; robot 0 (the right arm) first when there are two
INSTRUCTION_CHARSET = string.ascii_letters + string.digits + " ,.'-:;()!?"


#: Where distractors go unless a task says otherwise: the table's front strip, clear of panels and goals.
DISTRACTOR_REGION = ((0.18, 0.32), (-0.35, 0.35))


class DistractorBuilder:
    """Wraps a task's scene builder to add distractor objects, placed after (and clear of) the task's own."""

    def __init__(self, base, specs: tuple, region):
        self.base, self.specs, self.region = base, specs, region
        self.key = f"{base.key}|distractors:{','.join(s.id for s in specs)}"

    def build(self):
        from robosuite.utils.placement_samplers import SequentialCompositeSampler, UniformRandomSampler

        scene = self.base.build()
        objs = [spec.build(f"distractor{i}") for i, spec in enumerate(self.specs)]
        (x0, x1), (y0, y1) = self.region
        placer = UniformRandomSampler(
            name="distractor_sampler",
            mujoco_objects=objs,
            x_range=(x0, x1),
            y_range=(y0, y1),
            rotation=None,
            ensure_object_boundary_in_range=False,
            ensure_valid_placement=True,
            reference_pos=(0.0, 0.0, TABLE_TOP_Z),
            z_offset=0.002,
        )
        combined = SequentialCompositeSampler(name="scene_sampler")
        if scene.placement is not None:
            combined.append_sampler(scene.placement)
        combined.append_sampler(placer)
        scene.objects = [*scene.objects, *objs]
        scene.placement = combined
        return scene


class SimulationFault(RuntimeError):
    """The simulator went into a state that invalidates the episode (recorded as an error)."""


FAULT_WARNINGS = {
    mujoco.mjtWarning.mjWARN_BADQPOS: "bad qpos (NaN, Inf or huge position)",
    mujoco.mjtWarning.mjWARN_BADQVEL: "bad qvel (NaN, Inf or huge velocity)",
    mujoco.mjtWarning.mjWARN_BADQACC: "bad qacc (NaN, Inf or huge acceleration)",
    mujoco.mjtWarning.mjWARN_BADCTRL: "bad ctrl (NaN, Inf or huge control)",
    mujoco.mjtWarning.mjWARN_CONTACTFULL: "contact buffer full (contacts were dropped)",
    mujoco.mjtWarning.mjWARN_CNSTRFULL: "constraint buffer full (constraints were dropped)",
}
"""MuJoCo warnings after which a step's physics cannot be trusted. For the first four MuJoCo resets the
state to the model's defaults (or zeroes the control) and carries on: an episode that went through it
ends in a state no policy produced, and used to be recorded as an ordinary failure when only qacc was
checked. Each raises `SimulationFault`, so the runner records the episode as `error`. (mjWARN_INERTIA
is a model-compile warning and mjWARN_VGEOMFULL only affects drawing.)"""


def check_simulation(data) -> None:
    """Raise `SimulationFault` naming the first instability MuJoCo has counted in `data` since its last
    reset (robosuite's reset calls mj_resetData, which clears the counters)."""
    for kind, text in FAULT_WARNINGS.items():
        stat = data.warning[kind]
        if stat.number > 0:
            raise SimulationFault(
                f"MuJoCo reported an unstable simulation: {text}, {stat.number} time(s), last at index "
                f"{stat.lastinfo}; the episode is invalid"
            )


@dataclass(frozen=True)
class StepResult:
    """One `advance`: whether the episode ended (success, or the step budget spent) and the task's
    judgement of the state reached."""

    terminated: bool
    """The task succeeded on this step."""
    truncated: bool
    """The step budget is spent without success."""
    success: bool
    partial_score: float

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated


class DivlaEnv(gym.Env):
    """A task as a gymnasium env.

    Observation: a dict with one uint8 HxWx3 image per camera in `cameras`, `proprio` (per arm:
    end-effector position, rotation as two matrix columns, finger positions) and the `instruction`.
    Action: OSC end-effector delta (dx, dy, dz, dax, day, daz) and gripper, each in [-1, 1].
    Reward: 1.0 on the step that succeeds. `info["success"]` and `info["partial_score"]` are the
    task's judgement of the current state.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        task,
        split: str = "unseen",
        difficulty: str | None = None,
        perturbations: tuple[tuple[str, int], ...] = (),
        cameras: tuple[str, ...] = ("front", "wrist"),
        image_size: int = 84,
        max_steps: int | None = None,
        render_mode: str | None = None,
        run_seed: int = 0,
    ):
        """`task`: a Task instance (`divla_eval.tasks.get_task(name, **options)`)."""
        from divla_eval.errors import DivlaEvalError

        self.task = task
        self.difficulty = difficulty if difficulty is not None else self.task.difficulties[0]
        self.task.validate(split, self.difficulty)
        self.perturbations = tuple(perturbations)
        valid_cameras = list(CAMERAS) if len(self.task.robots) > 1 else ["front", "wrist"]
        unknown = [c for c in cameras if c not in valid_cameras]
        if unknown:
            raise DivlaEvalError(f"unknown camera(s) {unknown}; valid: {', '.join(valid_cameras)}")
        self.embodiment = self.task.embodiment
        arms = len(self.task.robots)
        self.split = split
        self.cameras = tuple(cameras)
        self.image_size = int(image_size)
        self._max_steps_override = max_steps
        self.max_steps = max_steps or self.task.max_steps_for(split, self.difficulty)
        self.render_mode = render_mode
        self.run_seed = run_seed
        obs_spaces = {
            c: spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8) for c in self.cameras
        }
        obs_spaces["proprio"] = spaces.Box(-10.0, 10.0, (PROPRIO_DIM * arms,), np.float32)
        obs_spaces["instruction"] = spaces.Text(max_length=256, charset=INSTRUCTION_CHARSET)
        self.observation_space = spaces.Dict(obs_spaces)
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM * arms,), np.float32)
        self.sim = None  # TabletopEnv, made at the first reset (it needs the first scene)
        self.episode = None
        self.steps = 0
        self._renderer = None
        self._renderer_model = None
        self.frames_rendered = 0
        self._snapshot = None
        self._textures_dirty = False
        self.perturbation_params: list[dict] = []

    # --- gymnasium API --------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode.

        `options["episode"]` (an EpisodeSpec) fixes the episode exactly, as the runner does; otherwise
        `options["episode_index"]` (default: drawn from the seeded RNG) names it within `split`.
        """
        super().reset(seed=seed)
        from divla_eval.envs.tabletop import TabletopEnv

        options = options or {}
        spec = options.get("episode")
        if spec is None:
            index = options.get("episode_index")
            if index is None:
                index = int(self.np_random.integers(0, 10_000))
            spec = self.task.spec(self.split, int(index), self.run_seed, self.difficulty, self.perturbations)
        # until the new episode is built, nothing of the last one may be read (an error record of this
        # one must not carry its step count or perturbation parameters)
        self.episode, self.steps, self.perturbation_params = None, 0, []
        self.episode = self.task.episode(spec)
        # the budget follows the episode (a sorting `hard` episode gets more steps than an `easy` one)
        self.max_steps = self._max_steps_override or self.task.max_steps_for(spec.split, spec.difficulty)
        resolved = for_episode(spec)
        self.perturbation_params = params_of(resolved)
        builder = self.episode.builder
        extra = [obj for p, _lvl, params in resolved for obj in p.scene_objects(params)]
        if extra:
            region = getattr(self.episode, "distractor_region", DISTRACTOR_REGION)
            builder = DistractorBuilder(builder, tuple(extra), region)
        if self.sim is None:
            self.sim = TabletopEnv(builder, robots=self.task.robots, horizon=self._horizon())
        self.sim.reset_scene(builder, spec.seed("scene"))
        self._apply_appearance(resolved)
        self.steps = 0
        return self.observe(), self._info()

    def _horizon(self) -> int:
        """robosuite's step limit: above every episode budget this env can be asked to run."""
        if self._max_steps_override:
            return self._max_steps_override + 1
        budgets = [self.task.max_steps_for(s, d) for s in self.task.splits for d in self.task.difficulties]
        return max(budgets) + 1

    def _apply_appearance(self, resolved) -> None:
        """Restore this model's unperturbed appearance, then apply the episode's perturbations."""
        model = self.sim.sim.model._model
        if self._snapshot is None or self._snapshot.model is not model:
            self._snapshot = AppearanceSnapshot(model)
        self._snapshot.restore()
        textures_changed = self._textures_dirty
        self._textures_dirty = False
        for pert, _level, params in resolved:
            self._textures_dirty |= pert.apply(self.sim, params)
        self.sim.sim.forward()  # camera and light poses in MjData derive from the (edited) model
        if (
            self._renderer is not None
            and self._renderer_model is model
            and (textures_changed or self._textures_dirty)
        ):
            self._renderer.upload_textures()

    def step(self, action):
        result = self.advance(action)
        info = {
            "success": result.success,
            "partial_score": result.partial_score,
            "episode": self.episode.spec.key,
        }
        return self.observe(), float(result.terminated), result.terminated, result.truncated, info

    def render(self):
        if self.render_mode == "rgb_array":
            return self.camera_image("front")
        return None

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        if self.sim is not None:
            mjsim = getattr(self.sim, "sim", None)
            # an interrupt that lands inside MjSim.free() (during a hard reset or close) leaves a freed
            # sim that robosuite still holds, and a second free() fails on it: nothing left to close
            if mjsim is None or hasattr(mjsim, "_render_context_offscreen"):
                self.sim.close()
            self.sim = None

    # --- runner API --------------------------------------------------------------------------------------
    def advance(self, action) -> StepResult:
        """Step physics and judge the state; renders nothing."""
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        if not np.all(np.isfinite(action)):
            raise SimulationFault(f"non-finite action {action.tolist()}")
        self.sim.step(action)
        check_simulation(self.sim.sim.data._data)
        self.episode.on_step(self.sim)
        self.steps += 1
        ev = self.episode.evaluate(self.sim)
        success = bool(ev.success)
        return StepResult(
            success, self.steps >= self.max_steps and not success, success, float(ev.partial_score)
        )

    def perturbation_params_of(self, spec) -> list[dict]:
        """The perturbations of episode `spec` with their parameters: this env's when `spec` is its
        current episode, else drawn as `reset` draws them (a pure function of the spec's seeds), so that
        an episode that failed before its scene was built is recorded with them all the same."""
        if self.episode is not None and self.episode.spec == spec:
            return list(self.perturbation_params)
        return params_of(for_episode(spec))

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
