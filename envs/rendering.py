"""On-demand camera images at the cost this CPU can afford.

Rendering dominates run time on a 2-core machine without GPU (Mesa llvmpipe). robosuite's default scene
draws ~170k triangles of robot and pedestal meshes with shadows and reflections: ~30-55 ms per 128 px
frame here. Two measures bring a frame to a few ms while keeping every object's real appearance:

1. `lighten_robot_meshes` decimates the robot, gripper and mount visual meshes once (quadric edge
   collapse, `fast_simplification`), merges each link's look-alike visual meshes into one, and caches
   the results on disk; the objects, textures and materials that tasks and perturbations depend on are
   left untouched.
2. `CameraRenderer` turns shadows, reflections, the skybox and multisampling off and hides collision
   geoms (group 0) and marker sites, as robosuite does for its own visual renders.

Images are upright (row 0 is the top of the picture): this is MuJoCo's own convention, used for
demonstrations, evaluation and videos alike (robosuite's flipped "opengl" convention is not used).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import weakref
import xml.etree.ElementTree as ET
from pathlib import Path

import mujoco
import numpy as np

#: Mesh names with these prefixes belong to the robot and its mount, which no task's success or
#: perturbation depends on; only they are simplified.
DECIMATE_PREFIXES = ("robot", "gripper", "fixed_mount", "mount")
#: Meshes with fewer faces than this are kept as they are.
DECIMATE_MIN_FACES = 1500
#: Fraction of faces kept in a decimated mesh (at least DECIMATE_MIN_FACES // 4 faces).
DECIMATE_KEEP = 0.06
_CACHE_VERSION = "v2"
HIDDEN_GROUP = 3  # MuJoCo draws geom groups 0-2 by default
_memo: dict[str, str] = {}


def cache_dir() -> Path:
    """Where derived assets live: $DIVLA_EVAL_CACHE, else ~/.cache/divla-eval."""
    root = os.environ.get("DIVLA_EVAL_CACHE") or Path.home() / ".cache" / "divla-eval"
    return Path(root)


def _decimated_path(src: str) -> str:
    """Return a cached, decimated copy of mesh file `src`, or `src` itself if it is small already."""
    if src in _memo:
        return _memo[src]
    import fast_simplification
    import trimesh

    data = Path(src).read_bytes()
    digest = hashlib.sha256(data + f"{_CACHE_VERSION}:{DECIMATE_KEEP}".encode()).hexdigest()[:20]
    out = cache_dir() / "meshes" / f"{digest}.stl"
    if not out.exists():
        mesh = trimesh.load(src, force="mesh", process=True)
        # OBJ files repeat a vertex per normal/uv; weld them so the simplifier sees one surface.
        mesh.merge_vertices(merge_tex=True, merge_norm=True)
        if len(mesh.faces) < DECIMATE_MIN_FACES:
            _memo[src] = src
            return src
        target = max(DECIMATE_MIN_FACES // 4, int(len(mesh.faces) * DECIMATE_KEEP))
        verts, faces = fast_simplification.simplify(
            np.asarray(mesh.vertices, dtype=np.float32),
            np.asarray(mesh.faces, dtype=np.int64),
            target_reduction=1.0 - target / len(mesh.faces),
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        trimesh.Trimesh(verts, faces, process=False).export(tmp, file_type="stl")
        tmp.replace(out)  # atomic: parallel workers never read a half-written file
    _memo[src] = str(out)
    return str(out)


def _merged_path(parts: list[tuple[str, np.ndarray, np.ndarray]]) -> str:
    """One cached STL holding every (file, position, rotation) part, in the parent body's frame."""
    import trimesh

    key = "|".join(f"{f}:{np.round(p, 6).tolist()}:{np.round(r, 6).tolist()}" for f, p, r in parts)
    if key in _memo:
        return _memo[key]
    digest = hashlib.sha256(f"{_CACHE_VERSION}:{key}".encode()).hexdigest()[:20]
    out = cache_dir() / "meshes" / f"merged-{digest}.stl"
    if not out.exists():
        meshes = []
        for file, pos, rot in parts:
            mesh = trimesh.load(file, force="mesh", process=False)
            meshes.append(trimesh.Trimesh(np.asarray(mesh.vertices) @ rot.T + pos, mesh.faces, process=False))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        trimesh.util.concatenate(meshes).export(tmp, file_type="stl")
        tmp.replace(out)
    _memo[key] = str(out)
    return str(out)


