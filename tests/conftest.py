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


def load_script(name: str):
    """A file of scripts/ (not a package) imported as a module: `load_script("openloop")`."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A Diffusion Policy config small enough to train and act in milliseconds (image_size: the test's own);
# tests import it (`from conftest import TINY_DIFFUSION_POLICY`) rather than keeping copies.
TINY_DIFFUSION_POLICY = {
    "encoder_channels": [8, 16],
    "num_keypoints": 4,
    "feature_dim": 8,
    "chunk": 8,
    "execute_steps": 4,
    "unet_down_dims": [16, 32],
    "step_embed_dim": 8,
    "train_diffusion_steps": 20,
    "inference_steps": 3,
}


# A DiVLA config as small (28 px images, 32-wide backbones); a model built from it acts in milliseconds.
TINY_DIVLA = dict(
    view_tokens=(4, 1),
    image_size=28,
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    text_hidden=32,
    text_layers=2,
    text_heads=2,
    text_kv_heads=1,
    text_intermediate=64,
    vocab_size=300,
    max_reasoning_tokens=4,
    num_action_tokens=2,
    projector_dim=16,
    chunk=8,
    execute_steps=4,
    action_latent=16,
    proprio_latent=8,
    unet_down_dims=(16, 32),
    step_embed_dim=16,
    train_diffusion_steps=20,
    inference_steps=3,
)


# An Octo config as small (28 px images: 2 x 2 patches per camera); with the real MiniLM text encoder.
TINY_OCTO = {
    "stem_channels": [8, 16],
    "patch_size": 3,  # 28 px -> 14 -> 7 -> 2 x 2 patches per camera
    "width": 32,
    "layers": 2,
    "heads": 2,
    "mlp_dim": 64,
    "max_text_tokens": 12,
    "head_hidden": 32,
    "head_blocks": 1,
    "step_embed_dim": 8,
    "train_diffusion_steps": 20,
    "inference_steps": 3,
}
