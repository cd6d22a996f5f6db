"""What goes over the wire: openpi's msgpack encoding and the observation keys both ends understand.

Transport (openpi's, measured in ../shared/PROTOCOLS.md): one websocket connection is one session; the
server sends one binary frame `msgpack(metadata)` first; then strictly request/response, binary
`msgpack(observation)` -> binary `msgpack(reply)`; an inference error is the traceback as a text frame,
then close code 1011.

Arrays are packed as openpi's `msgpack_numpy` packs them (a map with *bytes* keys `__ndarray__`, `data`,
`dtype`, `shape`), not as msgpack ext types, so openpi's client and server decode ours and we decode
theirs. Object, void and complex dtypes are refused, as there.

Observation keys. LIBERO-style keys, which openpi's policies read, for the two panda cameras, the state
and the instruction:
    observation/image        front camera, uint8 HxWx3, upright (row 0 is the top)
    observation/wrist_image  wrist camera
    observation/state        proprioception as float32 (openpi's LIBERO convention is float)
    prompt                   the instruction
plus our own full-fidelity keys, which foreign servers ignore:
    divla/image/<camera>     any other camera (e.g. wrist_left of the two-arm tasks)
    divla/proprio            proprioception in its own dtype (float64), so actions match in-process runs
    divla/embodiment         robot name ("panda", "panda_bimanual")
    divla/expert_reasoning   the expert's phrase, only for a policy run with oracle_reasoning
    divla/episode            {"seed": int, "instruction": str} on the first call of an episode: the
                             server resets its session with that seed (openpi's protocol has no
                             episode boundaries; a server without this marker is not seeded per episode)
    divla/history            observations between calls, oldest first, for policies conditioned on
                             several consecutive steps (Diffusion Policy's obs_horizon)
Reply: `actions` [H, action_dim] (the policy's own dtype), `reasoning` (str or None), `server_timing`.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from divla_eval.policy import Observation

IMAGE_KEYS = {"front": "observation/image", "wrist": "observation/wrist_image"}
"""Cameras sent under openpi's LIBERO-style keys; any other camera goes as `divla/image/<camera>`."""
CAMERA_PREFIX = "divla/image/"
STATE_KEY = "observation/state"
PROMPT_KEY = "prompt"
PROPRIO_KEY = "divla/proprio"
EMBODIMENT_KEY = "divla/embodiment"
EXPERT_KEY = "divla/expert_reasoning"
EPISODE_KEY = "divla/episode"
HISTORY_KEY = "divla/history"


class WireError(ValueError):
    """A message that does not follow the protocol (the server answers it as an inference error)."""


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in ("V", "O", "c"):
        raise WireError(f"cannot send an array of dtype {obj.dtype} (object, void and complex are refused)")
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": arr.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot send a {type(obj).__name__} over the wire")


def _unpack_hook(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        try:
            dtype = np.dtype(obj[b"dtype"])
            if dtype.kind in ("V", "O", "c"):
                raise WireError(f"refused an array of dtype {dtype}")
            return np.ndarray(buffer=obj[b"data"], dtype=dtype, shape=tuple(obj[b"shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"malformed array in message: {exc}") from None
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def packb(obj: Any) -> bytes:
    """msgpack bytes of `obj`, arrays as openpi's msgpack_numpy writes them."""
    return msgpack.packb(obj, default=_pack_default, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """The object of `packb` (arrays come back read-only, views of the message: copy to write)."""
    try:
        return msgpack.unpackb(data, object_hook=_unpack_hook, strict_map_key=False)
    except WireError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for damaged bytes
        raise WireError(f"not a msgpack message: {exc}") from None


def observation_to_wire(
    obs: Observation, episode: dict | None = None, history: list[Observation] | None = None
) -> dict:
    """The request for one policy call (see the module docstring for the keys)."""
    msg: dict[str, Any] = {
        PROMPT_KEY: obs.instruction,
        STATE_KEY: np.asarray(obs.proprio, dtype=np.float32),
        PROPRIO_KEY: np.asarray(obs.proprio),
        EMBODIMENT_KEY: obs.embodiment,
    }
    for camera, image in obs.images.items():
        msg[IMAGE_KEYS.get(camera, CAMERA_PREFIX + camera)] = np.asarray(image, dtype=np.uint8)
    if obs.expert_reasoning is not None:
        msg[EXPERT_KEY] = obs.expert_reasoning
    if episode is not None:
        msg[EPISODE_KEY] = {"seed": int(episode["seed"]), "instruction": str(episode["instruction"])}
    if history:
        msg[HISTORY_KEY] = [observation_to_wire(h) for h in history]
    return msg


def observation_from_wire(msg: dict, default_embodiment: str = "panda") -> Observation:
    """An `Observation` from a request: ours, or a foreign client's LIBERO-style keys."""
    if not isinstance(msg, dict):
        raise WireError(f"an observation must be a map, got {type(msg).__name__}")
    images = {}
    for camera, key in IMAGE_KEYS.items():
        if key in msg:
            images[camera] = _image(msg[key], key)
    for key, value in msg.items():
        if isinstance(key, str) and key.startswith(CAMERA_PREFIX):
            images[key[len(CAMERA_PREFIX) :]] = _image(value, key)
    proprio = msg.get(PROPRIO_KEY, msg.get(STATE_KEY))
    if proprio is None:
        raise WireError(f"the observation has neither {PROPRIO_KEY!r} nor {STATE_KEY!r}")
    prompt = msg.get(PROMPT_KEY, "")
    if not isinstance(prompt, str):
        raise WireError(f"{PROMPT_KEY!r} must be a string, got {type(prompt).__name__}")
    embodiment = msg.get(EMBODIMENT_KEY) or default_embodiment
    expert = msg.get(EXPERT_KEY)
    return Observation(images, np.array(proprio), prompt, str(embodiment), expert)


def _image(value: Any, key: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.ndim != 3 or value.shape[2] != 3 or value.dtype != np.uint8:
        shown = getattr(value, "shape", type(value).__name__)
        raise WireError(f"{key!r} must be a uint8 HxWx3 image, got {shown}")
    return np.array(value)  # writable: a policy may normalise in place