def _merge_visual_geoms(root: ET.Element, asset: ET.Element) -> bool:
    """Merge each robot body's visual mesh geoms that look the same into one geom.

    The Panda's links are split into ~55 visual meshes, most with their own (often identical) material;
    llvmpipe pays ~50 us per drawn geom whatever its size, so after decimation the count of geoms, not
    of triangles, dominates a frame. Geoms are grouped by the *content* of their material and rgba, so
    the picture is unchanged.
    """
    materials = {
        m.get("name"): tuple(sorted((k, v) for k, v in m.attrib.items() if k != "name"))
        for m in asset.iter("material")
    }
    mesh_files = {m.get("name"): m for m in asset.findall("mesh")}
    changed = False
    for body in root.iter("body"):
        if not body.get("name", "").startswith(DECIMATE_PREFIXES):
            continue
        groups: dict[tuple, list[ET.Element]] = {}
        for geom in body.findall("geom"):
            mesh = mesh_files.get(geom.get("mesh", ""))
            if (
                geom.get("type") != "mesh"
                or geom.get("group") != "1"
                or mesh is None
                or mesh.get("scale") is not None
                or any(geom.get(a) is not None for a in ("euler", "axisangle", "xyaxes", "zaxis", "class"))
            ):
                continue
            look = (
                materials.get(geom.get("material")),
                geom.get("rgba"),
                geom.get("contype"),
                geom.get("conaffinity"),
            )
            groups.setdefault(look, []).append(geom)
        for index, geoms in enumerate(g for g in groups.values() if len(g) > 1):
            parts = []
            for geom in geoms:
                pos = np.array([float(v) for v in geom.get("pos", "0 0 0").split()])
                quat = np.array([float(v) for v in geom.get("quat", "1 0 0 0").split()])
                rot = np.zeros(9)
                mujoco.mju_quat2Mat(rot, quat / np.linalg.norm(quat))
                parts.append((mesh_files[geom.get("mesh")].get("file"), pos, rot.reshape(3, 3)))
            name = f"{body.get('name')}_merged{index}"
            ET.SubElement(asset, "mesh", name=name, file=_merged_path(parts))
            keep = geoms[0]
            keep.set("mesh", name)
            for attr in ("pos", "quat"):
                keep.attrib.pop(attr, None)
            for geom in geoms[1:]:  # robosuite looks geoms up by name: hide them (group 3), keep them
                geom.set("group", str(HIDDEN_GROUP))
            changed = True
    return changed


def lighten_robot_meshes(xml: str) -> str:
    """Decimate the robot's large visual meshes and merge look-alike ones; the rest is unchanged."""
    root = ET.fromstring(xml)
    asset = root.find("asset")
    if asset is None:
        return xml
    changed = False
    for mesh in asset.findall("mesh"):
        name, file = mesh.get("name", ""), mesh.get("file")
        if file and name.startswith(DECIMATE_PREFIXES) and Path(file).is_file():
            new = _decimated_path(file)
            if new != file:
                mesh.set("file", new)
                changed = True
    changed |= _merge_visual_geoms(root, asset)
    return ET.tostring(root, encoding="unicode") if changed else xml


_LIVE: weakref.WeakSet = weakref.WeakSet()
_CLOSE_AT_EXIT_REGISTERED = False


def _close_live_renderers() -> None:
    """Close every renderer still open when the interpreter exits (a gymnasium env made with
    render_mode="rgb_array" and never closed). mujoco's EGL module terminates the EGL display in its
    own atexit handler; a renderer freed after that, by `__del__` during interpreter teardown, printed
    EGLError tracebacks. Registered after the first renderer's GL context exists, so it runs first."""
    for renderer in list(_LIVE):
        try:
            renderer.close()
        except Exception:  # at exit nothing is left to report to; a GL error here changes no result
            pass


class CameraRenderer:
    """One offscreen renderer for a compiled model; draws named cameras as uint8 HxWx3 arrays.

    Keep one per process (DESIGN.md: several EGL contexts in one process have been seen returning each
    other's frames); `close()` it before making the next. One left open is closed at interpreter exit.
    """

    def __init__(self, model: mujoco.MjModel, height: int, width: int):
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, height)
        model.vis.quality.offsamples = 0  # 4x multisampling doubles llvmpipe's cost per frame
        self.model = model
        self.height, self.width = height, width
        self._renderer = mujoco.Renderer(model, height, width)
        self._option = mujoco.MjvOption()
        self._option.geomgroup[0] = 0  # collision geoms stay invisible
        self._option.geomgroup[HIDDEN_GROUP] = 0
        self._option.sitegroup[:] = 0  # so do robosuite's marker sites (grip site, target sites)
        flags = self._renderer.scene.flags
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = 0  # hidden behind the arena walls anyway; ~0.8 ms a frame
        global _CLOSE_AT_EXIT_REGISTERED
        _LIVE.add(self)
        if not _CLOSE_AT_EXIT_REGISTERED:
            atexit.register(_close_live_renderers)
            _CLOSE_AT_EXIT_REGISTERED = True

    def render(self, data: mujoco.MjData, camera: str) -> np.ndarray:
        self._renderer.update_scene(data, camera=camera, scene_option=self._option)
        return self._renderer.render().copy()

    def upload_textures(self) -> None:
        """Send edited texture pixels (perturbations) to the GL context that draws them."""
        self._renderer._gl_context.make_current()
        for tex in range(self.model.ntex):
            mujoco.mjr_uploadTexture(self.model, self._renderer._mjr_context, tex)

    def close(self) -> None:
        _LIVE.discard(self)
        self._renderer.close()
