"""Import-time settings that must precede the first `import robosuite` (imported by envs/__init__.py).

robosuite reads overrides from an optional module `robosuite.macros_private`; we provide it in memory
(instead of writing a file into site-packages) to keep its console logging to errors: its import-time
warnings (no private macro file, optional robosuite_models, mink IK) say nothing about this harness.
Offscreen rendering defaults to EGL, which works on Mesa llvmpipe without a display.
"""

import os
import sys
import types

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

if "robosuite" not in sys.modules:
    _macros = types.ModuleType("robosuite.macros_private")
    _macros.CONSOLE_LOGGING_LEVEL = "ERROR"
    _macros.FILE_LOGGING_LEVEL = None
    sys.modules["robosuite.macros_private"] = _macros
