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

import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from divla_eval.data.demos import demo_names, open_demos, read_demo, read_env_args


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

    `path` may be one file or several (a multi-task dataset from one `collect` file per task or
    sub-task); they must share the embodiment. With several files a demo is named "<file index>/<demo>".
    `demos`: None for every demo, "train"/"valid" for each file's masks, or a list of demo names.
    """

    def __init__(
        self,
        path: str | Path | list[str | Path] | tuple[str | Path, ...],
        chunk: int = 16,
        obs_horizon: int = 1,
        cameras: tuple[str, ...] = ("front", "wrist"),
        demos: str | list[str] | None = None,
    ):
        if chunk < 1 or obs_horizon < 1:
            raise ValueError(f"chunk and obs_horizon must be >= 1, got {chunk} and {obs_horizon}")
        self.paths = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]
        if not self.paths:
            raise ValueError("no demonstrations file given")
        self.path = "+".join(self.paths)  # for messages
        self.chunk = chunk
        self.obs_horizon = obs_horizon
        self.cameras = tuple(cameras)
        self._files: dict[int, h5py.File] = {}
        self._pid: int | None = None
        self.demos: list[str] = []
        self._where: dict[str, tuple[int, str]] = {}  # demo -> (file index, name in that file)
        self.actions, self.proprio, self.reasoning, self.instructions = {}, {}, {}, {}
        for k, file_path in enumerate(self.paths):
            # read and checked by divla_eval.data.demos: a damaged file or demo is one line here
            with open_demos(file_path) as f:
                env_args = read_env_args(f, file_path)
                if k == 0:
                    self.env_args = env_args
                else:
                    self._check_compatible(file_path, env_args)
                names = demo_names(f, file_path, demos if isinstance(demos, str) else None)
                if isinstance(demos, list):
                    names = [n for n in names if self._key(k, n) in demos]
                for name in names:
                    demo = read_demo(f, file_path, name, env_args, self.cameras)
                    key = self._key(k, name)
                    self.demos.append(key)
                    self._where[key] = (k, name)
                    self.actions[key] = demo["actions"]
                    self.proprio[key] = demo["proprio"]
                    self.reasoning[key] = demo["reasoning"]
                    self.instructions[key] = demo["instruction"]
        if isinstance(demos, list):
            missing = sorted(set(demos) - set(self.demos))
            if missing:
                raise KeyError(f"{self.path} has no demos {missing}")
        lengths = [len(self.actions[n]) for n in self.demos]
        self.index = np.array(
            [(d, t) for d, n in enumerate(lengths) for t in range(n)], dtype=np.int64
        ).reshape(-1, 2)

    def _key(self, file_index: int, name: str) -> str:
        return name if len(self.paths) == 1 else f"{file_index}/{name}"

    def _check_compatible(self, path: str, env_args: dict) -> None:
        """Files trained on together must drive the same robot with the same observations (the tasks
        may differ: bin picking and the multitask sub-tasks share the single-arm Panda)."""
        from divla_eval.tasks import get_task

        first, other = self.env_args["env_kwargs"], env_args["env_kwargs"]
        embodiments = [get_task(a["task"]).embodiment for a in (first, other)]
        if embodiments[0] != embodiments[1]:
            raise ValueError(
                f"{path} is {other['task']} on {embodiments[1]}, {self.paths[0]} is {first['task']} on "
                f"{embodiments[0]}: demonstrations trained on together must share the embodiment"
            )
        for key in ("image_size", "cameras"):
            if first.get(key) != other.get(key):
                raise ValueError(
                    f"{path} has {key}={other.get(key)!r} but {self.paths[0]} has {first.get(key)!r}; "
                    "demonstrations trained on together must agree"
                )
        if self.env_args.get("format_version") != env_args.get("format_version"):
            raise ValueError(f"{path} and {self.paths[0]} were recorded in different formats")

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = {}  # an open HDF5 handle must not travel to another process
        state["_pid"] = None
        return state

    def _h5(self, k: int) -> h5py.File:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        if k not in self._files:
            self._files[k] = h5py.File(self.paths[k], "r")
        return self._files[k]

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
            k, stored = self._where[name]
            g = self._h5(k)["data"][stored]["obs"]
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
        for f in self._files.values():
            f.close()
        self._files = {}


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


def action_stats(
    path: str | Path | list | tuple, demos: str | list[str] | None = None
) -> dict[str, np.ndarray]:
    """Per-dimension statistics of the actions of a file (or files): min, max, mean, std, q01, q99
    (float32 [action dim]).

    The 1st/99th percentiles are what OpenVLA-style 256-bin action tokenisation clips to, so a few
    outlier actions do not waste bins; min/max and mean/std serve the other normalisations.
    """
    return stats_of(DemoDataset(path, cameras=(), demos=demos).actions.values(), path)


def stats_of(actions, source="the demos") -> dict[str, np.ndarray]:
    """The statistics of `action_stats` over arrays of actions ([steps, action dim] each)."""
    actions = list(actions)
    if not actions:
        raise ValueError(f"{source}: no demos to compute action statistics from")
    acts = np.concatenate(actions).astype(np.float64)
    return {
        "min": acts.min(axis=0).astype(np.float32),
        "max": acts.max(axis=0).astype(np.float32),
        "mean": acts.mean(axis=0).astype(np.float32),
        "std": acts.std(axis=0).astype(np.float32),
        "q01": np.percentile(acts, 1, axis=0).astype(np.float32),
        "q99": np.percentile(acts, 99, axis=0).astype(np.float32),
    }
