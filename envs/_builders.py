"""Turns an ObjectSpec into a robosuite MujocoObject (kept apart so the library imports no robosuite).

Each built object carries a `grasp_hint`: where a top-down parallel gripper should close on it (an
offset from the object's origin, in its own frame) and along which of its horizontal axes. Only the
scripted expert reads it; policies never see it.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Object-frame axis ("x" or "y") the fingers close along; None: the shorter horizontal extent."""


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
    else:
        raise ValueError(f"cannot build category {c!r}")
    assert c in MESHES or spec.kind == "procedural"
    obj.grasp_hint = hint
    return obj
