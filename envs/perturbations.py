"""Visual perturbations, registered by name, composable, applicable to any task.

Each perturbation turns a severity level (1-3) and a seeded RNG into plain parameters (written into
every episode record), then applies them: `distractors` edits the scene before it is compiled (extra
objects the instruction does not mention); the others edit the compiled model's appearance after each
reset (textures, lights, camera pose) and never touch physics, so success predicates are unaffected.

robosuite's modders are used where they work with MuJoCo 3.9: `CameraModder` and `LightingModder`.
Its `TextureModder` does not (it reads `MjModel.tex_rgb`, renamed `tex_data` in MuJoCo 3, and uploads
textures by creating a new GL context per call), so texture edits write `tex_data` directly and the
env re-uploads them to its single renderer.

Every episode starts from the unperturbed appearance: the env snapshots the appearance fields of each
compiled model (`AppearanceSnapshot`) and restores them before applying the episode's perturbations.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from divla_eval.registry import Registry

LEVELS = (1, 2, 3)
MAIN_LIGHT = "main_light"
BACKGROUND_GEOMS = ("floor", "wall_leftcorner_visual", "wall_rightcorner_visual", "wall_left_visual",
                    "wall_right_visual", "wall_rear_visual", "wall_front_visual")  # fmt: skip
TABLE_GEOMS = ("table_visual",)


@dataclass(frozen=True)
class Perturbation:
    """Base class: `sample` draws parameters; `apply` changes the compiled scene's appearance."""

    name: str = ""
    description: str = ""

    def sample(self, level: int, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def scene_objects(self, params: dict) -> list:
        """Object specs to add to the scene before it is compiled (only distractors add any)."""
        return []

    def apply(self, env, params: dict) -> bool:
        """Edit the compiled model; return True if textures changed (they must be re-uploaded)."""
        return False


def _rgb(rng: np.random.Generator, saturation: float) -> list[float]:
    """A colour of random hue and brightness; `saturation` (0-1) sets how far from grey it is."""
    hue, value = rng.uniform(0.0, 1.0), rng.uniform(0.5, 1.0)
    return [round(float(v), 3) for v in colorsys.hsv_to_rgb(hue, saturation, value)]


def _texture_of(model, geom_name: str) -> int:
    """Texture id used by a geom's material (RGB role), or -1."""
    import mujoco

    gid = model.geom(geom_name).id
    mat = model.geom_matid[gid]
    if mat < 0:
        return -1
    return int(model.mat_texid[mat, mujoco.mjtTextureRole.mjTEXROLE_RGB])


def _paint(model, tex_id: int, pattern: str, rgb1, rgb2, rng: np.random.Generator) -> None:
    """Overwrite a texture's pixels with a pattern in the given colours (uint8 RGB)."""
    h, w, c = model.tex_height[tex_id], model.tex_width[tex_id], model.tex_nchannel[tex_id]
    adr = model.tex_adr[tex_id]
    c1, c2 = np.array(rgb1) * 255, np.array(rgb2) * 255
    if pattern == "flat":
        img = np.broadcast_to(c1, (h, w, 3))
    elif pattern == "checker":
        cell = max(2, h // 8)
        mask = ((np.arange(h)[:, None] // cell + np.arange(w)[None, :] // cell) % 2).astype(bool)
        img = np.where(mask[..., None], c1, c2)
    elif pattern == "gradient":
        t = np.linspace(0, 1, h)[:, None, None]
        img = np.broadcast_to((1 - t) * c1 + t * c2, (h, w, 3))
    else:  # noise
        mask = rng.random((h, w)) < 0.5
        img = np.where(mask[..., None], c1, c2)
    pixels = np.asarray(img, dtype=np.uint8)
    if c == 4:
        pixels = np.concatenate([pixels, np.full((h, w, 1), 255, np.uint8)], axis=-1)
    model.tex_data[adr : adr + h * w * c] = pixels.reshape(-1)


@dataclass(frozen=True)
class Recolour(Perturbation):
    """New colours and patterns for a set of textured geoms (background or table)."""

    geoms: tuple[str, ...] = ()

    def sample(self, level: int, rng: np.random.Generator) -> dict:
        patterns = {1: ["flat"], 2: ["flat", "gradient", "checker"], 3: ["checker", "noise", "gradient"]}[
            level
        ]
        saturation = {1: 0.3, 2: 0.6, 3: 1.0}[level]
        return {
            "pattern": str(rng.choice(patterns)),
            "rgb1": _rgb(rng, saturation),
            "rgb2": _rgb(rng, saturation),
            "seed": int(rng.integers(0, 2**31)),
        }

    def apply(self, env, params: dict) -> bool:
        model = env.sim.model._model
        rng = np.random.default_rng(params["seed"])
        done: set[int] = set()
        for geom in self.geoms:
            try:
                tex = _texture_of(model, geom)
            except KeyError:
                continue  # this arena has no such geom
            if tex >= 0 and tex not in done:
                _paint(model, tex, params["pattern"], params["rgb1"], params["rgb2"], rng)
                done.add(tex)
            if tex < 0:
                model.geom_rgba[model.geom(geom).id, :3] = params["rgb1"]
        return bool(done)


@dataclass(frozen=True)
class Lighting(Perturbation):
    """Coloured light with changed intensity and direction, through robosuite's LightingModder."""

    def sample(self, level: int, rng: np.random.Generator) -> dict:
        saturation = {1: 0.4, 2: 0.7, 3: 0.95}[level]
        tilt = {1: 0.2, 2: 0.45, 3: 0.8}[level]
        colour = np.array(_rgb(rng, saturation))
        colour = colour / max(colour.max(), 1e-6)
        intensity = float(rng.uniform(*{1: (0.6, 0.9), 2: (0.45, 1.0), 3: (0.3, 1.1)}[level]))
        direction = np.array([rng.uniform(-tilt, tilt), rng.uniform(-tilt, tilt), -1.0])
        return {
            "diffuse": [round(float(v), 3) for v in colour * intensity],
            "ambient": [round(float(v), 3) for v in colour * {1: 0.1, 2: 0.2, 3: 0.3}[level]],
            "dir": [round(float(v), 3) for v in direction / np.linalg.norm(direction)],
        }

    def apply(self, env, params: dict) -> bool:
        from robosuite.utils.mjmod import LightingModder

        modder = LightingModder(env.sim, light_names=[MAIN_LIGHT])
        modder.set_diffuse(MAIN_LIGHT, params["diffuse"])
        modder.set_ambient(MAIN_LIGHT, params["ambient"])
        modder.set_dir(MAIN_LIGHT, params["dir"])
        return False


@dataclass(frozen=True)
class CameraPose(Perturbation):
    """A small change of the front camera's position, orientation and field of view (CameraModder)."""

    def sample(self, level: int, rng: np.random.Generator) -> dict:
        shift = {1: 0.01, 2: 0.025, 3: 0.05}[level]
        angle = np.deg2rad({1: 1.0, 2: 3.0, 3: 6.0}[level])
        axis = rng.normal(size=3)
        return {
            "dpos": [round(float(v), 4) for v in rng.uniform(-shift, shift, 3)],
            "axis": [round(float(v), 4) for v in axis / np.linalg.norm(axis)],
            "angle": round(float(rng.uniform(-angle, angle)), 4),
            "dfovy": round(float(rng.uniform(-1, 1) * {1: 1.0, 2: 3.0, 3: 5.0}[level]), 3),
        }

    def apply(self, env, params: dict) -> bool:
        import mujoco
        from robosuite.utils.mjmod import CameraModder

        from divla_eval.envs.layout import FRONT_CAMERA

        modder = CameraModder(env.sim, camera_names=[FRONT_CAMERA])
        modder.set_pos(FRONT_CAMERA, modder.get_pos(FRONT_CAMERA) + np.array(params["dpos"]))
        delta = np.zeros(4)
        mujoco.mju_axisAngle2Quat(delta, np.array(params["axis"]), params["angle"])
        quat = np.zeros(4)
        mujoco.mju_mulQuat(quat, delta, np.array(modder.get_quat(FRONT_CAMERA)))
        modder.set_quat(FRONT_CAMERA, quat)
        modder.set_fovy(FRONT_CAMERA, modder.get_fovy(FRONT_CAMERA) + params["dfovy"])
        return False


@dataclass(frozen=True)
class Distractors(Perturbation):
    """Extra objects from the seen library that the instruction does not mention."""

    def sample(self, level: int, rng: np.random.Generator) -> dict:
        from divla_eval.envs.objects import objects

        pool = objects("seen")
        count = {1: 1, 2: 3, 3: 5}[level]
        picks = rng.choice(len(pool), size=count, replace=False)
        return {"objects": [pool[i].id for i in sorted(picks)]}

    def scene_objects(self, params: dict) -> list:
        from divla_eval.envs.objects import objects

        by_id = {o.id: o for o in objects("seen")}
        return [by_id[i] for i in params["objects"]]


PERTURBATIONS: Registry = Registry("perturbation")
PERTURBATIONS.register(
    "distractors",
    Distractors("distractors", "extra objects the instruction does not mention (1, 3 or 5)"),
    description="extra objects the instruction does not mention (1, 3 or 5 by level)",
)
PERTURBATIONS.register(
    "background",
    Recolour("background", "floor and wall colours and patterns", geoms=BACKGROUND_GEOMS),
    description="floor and wall colours and patterns (tint, gradient/checker, saturated noise)",
)
PERTURBATIONS.register(
    "lighting",
    Lighting("lighting", "coloured light, intensity and direction"),
    description="coloured light with changed intensity and direction",
)
PERTURBATIONS.register(
    "camera",
    CameraPose("camera", "front camera pose and field of view"),
    description="small front-camera pose and field-of-view change (1-5 cm, 1-6 deg)",
)
PERTURBATIONS.register(
    "table",
    Recolour("table", "table colour and pattern", geoms=TABLE_GEOMS),
    description="table colour and pattern",
)


def for_episode(spec) -> list[tuple[Perturbation, int, dict]]:
    """(perturbation, level, params) of an episode, each drawn from the episode's own seed: a pure
    function of its spec, the same in the env that applies them and in a record of an episode whose
    simulator never built it."""
    return resolve(spec.perturbations, lambda name, level: spec.seed(f"perturb:{name}:{level}"))


def params_of(resolved) -> list[dict]:
    """The record form of resolved perturbations: `{"name", "level", **params}` each."""
    return [{"name": p.name, "level": lvl, **params} for p, lvl, params in resolved]


def resolve(perturbations, seed_for) -> list[tuple[Perturbation, int, dict]]:
    """(perturbation, level, params) for each requested (name, level); params from `seed_for(name, level)`."""
    from divla_eval.errors import DivlaEvalError

    out = []
    for name, level in perturbations:
        pert = PERTURBATIONS.get(name)
        if level not in LEVELS:
            raise DivlaEvalError(f"perturbation level {name}:{level} unknown; valid levels: 1, 2, 3")
        out.append((pert, level, pert.sample(level, np.random.default_rng(seed_for(name, level)))))
    return out


class AppearanceSnapshot:
    """The model fields perturbations may edit, saved once per compiled model and restored per episode."""

    FIELDS = ("tex_data", "geom_rgba", "light_diffuse", "light_ambient", "light_dir", "light_pos",
              "cam_pos", "cam_quat", "cam_fovy")  # fmt: skip

    def __init__(self, model):
        self.model = model
        self._saved = {f: np.array(getattr(model, f)) for f in self.FIELDS}

    def restore(self) -> None:
        for field, value in self._saved.items():
            getattr(self.model, field)[...] = value
