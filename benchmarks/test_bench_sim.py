"""Simulation costs that dominate evaluation time on a CPU: env step and camera frame.

Run with `nox -s bench` (or `pytest benchmarks`); results go to results/bench_sim.json. The camera
benchmarks compare our light renderer with robosuite's default scene settings on the same scene.
"""

import mujoco
import numpy as np
import pytest

from divla_eval.envs.gym_env import CAMERAS
from divla_eval.tasks import make_env
from divla_eval.tasks.base import EpisodeSpec


@pytest.fixture(scope="module")
def env():
    e = make_env(cameras=(), image_size=84)
    e.reset(options={"episode": EpisodeSpec("bin_picking", "unseen", 0)})
    yield e
    e.close()


def test_env_step_no_render(timed, env):
    action = np.array([0.1, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
    timed(env.advance, action)
    assert env.frames_rendered == 0


@pytest.mark.parametrize("camera", ["front", "wrist"])
@pytest.mark.parametrize("size", [84, 128])
def test_camera_frame(timed, env, camera, size):
    env.image_size = size
    env._renderer = None  # new size -> new renderer
    env.camera_image(camera)  # warm-up: context creation and texture upload
    img = timed(env.camera_image, camera)
    assert img.shape == (size, size, 3) and img.std() > 5


@pytest.mark.parametrize("camera", ["front", "wrist"])
def test_camera_frame_robosuite_defaults(timed, camera):
    """Reference: full robot meshes, shadows, reflections and 4x multisampling, as robosuite draws them."""
    from divla_eval.envs.tabletop import TabletopEnv

    e = make_env(cameras=())
    ep = e.task.episode(EpisodeSpec("bin_picking", "unseen", 0))
    sim = TabletopEnv(ep.builder)
    sim._initialize_sim = super(TabletopEnv, sim)._initialize_sim  # skip mesh decimation
    sim.reset_scene(ep.builder, 0)
    sim.hard_reset = True
    sim.reset()
    model, data = sim.sim.model._model, sim.sim.data._data
    renderer = mujoco.Renderer(model, 84, 84)
    option = mujoco.MjvOption()
    option.geomgroup[0] = 0

    def frame():
        renderer.update_scene(data, camera=CAMERAS[camera], scene_option=option)
        return renderer.render()

    frame()
    timed(frame)
    renderer.close()
    sim.close()
    e.close()
