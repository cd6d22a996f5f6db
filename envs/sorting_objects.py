"""The sorting task's object families: toy cars, knitted gloves, plush toys and hex wrenches.

They are kept apart from the bin-picking library (`divla_eval.envs.objects`) so that adding or tuning a
sorting object never moves that library's ids, hashes or published results.

Seen and unseen instances of a category differ in shape, size and colour, so an unseen object is new
by more than its colour:

- toy car: seen ones are short, low saloons; unseen ones are longer, taller vans with larger wheels;
- glove: seen ones have four fingers and a thumb; unseen ones are mittens (one finger block, a thumb);
- plush toy: seen ones are bears (round ears); unseen ones are cats (upright pointed ears), larger;
- hex wrench: seen ones are slim; unseen ones are thicker with longer arms.

Seen objects use `SEEN_COLOURS`, unseen ones only `UNSEEN_ONLY_COLOURS`. Every object is generated from
a fixed seed; ids and content hashes change only when `SORTING_LIBRARY_VERSION` is bumped. All objects
are rigid (a knitted glove or a plush toy is not deformable here; see `ObjectSpec.deformable`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict

import numpy as np

from divla_eval.envs.objects import SEEN_COLOURS, UNSEEN_ONLY_COLOURS, ObjectSpec

SORTING_LIBRARY_VERSION = "1"
SPLITS = ("seen", "unseen")
CATEGORIES = ("toy_car", "glove", "plush_toy", "hex_wrench")
CATEGORY_WORDS = {
    "toy_car": "toy car",
    "glove": "glove",
    "plush_toy": "plush toy",
    "hex_wrench": "hex wrench",
}
PER_CATEGORY = 8
"""Instances per category and split: enough for 3 of a category in a hard episode with room to vary."""

#: category -> split -> per-dimension (lo, hi) ranges; a trailing fixed value is a shape switch.
_RANGES: dict[str, dict[str, list[tuple[float, float]]]] = {
    # body half length, half width, half height; wheel radius (the existing toy_car builder)
    "toy_car": {
        "seen": [(0.036, 0.046), (0.018, 0.022), (0.011, 0.014), (0.0095, 0.0115)],
        "unseen": [(0.046, 0.054), (0.021, 0.025), (0.014, 0.018), (0.0115, 0.0135)],
    },
    # palm half length, half width, half thickness; finger length; number of finger blocks
    "glove": {
        "seen": [(0.026, 0.031), (0.021, 0.025), (0.009, 0.0105), (0.030, 0.036), (4, 4)],
        "unseen": [(0.027, 0.033), (0.023, 0.027), (0.0095, 0.011), (0.030, 0.036), (1, 1)],
    },
    # body radius, head radius; ear style (0 round bear ears, 1 pointed cat ears). A plush toy is kept
    # shorter than the open gripper (8 cm) from end to end: a longer one, grasped lying down, can turn
    # in the fingers until it is wedged between them and no longer falls out when they open.
    "plush_toy": {
        "seen": [(0.019, 0.022), (0.014, 0.016), (0, 0)],
        "unseen": [(0.021, 0.023), (0.015, 0.017), (1, 1)],
    },
    # flat-to-flat width of the hexagonal bar, long arm half length, short arm length
    "hex_wrench": {
        "seen": [(0.0150, 0.0170), (0.036, 0.044), (0.022, 0.027)],
        "unseen": [(0.0170, 0.0190), (0.044, 0.052), (0.027, 0.032)],
    },
}
#: Density ranges (kg/m^3): stuffed toys and knitted gloves are light, wrenches are hollow toy steel.
_DENSITY = {"toy_car": (300, 600), "glove": (150, 300), "plush_toy": (100, 200), "hex_wrench": (1500, 2500)}


def _size_metric(category: str, dims: tuple[float, ...]) -> float:
    return {"toy_car": dims[0], "glove": dims[0] * dims[1], "plush_toy": dims[0], "hex_wrench": dims[1]}[
        category
    ]


def _size_word(category: str, dims: tuple[float, ...]) -> str:
    """small / medium / large relative to the category's seen and unseen instances together."""
    ranges = _RANGES[category]
    lo = min(_size_metric(category, tuple(r[0] for r in ranges[s])) for s in SPLITS)
    hi = max(_size_metric(category, tuple(r[1] for r in ranges[s])) for s in SPLITS)
    t = (_size_metric(category, dims) - lo) / (hi - lo)
    return "small" if t < 1 / 3 else ("large" if t > 2 / 3 else "medium")


def _make(rng: np.random.Generator, split: str, category: str, index: int) -> ObjectSpec:
    colours = SEEN_COLOURS if split == "seen" else UNSEEN_ONLY_COLOURS
    colour = str(colours[index % len(colours)])  # spread evenly: every colour appears in every category
    dims = tuple(round(float(rng.uniform(lo, hi)), 4) for lo, hi in _RANGES[category][split])
    size = _size_word(category, dims)
    return ObjectSpec(
        id=f"sort-{split}-{category}-{index:02d}",
        split=split,
        category=category,
        name=f"{size} {colour} {CATEGORY_WORDS[category]}",
        kind="procedural",
        colour=colour,
        texture=None,
        size=size,
        dims=dims,
        density=float(round(rng.uniform(*_DENSITY[category]), 1)),
    )


@functools.cache
def library() -> dict[str, tuple[ObjectSpec, ...]]:
    """split -> objects, ordered by category then index."""
    out = {}
    for split in SPLITS:
        rng = np.random.default_rng([20241204, SPLITS.index(split), int(SORTING_LIBRARY_VERSION)])
        out[split] = tuple(_make(rng, split, c, i) for c in CATEGORIES for i in range(PER_CATEGORY))
    assert not {o.id for o in out["seen"]} & {o.id for o in out["unseen"]}
    return out


def objects(split: str, category: str | None = None) -> tuple[ObjectSpec, ...]:
    """Objects of one split (optionally one category); a bad name raises DivlaEvalError listing valid ones."""
    from divla_eval.errors import DivlaEvalError

    if split not in SPLITS:
        raise DivlaEvalError(f"unknown sorting object split {split!r}; valid: {', '.join(SPLITS)}")
    if category is not None and category not in CATEGORIES:
        raise DivlaEvalError(f"unknown sorting category {category!r}; valid: {', '.join(CATEGORIES)}")
    return tuple(o for o in library()[split] if category is None or o.category == category)


def manifest() -> dict:
    entries = {
        split: [dict(asdict(o), content_hash=o.content_hash) for o in library()[split]] for split in SPLITS
    }
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:16]
    return {"version": SORTING_LIBRARY_VERSION, "hash": digest, "objects": entries}
