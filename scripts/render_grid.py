"""Render the front camera of every task (rows) under every perturbation at its highest level (columns).

    .venv/bin/python scripts/render_grid.py --out results/scene_grid.png

Each cell is episode 0 of the task's first split and difficulty, seed 0: the exact first frame a policy
sees. This is how results/scene_grid.png was made.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/scene_grid.png"))
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--level", type=int, default=3)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from divla_eval.envs.perturbations import PERTURBATIONS
    from divla_eval.tasks import TASKS, get_task, make_env
    from divla_eval.tasks.base import EpisodeSpec

    columns = ["none", *PERTURBATIONS.names()]
    tasks = TASKS.names()
    fig, axes = plt.subplots(len(tasks), len(columns), figsize=(2.0 * len(columns), 2.1 * len(tasks)))
    for row, name in enumerate(tasks):
        task = get_task(name)
        split, difficulty = task.splits[0], task.difficulties[0]
        env = make_env(name, split, difficulty, cameras=("front",), image_size=args.size)
        for col, pert in enumerate(columns):
            perturbations = () if pert == "none" else ((pert, args.level),)
            spec = EpisodeSpec(name, split, 0, 0, difficulty, perturbations)
            obs, _ = env.reset(options={"episode": spec})
            ax = axes[row, col]
            ax.imshow(obs["front"])
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(pert if pert == "none" else f"{pert}:{args.level}", fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{name}\n({split})", fontsize=9)
        env.close()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
