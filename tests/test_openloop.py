"""scripts/openloop.py replays a demo as an episode would show it: calls `execute_steps` apart, the
steps just before each call handed to a history policy's `observe`, errors against the actions the
call's steps recorded."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import load_script

from divla_eval.policy import ActionChunk, PolicyMetadata


@pytest.fixture(scope="module")
def openloop():
    return load_script("openloop")


class Replayer:
    """Finds the step it is shown by its proprioception and answers the recorded actions from there
    (plus `offset`); remembers which steps were observed and which were calls."""

    def __init__(self, demo, execute_steps: int, obs_horizon: int, offset: float = 0.0):
        self.metadata = PolicyMetadata(
            "replayer", cameras=("front",), execute_steps=execute_steps, obs_horizon=obs_horizon
        )
        self.proprio, self.actions, self.offset = demo["obs/proprio"][:], demo["actions"][:], offset
        self.calls: list[int] = []
        self.observed: list[int] = []

    def _step(self, obs) -> int:
        (hits,) = np.nonzero((self.proprio == obs.proprio).all(axis=1))
        return int(hits[0])

    def reset(self, instruction: str, seed: int) -> None:
        self.calls, self.observed = [], []

    def observe(self, obs) -> None:
        self.observed.append(self._step(obs))

    def infer(self, obs) -> ActionChunk:
        t = self._step(obs)
        self.calls.append(t)
        chunk = self.actions[t : t + 16]
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], 16 - len(chunk), axis=0)])  # as trained
        return ActionChunk(chunk + self.offset, reasoning=None)


class ReplayEnv:
    """The demo as an environment: observing shows step t, advancing moves to t + 1; done at the end."""

    def __init__(self, demo):
        self.demo, self.t = demo, 0
        self.steps = len(demo["actions"])

    def observe(self, cameras):
        obs = {c: self.demo[f"obs/{c}_image"][self.t] for c in cameras}
        return {**obs, "proprio": self.demo["obs/proprio"][self.t], "instruction": "x"}

    def advance(self, action) -> bool:
        self.t += 1
        return self.t >= self.steps


def episode_loop(policy, demo) -> None:
    """`divla_eval.episode`'s loop over the demo: calls when due, history after each step."""
    from divla_eval.episode import ChunkExecutor, HistoryFeed

    env, executor, history = ReplayEnv(demo), ChunkExecutor(policy, "panda"), HistoryFeed(policy)
    policy.reset("x", 0)
    done = False
    while not done:
        if executor.due:
            executor.call(env)
        done = env.advance(executor.next_action())
        history.after_step(executor, env, done)


@pytest.mark.parametrize("k, horizon", [(4, 1), (4, 2), (3, 3), (3, 5)])
def test_calls_and_observed_steps_are_those_of_an_episode(openloop, demos, k, horizon):
    with h5py.File(demos, "r") as f:
        demo = f["data/demo_0"]
        policy = Replayer(demo, k, horizon)
        errors, gripper, _ = openloop.replay(policy, demo)
        calls, observed = policy.calls, policy.observed
        episode_loop(policy, demo)
        steps = len(demo["actions"])
    assert calls == policy.calls == list(range(0, steps, k))
    assert observed == policy.observed
    if horizon > 1:
        assert observed and set(observed).isdisjoint(calls)
    assert np.allclose(errors, 0) and all(gripper)


def test_an_offset_shows_as_that_error_on_every_dimension(openloop, demos):
    with h5py.File(demos, "r") as f:
        demo = f["data/demo_0"]
        errors, _, _ = openloop.replay(Replayer(demo, 4, 1, offset=0.25), demo)
    assert np.allclose(np.mean(errors, axis=0), 0.25)


def test_swapped_images_come_from_the_other_demo_at_the_same_step(openloop, demos):
    """The replayer finds its step by proprioception, so it must still see its own demo's; the images
    must be the other demo's (its last frame past its end)."""
    with h5py.File(demos, "r") as f:
        demo, other = f["data/demo_0"], f["data/demo_1"]
        shown = []

        class Looker(Replayer):
            def infer(self, obs):
                shown.append(obs.images["front"])
                return super().infer(obs)

        errors, _, _ = openloop.replay(Looker(demo, 4, 1), demo, images_from=other)
        frames = other["obs/front_image"][:]
        calls = range(0, len(demo["actions"]), 4)
    assert np.allclose(errors, 0)  # everything but the images is the demo's own
    for image, t in zip(shown, calls, strict=True):
        np.testing.assert_array_equal(image, frames[min(t, len(frames) - 1)])
