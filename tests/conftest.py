"""MuJoCo picks its GL backend at import: default to EGL before any test module imports mujoco."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import pytest


@pytest.fixture(scope="session")
def demos(tmp_path_factory):
    """Two bin-picking expert demos at 28 px, collected once for every training test."""
    from divla_eval.data.collect import CollectConfig, collect

    path = tmp_path_factory.mktemp("demos") / "bp.hdf5"
    cfg = CollectConfig(task="bin_picking", split="seen", episodes=2, seed=1000, image_size=28)
    collect(cfg, path, progress=False)
    return path
