"""MuJoCo picks its GL backend at import: default to EGL before any test module imports mujoco."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
