"""scripts/openloop.py replays a demo as an episode would show it: calls `execute_steps` apart, the
steps just before each call handed to a history policy's `observe`, errors against the actions the
call's steps recorded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest

from divla_eval.policy import ActionChunk, PolicyMetadata

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "openloop.py"


@pytest.fixture(scope="module")
def openloop():
    spec = importlib.util.spec_from_file_location("openloop_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
        return ActionChunk(self.actions[t : t + 16] + self.offset, reasoning=None)


@pytest.mark.parametrize("k, horizon", [(4, 1), (4, 2), (3, 3)])
def test_calls_and_observed_steps_follow_the_episode_loop(openloop, demos, k, horizon):
    with h5py.File(demos, "r") as f:
        demo = f["data/demo_0"]
        policy = Replayer(demo, k, horizon)
        errors, gripper, _ = openloop.replay(policy, demo)
        steps = len(demo["actions"])
    assert policy.calls == list(range(0, steps, k))
    # before each call the horizon - 1 steps just before it (within the previous chunk), as HistoryFeed does
    expected = [s for t in policy.calls[1:] for s in range(t - horizon + 1, t)] if horizon > 1 else []
    assert policy.observed == expected
    assert np.allclose(errors, 0) and all(gripper)


def test_an_offset_shows_as_that_error_on_every_dimension(openloop, demos):
    with h5py.File(demos, "r") as f:
        demo = f["data/demo_0"]
        errors, _, _ = openloop.replay(Replayer(demo, 4, 1, offset=0.25), demo)
    assert np.allclose(np.mean(errors, axis=0), 0.25)
