"""Turns an ObjectSpec into a robosuite MujocoObject (kept apart so the library imports no robosuite).

Each built object carries a `grasp_hint`: where a top-down parallel gripper should close on it (an
offset from the object's origin, in its own frame) and along which of its horizontal axes. Only the
scripted expert reads it; policies never see it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from robosuite.models.objects import BallObject, BoxObject, CapsuleObject, CylinderObject
from robosuite.models.objects import objects as rs_objects
from robosuite.models.objects.generated_objects import CompositeObject
from robosuite.utils.mjcf_utils import CustomMaterial, xml_path_completion

from divla_eval.envs.objects import COLOURS, MESHES, ObjectSpec

_ROT_X90 = (0.7071068, 0.7071068, 0.0, 0.0)  # cylinder axis -> y
_ROT_Y90 = (0.7071068, 0.0, 0.7071068, 0.0)  # cylinder axis -> x
_MESH_FILES = {
    "can": "can",
    "milk": "milk",
    "bread": "bread",
    "cereal": "cereal",
    "lemon": "lemon",
    "bottle": "bottle",
}


@dataclass(frozen=True)
class GraspHint:
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    close_axis: str | None = "y"
    """Object-frame axis ("x" or "y") the fingers close along; None: the shorter horizontal extent;
    "free": any horizontal direction (a round object), chosen so the hand stays clear of neighbours."""
    fallback_axis: str | None = None
    """The other axis ("x" or "y") to close along when a neighbour stands on `close_axis`'s line and
    not on this one: for objects narrower than the open fingers both ways."""


def _material(spec: ObjectSpec, sim_name: str) -> CustomMaterial | None:
    if spec.texture is None:
        return None
    return CustomMaterial(
        texture=spec.texture,
        tex_name=f"{sim_name}_tex",
        mat_name=f"{sim_name}_mat",
        tex_attrib={"type": "cube"},
        mat_attrib={"texrepeat": "1 1", "specular": "0.3", "shininess": "0.1"},
    )


def _composite(spec, sim_name, total, types, sizes, locs, quats=None):
    rgba = COLOURS[spec.colour] if spec.colour else (0.8, 0.8, 0.8, 1.0)
    mat = _material(spec, sim_name)
    obj = CompositeObject(
        name=sim_name,
        total_size=total,
        geom_types=types,
        geom_sizes=sizes,
        geom_locations=locs,
        geom_quats=quats,
        geom_rgbas=None if mat else [rgba] * len(types),
        geom_materials=[mat.mat_attrib["name"]] * len(types) if mat else None,
        geom_frictions=[(1.0, 0.005, 0.0001)] * len(types),
        density=spec.density,
        locations_relative_to_center=True,
        joints="default",
    )
    if mat is not None:
        obj.append_material(mat)
    return obj


def _quat_z(angle: float) -> tuple[float, float, float, float]:
    return (float(np.cos(angle / 2)), 0.0, 0.0, float(np.sin(angle / 2)))


def _quat_axis(axis: int, angle: float) -> tuple[float, float, float, float]:
    q = [float(np.cos(angle / 2)), 0.0, 0.0, 0.0]
    q[1 + axis] = float(np.sin(angle / 2))
    return tuple(q)


def _rotmat(quat) -> np.ndarray:
    w, x, y, z = quat
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _centred_composite(spec, sim_name, parts, grasp_point, close_axis, rolling_friction=False):
    """Build a composite from (type, size, location, quat) parts given in a frame whose z=0 is the
    object's bottom; the composite's origin becomes the centre of the parts' bounding box (what
    `object_corners`, placement and the zone test use), and the grasp point moves with it.

    `rolling_friction` gives the geoms torsional and rolling friction (condim 6): a rigid sphere
    rolls on forever, a stuffed toy stops where it falls over.
    """
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for kind, size, loc, quat in parts:
        if kind == "sphere":
            half = np.full(3, size[0])
        elif kind == "cylinder":  # upright only
            half = np.array([size[0], size[0], size[1]])
        else:  # box
            rot = _rotmat(quat) if quat is not None else np.eye(3)
            half = np.abs(rot) @ np.asarray(size)
        lo, hi = np.minimum(lo, np.asarray(loc) - half), np.maximum(hi, np.asarray(loc) + half)
    centre, total = (lo + hi) / 2, (hi - lo) / 2
    obj = _composite(
        spec,
        sim_name,
        total=tuple(float(v) for v in total),
        types=[p[0] for p in parts],
        sizes=[tuple(p[1]) for p in parts],
        locs=[tuple(float(v) for v in np.asarray(p[2]) - centre) for p in parts],
        quats=[p[3] for p in parts],
    )
    if rolling_friction:
        for geom in obj.get_obj().iter("geom"):
            if geom.get("group") == "0":  # collision geoms
                geom.set("condim", "6")
                geom.set("friction", "1 0.01 0.005")
    offset = tuple(float(v) for v in np.asarray(grasp_point) - centre)
    return obj, GraspHint(offset=offset, close_axis=close_axis)


def _glove_parts(d):
    """A flat hand: palm, cuff, finger blocks (4, or 1 for a mitten) and a thumb pointing forward-out.
    The thumb sits at the back half of the palm so the fingers of a gripper closing across the front
    half of the palm do not land on it."""
    px, py, t, fl, n = d
    n = int(round(n))
    parts = [("box", (px, py, t), (0.0, 0.0, t), None)]
    parts.append(("box", (0.3 * px, 1.08 * py, 0.85 * t), (-1.3 * px + 0.002, 0.0, 0.85 * t), None))
    if n == 1:
        parts.append(("box", (fl / 2, 0.92 * py, 0.9 * t), (px + fl / 2 - 0.002, 0.0, 0.9 * t), None))
    else:
        gap = 0.003
        fw = (2 * py - (n - 1) * gap) / n / 2
        lengths = (0.8, 1.0, 0.95, 0.75, 0.7)[:n]
        for k, f in enumerate(lengths):
            y = -py + fw + k * (2 * fw + gap)
            parts.append(("box", (f * fl / 2, fw, 0.75 * t), (px + f * fl / 2 - 0.002, y, 0.75 * t), None))
    tl, tw, ang = 0.8 * fl, 0.0065, -0.95  # thumb length, half width, direction (forward and outwards)
    root = np.array([-0.5 * px, -py + tw])
    centre = root + tl / 2 * np.array([np.cos(ang), np.sin(ang)])
    parts.append(("box", (tl / 2, tw, 0.75 * t), (centre[0], centre[1], 0.75 * t), _quat_z(ang)))
    return parts, (0.45 * px, 0.0, t)


def _plush_parts(d):
    """A sitting plush toy: body on a flat seat (a sphere alone would roll away when it tips over), two
    feet, head and ears. The fingers close front to back on the head, between the ears."""
    rb, rh, style = d
    head = np.array([0.0, 0.0, 2 * rb + 0.45 * rh])
    parts = [
        ("sphere", (rb,), (0.0, 0.0, rb), None),
        ("cylinder", (0.75 * rb, 0.2 * rb), (0.0, 0.0, 0.2 * rb), None),
        ("sphere", (0.42 * rb,), (0.55 * rb, 0.5 * rb, 0.42 * rb), None),
        ("sphere", (0.42 * rb,), (0.55 * rb, -0.5 * rb, 0.42 * rb), None),
        ("sphere", (rh,), tuple(head), None),
    ]
    for side in (-1, 1):
        if style < 0.5:  # round bear ears
            parts.append(("sphere", (0.32 * rh,), tuple(head + (0.0, side * 0.72 * rh, 0.72 * rh)), None))
        else:  # upright pointed cat ears
            ear = tuple(head + (0.0, side * 0.58 * rh, 0.85 * rh))
            parts.append(("box", (0.12 * rh, 0.26 * rh, 0.3 * rh), ear, None))
    return parts, tuple(head)


def _hex_wrench_parts(d):
    """An L-shaped hex key lying on a flat face. A regular hexagonal bar is exactly the union of three
    boxes turned by 60 degrees about its axis (MuJoCo has no hexagonal prism)."""
    w, half_long, short = d
    r = w / np.sqrt(3)  # circumradius of the hexagon
    parts = []
    for k in range(3):  # long arm along x, its centre line at y = 0
        parts.append(("box", (half_long, r / 2, w / 2), (0.0, 0.0, w / 2), _quat_axis(0, k * np.pi / 3)))
    half_short = (short + r) / 2
    for k in range(3):  # short arm along y at the -x end
        loc = (-half_long + r, half_short, w / 2)
        parts.append(("box", (r / 2, half_short, w / 2), loc, _quat_axis(1, k * np.pi / 3)))
    return parts, (0.35 * half_long, 0.0, w / 2)


def build_object(spec: ObjectSpec, sim_name: str):
    """Build `spec` as a free-jointed robosuite object; attaches `.grasp_hint`."""
    hint = GraspHint()
    rgba = COLOURS[spec.colour] if spec.colour else None
    mat = _material(spec, sim_name)
    common = dict(name=sim_name, rgba=rgba, material=mat, density=spec.density, friction=(1.0, 0.005, 0.0001))
    d = spec.dims
    c = spec.category
    if spec.kind == "mesh":
        obj = rs_objects.MujocoXMLObject(
            xml_path_completion(f"objects/{_MESH_FILES[c]}.xml"),
            name=sim_name,
            joints=[dict(type="free", damping="0.0005")],
            obj_type="all",
            duplicate_collision_geoms=True,
            scale=d[0],
        )
        hint = GraspHint(close_axis=None)
    elif c == "block":
        obj = BoxObject(size=d, **common)
        hint = GraspHint(close_axis="x" if d[0] < d[1] else "y")
    elif c == "cylinder":
        obj = CylinderObject(size=d, **common)
    elif c == "ball":
        obj = BallObject(size=d, **common)
    elif c == "capsule":
        obj = CapsuleObject(size=d, **common)
    elif c == "toy_car":
        length, width, height, wheel = d
        tz = (2 * wheel + 2 * height) / 2
        wheel_y, wheel_x = width - 0.004, 0.6 * length
        wheels = [(sx * wheel_x, sy * wheel_y, -tz + wheel) for sx in (-1, 1) for sy in (-1, 1)]
        obj = _composite(
            spec,
            sim_name,
            total=(length, width + 0.001, tz),
            types=["box", "box"] + ["cylinder"] * 4,
            sizes=[(length, width, height), (0.5 * length, 0.8 * width, 0.5 * height)] + [(wheel, 0.005)] * 4,
            locs=[(0, 0, -tz + wheel + height), (-0.1 * length, 0, -tz + wheel + 2.5 * height)] + wheels,
            quats=[None, None] + [_ROT_X90] * 4,
        )
        hint = GraspHint(offset=(0.0, 0.0, 0.0), close_axis="y")
    elif c == "mug":
        radius, half_h, handle = d
        obj = _composite(
            spec,
            sim_name,
            total=(radius + handle, radius, half_h),
            types=["cylinder", "box"],
            sizes=[(radius, half_h), (handle, 0.4 * handle, 0.6 * half_h)],
            locs=[(-handle, 0, 0), (radius, 0, 0)],
        )
        hint = GraspHint(offset=(-handle, 0.0, 0.0), close_axis="y")
    elif c == "dumbbell":
        bar_r, bar_half, bell_r = d
        obj = _composite(
            spec,
            sim_name,
            total=(bar_half + bell_r, bell_r, bell_r),
            types=["cylinder", "sphere", "sphere"],
            sizes=[(bar_r, bar_half), (bell_r,), (bell_r,)],
            locs=[(0, 0, 0), (-bar_half, 0, 0), (bar_half, 0, 0)],
            quats=[_ROT_Y90, None, None],
        )
        hint = GraspHint(close_axis="y")
    elif c == "l_block":
        arm, w, h = d
        obj = _composite(
            spec,
            sim_name,
            total=(arm, arm, h),
            types=["box", "box"],
            sizes=[(arm, w, h), (w, arm - w, h)],
            locs=[(0, -arm + w, 0), (-arm + w, w, 0)],
        )
        hint = GraspHint(offset=(0.3 * arm, -arm + w, 0.0), close_axis="y")
    elif c in ("glove", "plush_toy", "hex_wrench"):
        make = {"glove": _glove_parts, "plush_toy": _plush_parts, "hex_wrench": _hex_wrench_parts}[c]
        parts, grasp_point = make(d)
        plush = c == "plush_toy"
        obj, hint = _centred_composite(
            spec, sim_name, parts, grasp_point, "x" if plush else "y", rolling_friction=plush
        )
    else:
        raise ValueError(f"cannot build category {c!r}")
    assert c in MESHES or spec.kind == "procedural"
    obj.grasp_hint = hint
    return obj
