"""Training samples from a `divla-eval collect` HDF5 file, as a torch Dataset.

One item per (demo, step t): the last `obs_horizon` observations up to t and the next `chunk` actions
from t, which is what chunked policies (DiVLA's diffusion head, Diffusion Policy, Octo) regress.

Only this module imports torch; `divla_eval.data` exposes it lazily so the harness stays light.

Why the file is opened lazily: an h5py handle must not cross a fork (DataLoader workers would share one
HDF5 file descriptor and read garbage), so the handle is opened on the first `__getitem__` in each
process and dropped when the dataset is pickled. The small per-step arrays (actions, proprioception,
reasoning) are read once at construction, with the file closed again afterwards; only images are read
per item.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset


def _demo_names(f: h5py.File, demos) -> list[str]:
    all_names = sorted((n for n in f["data"].keys() if n.startswith("demo_")), key=lambda n: int(n[5:]))
    if demos is None:
        return all_names
    if isinstance(demos, str):
        if f"mask/{demos}" not in f:
            raise KeyError(f"{f.filename} has no mask/{demos}; available: {list(f.get('mask', {}).keys())}")
        return [n.decode() if isinstance(n, bytes) else str(n) for n in f[f"mask/{demos}"][:]]
    missing = [n for n in demos if n not in f["data"]]
    if missing:
        raise KeyError(f"{f.filename} has no demos {missing}")
    return list(demos)


class DemoDataset(Dataset):
    """Samples of a demonstration file.

    Item (a dict):
        images          {camera: uint8 tensor [obs_horizon, 3, H, W]}, raw 0..255; models normalise
                        them themselves (keeps DataLoader traffic 4x smaller than float32)
        proprio         float32 [obs_horizon, 9]
        obs_pad_mask    bool [obs_horizon], True where a step before the demo's start repeats frame 0
        actions         float32 [chunk, 7]: actions t .. t+chunk-1, the last action repeated past the end
        action_pad_mask bool [chunk], True where the action is padding (past the demo's end)
        instruction     str
        reasoning       str, the expert's phrase at step t
        demo, t         which sample this is

    `demos`: None for every demo, "train"/"valid" for the file's masks, or a list of demo names.
    """

    def __init__(
        self,
        path: str | Path,
        chunk: int = 16,
        obs_horizon: int = 1,
        cameras: tuple[str, ...] = ("front", "wrist"),
        demos: str | list[str] | None = None,
    ):
        if chunk < 1 or obs_horizon < 1:
            raise ValueError(f"chunk and obs_horizon must be >= 1, got {chunk} and {obs_horizon}")
        self.path = str(path)
        self.chunk = chunk
        self.obs_horizon = obs_horizon
        self.cameras = tuple(cameras)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        with h5py.File(self.path, "r") as f:
            self.env_args = json.loads(f["data"].attrs["env_args"])
            self.demos = _demo_names(f, demos)
            self.actions, self.proprio, self.reasoning, self.instructions = {}, {}, {}, {}
            for name in self.demos:
                g = f["data"][name]
                for cam in self.cameras:
                    if f"obs/{cam}_image" not in g:
                        raise KeyError(f"{self.path}: {name} has no obs/{cam}_image")
                self.actions[name] = g["actions"][:].astype(np.float32)
                self.proprio[name] = g["obs/proprio"][:].astype(np.float32)
                self.reasoning[name] = list(g["reasoning"].asstr()[:])
                self.instructions[name] = str(g.attrs["instruction"])
        lengths = [len(self.actions[n]) for n in self.demos]
        self.index = np.array(
            [(d, t) for d, n in enumerate(lengths) for t in range(n)], dtype=np.int64
        ).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None  # an open HDF5 handle must not travel to another process
        state["_pid"] = None
        return state

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __getitem__(self, i: int) -> dict:
        d, t = (int(v) for v in self.index[i])
        name = self.demos[d]
        actions = self.actions[name]
        n = len(actions)
        obs_steps = np.arange(t - self.obs_horizon + 1, t + 1)
        obs_pad = obs_steps < 0
        obs_steps = np.clip(obs_steps, 0, n - 1)
        act_steps = np.arange(t, t + self.chunk)
        act_pad = act_steps >= n
        act_steps = np.clip(act_steps, 0, n - 1)
        images = {}
        if self.cameras:
            g = self._h5()["data"][name]["obs"]
            lo, hi = int(obs_steps[0]), int(obs_steps[-1]) + 1
            for cam in self.cameras:
                frames = g[f"{cam}_image"][lo:hi]  # contiguous: one read, then repeat the padded ones
                frames = frames[obs_steps - lo]
                images[cam] = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))
        return {
            "images": images,
            "proprio": torch.from_numpy(self.proprio[name][obs_steps]),
            "obs_pad_mask": torch.from_numpy(obs_pad),
            "actions": torch.from_numpy(actions[act_steps]),
            "action_pad_mask": torch.from_numpy(act_pad),
            "instruction": self.instructions[name],
            "reasoning": self.reasoning[name][t],
            "demo": name,
            "t": t,
        }

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def collate(items: list[dict]):
    """Stack tensors along a new batch dimension; strings stay Python lists (tokenisers want lists)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: collate([it[k] for it in items]) for k in first}
    if isinstance(first, torch.Tensor):
        return torch.stack(items)
    if isinstance(first, (int, float, bool, np.integer, np.floating)):
        return torch.tensor(items)
    return list(items)


def action_stats(path: str | Path, demos: str | list[str] | None = None) -> dict[str, np.ndarray]:
    """Per-dimension statistics of the actions of a file: min, max, mean, std, q01, q99 (float32 [7]).

    The 1st/99th percentiles are what OpenVLA-style 256-bin action tokenisation clips to, so a few
    outlier actions do not waste bins; min/max and mean/std serve the other normalisations.
    """
    with h5py.File(path, "r") as f:
        names = _demo_names(f, demos)
        if not names:
            raise ValueError(f"{path}: no demos to compute action statistics from")
        acts = np.concatenate([f["data"][n]["actions"][:] for n in names]).astype(np.float64)
    return {
        "min": acts.min(axis=0).astype(np.float32),
        "max": acts.max(axis=0).astype(np.float32),
        "mean": acts.mean(axis=0).astype(np.float32),
        "std": acts.std(axis=0).astype(np.float32),
        "q01": np.percentile(acts, 1, axis=0).astype(np.float32),
        "q99": np.percentile(acts, 99, axis=0).astype(np.float32),
    }
