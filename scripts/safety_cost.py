"""What the crash safety of issue 26 costs on a normal run, measured on synthetic data (no simulator).

    .venv/bin/python scripts/safety_cost.py [--demos 20] [--steps 130] [--size 84]

1. `collect`: a demo written in place into the open output file (+ index + flush, as before) against
   the journal (its own file, fsynced and renamed) plus its share of the merge, and the per-session
   copy of the finished file.
2. `run`: the per-step check of every MuJoCo instability counter against the old single qacc check.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import timeit
from pathlib import Path

import h5py
import mujoco
import numpy as np

import divla_eval.data.collect as col
from divla_eval.envs.gym_env import check_simulation
from divla_eval.runner import plan_episodes


def fake_outcome(spec, steps: int, size: int) -> col._Outcome:
    """A demo shaped like a recorded one; images are shifted gradients, which compress like renders."""
    rng = np.random.default_rng(spec.episode_index)
    base = np.linspace(0, 255, size * size * 3).reshape(size, size, 3).astype(np.uint8)
    frames = np.stack([np.roll(base, t, axis=1) for t in range(steps)])
    dones = np.zeros(steps, dtype=np.int64)
    dones[-1] = 1
    attrs = {"instruction": "x", "episode_key": spec.key, "episode_index": spec.episode_index}
    attrs.update(object_ids="[]", seed=0, perturbations="[]")
    return col._Outcome(
        spec,
        {
            "actions": rng.uniform(-1, 1, (steps, 7)).astype(np.float32),
            "states": rng.normal(size=(steps, 60)),
            "rewards": dones.astype(np.float64),
            "dones": dones,
            "reasoning": ["move to the cube"] * steps,
            "obs/front_image": frames,
            "obs/wrist_image": frames[:, ::-1],
            "obs/proprio": rng.normal(size=(steps, 11)).astype(np.float32),
            "attrs": attrs,
        },
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--demos", type=int, default=20)
    p.add_argument("--steps", type=int, default=130)
    p.add_argument("--size", type=int, default=84)
    a = p.parse_args()
    cfg = col._resolve(col.CollectConfig(episodes=a.demos + 1, image_size=a.size))
    specs = plan_episodes(cfg.run_config())
    outs = [fake_outcome(s, a.steps, a.size) for s in specs]
    args = col.env_args(cfg)
    work = Path(tempfile.mkdtemp(dir=Path.cwd(), prefix=".safety-cost-"))  # the disk results go to
    try:
        t = time.perf_counter()
        with h5py.File(work / "in_place.hdf5", "w") as f:
            f.create_group("data")
            for o in outs[:-1]:
                col._write_demo(f["data"], o)
                col._update_index(f, {})
                f.flush()
        in_place = (time.perf_counter() - t) / a.demos
        out = work / "journalled.hdf5"
        journal = col._Journal(out, args)
        journal.open()
        t = time.perf_counter()
        for o in outs[:-1]:
            journal.add_demo(o)
        parts = (time.perf_counter() - t) / a.demos
        t = time.perf_counter()
        col._merge(out, args, journal, {})
        merge = (time.perf_counter() - t) / a.demos
        journal = col._Journal(out, args)
        journal.open()
        t = time.perf_counter()
        journal.add_demo(outs[-1])
        col._merge(out, args, journal, {})
        session = time.perf_counter() - t
        mib = out.stat().st_size / 2**20
    finally:
        shutil.rmtree(work)
    print(f"collect, {a.demos} demos x {a.steps} steps at {a.size} px ({mib:.1f} MiB):")
    print(
        f"  in place {in_place * 1e3:.1f} ms/demo; "
        f"journal {parts * 1e3:.1f} + merge {merge * 1e3:.1f} ms/demo"
    )
    print(f"  a later session adding one demo to the {mib:.1f} MiB file: {session * 1e3:.0f} ms")

    model = mujoco.MjModel.from_xml_string(
        "<mujoco><worldbody><body><freejoint/><geom size='.1'/></body></worldbody></mujoco>"
    )
    data = mujoco.MjData(model)
    n = 100_000
    new = timeit.timeit(lambda: check_simulation(data), number=n) / n
    old = timeit.timeit(lambda: data.warning[mujoco.mjtWarning.mjWARN_BADQACC].number > 0, number=n) / n
    print(f"run: instability check per env step {new * 1e6:.1f} us (the qacc-only check: {old * 1e6:.1f} us)")


if __name__ == "__main__":
    main()
