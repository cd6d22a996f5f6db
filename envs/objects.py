"""The object library: a deterministic set of graspable objects with a seen and an unseen split.

The paper's zero-shot bin picking uses 102 objects never seen in training, varied in size, colour,
pattern and texture. Here the library mixes robosuite's scanned mesh objects (can, milk carton, bread,
cereal box, lemon, bottle; rescaled) and procedural ones built from MuJoCo primitives (blocks,
cylinders, balls, capsules) or composites (toy cars, mugs, dumbbells, L-blocks), with colours and
robosuite's material textures.

The *unseen* split is novel by construction, not just by instance: it holds every object of four
categories that never appear in training (toy car, mug, dumbbell, L-block, plus the lemon and bottle
meshes) and objects of shared categories in colours that no seen object has. It has exactly
`UNSEEN_COUNT` objects; seen and unseen share no id.

Everything is generated from a fixed seed, so ids, attributes and content hashes never change unless
`LIBRARY_VERSION` is bumped. Deformable bodies are not modelled (MuJoCo flex objects cost far more
than this CPU affords per step); every object is rigid and says so in its `deformable` field.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

LIBRARY_VERSION = "1"
UNSEEN_COUNT = 102
SPLITS = ("seen", "unseen")

#: Colour names used in language, with their RGBA. The last four are reserved for the unseen split.
COLOURS: dict[str, tuple[float, float, float, float]] = {
    "red": (0.85, 0.12, 0.10, 1.0),
    "green": (0.15, 0.65, 0.20, 1.0),
    "blue": (0.12, 0.30, 0.85, 1.0),
    "yellow": (0.95, 0.85, 0.15, 1.0),
    "white": (0.92, 0.92, 0.90, 1.0),
    "black": (0.08, 0.08, 0.08, 1.0),
    "grey": (0.50, 0.50, 0.52, 1.0),
    "brown": (0.45, 0.28, 0.12, 1.0),
    "purple": (0.50, 0.18, 0.65, 1.0),
    "orange": (0.98, 0.50, 0.05, 1.0),
    "pink": (0.98, 0.55, 0.70, 1.0),
    "teal": (0.05, 0.55, 0.55, 1.0),
}
UNSEEN_ONLY_COLOURS = ("purple", "orange", "pink", "teal")
SEEN_COLOURS = tuple(c for c in COLOURS if c not in UNSEEN_ONLY_COLOURS)

#: robosuite texture names (robosuite.utils.mjcf_utils.TEXTURES) -> the word used in language.
TEXTURES = {
    "WoodLight": "wooden",
    "WoodDark": "dark wooden",
    "Metal": "metal",
    "Brass": "brass",
    "Ceramic": "ceramic",
    "Clay": "clay",
    "FeltGray": "felt",
    "SteelScratched": "steel",
}

#: Mesh objects from robosuite: class name, language name, (min, max) scale keeping them graspable.
MESHES = {
    "can": ("CanObject", "soda can", (0.85, 1.1)),
    "milk": ("MilkObject", "milk carton", (0.75, 0.95)),
    "bread": ("BreadObject", "loaf of bread", (0.75, 0.95)),
    "cereal": ("CerealObject", "cereal box", (0.6, 0.7)),
    "lemon": ("LemonObject", "lemon", (0.7, 0.8)),
    "bottle": ("BottleObject", "bottle", (0.75, 0.95)),
}

#: (category, count) per split. Categories listed for one split only are the held-out ones.
PLAN: dict[str, list[tuple[str, int]]] = {
    "seen": [
        ("block", 12),
        ("cylinder", 12),
        ("ball", 8),
        ("capsule", 8),
        ("can", 3),
        ("milk", 3),
        ("bread", 3),
        ("cereal", 3),
    ],
    "unseen": [
        ("toy_car", 14),
        ("mug", 14),
        ("dumbbell", 10),
        ("l_block", 12),
        ("lemon", 4),
        ("bottle", 4),
        ("block", 10),
        ("cylinder", 10),
        ("ball", 8),
        ("capsule", 8),
        ("can", 4),
        ("bread", 4),
    ],
}


@dataclass(frozen=True)
class ObjectSpec:
    """One library object: everything needed to build it and to talk about it."""

    id: str
    split: str
    category: str
    name: str
    """Human name used in instructions, e.g. "small red mug"."""
    kind: str
    """"mesh" (robosuite scanned object) or "procedural" (built from primitives)."""
    colour: str | None
    texture: str | None
    size: str
    """"small" / "medium" / "large" relative to the category."""
    dims: tuple[float, ...]
    """Shape parameters in metres (meaning depends on the category), or (scale,) for meshes."""
    density: float
    deformable: bool = False

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def build(self, sim_name: str):
        """Return a fresh robosuite MujocoObject named `sim_name`, with one free joint."""
        from divla_eval.envs._builders import build_object

        return build_object(self, sim_name)


def _size_word(value: float, lo: float, hi: float) -> str:
    t = (value - lo) / (hi - lo) if hi > lo else 0.5
    return "small" if t < 1 / 3 else ("large" if t > 2 / 3 else "medium")


def _make(rng: np.random.Generator, split: str, category: str, index: int) -> ObjectSpec:
    colours = SEEN_COLOURS if split == "seen" else tuple(COLOURS)
    if split == "unseen" and category in ("block", "cylinder", "ball", "capsule"):
        colours = UNSEEN_ONLY_COLOURS  # shared categories: novel colours only
    colour = str(rng.choice(colours))
    texture = None
    if category in MESHES:
        _cls, word, (lo, hi) = MESHES[category]
        scale = float(rng.uniform(lo, hi))
        size = _size_word(scale, lo, hi)
        return ObjectSpec(
            id=f"{split}-{category}-{index:02d}",
            split=split,
            category=category,
            name=f"{size} {word}",
            kind="mesh",
            colour=None,
            texture=None,
            size=size,
            dims=(round(scale, 4),),
            density=float(rng.uniform(150, 400)),
        )
    if rng.random() < 0.3 and category in ("block", "cylinder", "l_block", "mug"):
        texture = str(rng.choice(list(TEXTURES)))
    u = lambda lo, hi: round(float(rng.uniform(lo, hi)), 4)  # noqa: E731
    if category == "block":  # half extents x, y, z
        dims = (u(0.015, 0.028), u(0.015, 0.04), u(0.015, 0.03))
        size_metric, lo, hi = float(np.prod(dims)), 0.015**3, 0.028 * 0.04 * 0.03
    elif category == "cylinder":  # radius, half height
        dims = (u(0.015, 0.026), u(0.02, 0.05))
        size_metric, lo, hi = dims[0] ** 2 * dims[1], 0.015**2 * 0.02, 0.026**2 * 0.05
    elif category == "ball":  # radius
        dims = (u(0.02, 0.03),)
        size_metric, lo, hi = dims[0], 0.02, 0.03
    elif category == "capsule":  # radius, half length of the cylinder part
        dims = (u(0.015, 0.024), u(0.01, 0.025))
        size_metric, lo, hi = dims[0] * dims[1], 0.015 * 0.01, 0.024 * 0.025
    elif category == "toy_car":  # body half length, half width, half height; wheel radius
        dims = (u(0.035, 0.055), u(0.018, 0.026), u(0.012, 0.02), u(0.01, 0.014))
        size_metric, lo, hi = dims[0], 0.035, 0.055
    elif category == "mug":  # body radius, half height; handle half size
        dims = (u(0.02, 0.027), u(0.025, 0.045), u(0.008, 0.012))
        size_metric, lo, hi = dims[0] * dims[1], 0.02 * 0.025, 0.027 * 0.045
    elif category == "dumbbell":  # bar radius, bar half length, bell radius
        dims = (u(0.008, 0.012), u(0.04, 0.06), u(0.02, 0.028))
        size_metric, lo, hi = dims[1] * dims[2], 0.04 * 0.02, 0.06 * 0.028
    elif category == "l_block":  # arm half length, arm half width, half height
        dims = (u(0.03, 0.045), u(0.012, 0.018), u(0.015, 0.025))
        size_metric, lo, hi = dims[0], 0.03, 0.045
    else:
        raise ValueError(f"no generator for category {category!r}")
    size = _size_word(size_metric, lo, hi)
    words = [size]
    if texture is not None:
        words.append(TEXTURES[texture])
        colour = None
    else:
        words.append(colour)
    words.append(category.replace("l_block", "L-block").replace("_", " "))
    return ObjectSpec(
        id=f"{split}-{category}-{index:02d}",
        split=split,
        category=category,
        name=" ".join(words),
        kind="procedural",
        colour=colour,
        texture=texture,
        size=size,
        dims=dims,
        density=float(round(rng.uniform(150, 600), 1)),
    )


@functools.cache
def library() -> dict[str, tuple[ObjectSpec, ...]]:
    """The whole library, split name -> objects in a fixed order."""
    out: dict[str, tuple[ObjectSpec, ...]] = {}
    for split in SPLITS:
        rng = np.random.default_rng([20241203, SPLITS.index(split), int(LIBRARY_VERSION)])
        specs = [_make(rng, split, cat, i) for cat, n in PLAN[split] for i in range(n)]
        out[split] = tuple(specs)
    assert len(out["unseen"]) == UNSEEN_COUNT
    assert not {o.id for o in out["seen"]} & {o.id for o in out["unseen"]}
    return out


def objects(split: str) -> tuple[ObjectSpec, ...]:
    """Objects of one split; raises DivlaEvalError naming the valid splits for a bad one."""
    from divla_eval.errors import DivlaEvalError

    if split not in SPLITS:
        raise DivlaEvalError(f"unknown object split {split!r}; valid: {', '.join(SPLITS)}")
    return library()[split]


def manifest() -> dict:
    """Every object's attributes and content hash, plus one hash over the whole library."""
    entries = {
        split: [dict(asdict(o), content_hash=o.content_hash) for o in library()[split]] for split in SPLITS
    }
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:16]
    return {"version": LIBRARY_VERSION, "hash": digest, "objects": entries}


def library_hash() -> str:
    return manifest()["hash"]
