"""Open-loop check of a DiVLA checkpoint on held-out demonstrations: feed the recorded observations,
compare the first `execute_steps` predicted actions of each call with the recorded ones, and the
generated phrase with the recorded one. Separates "the model cannot fit the data" from "closed-loop
errors compound".

    .venv/bin/python scripts/divla_openloop.py runs/train/divla-bin_picking data/bin_picking-seen-150.hdf5
"""

from __future__ import annotations

import argparse

import h5py
import numpy as np
import torch

from divla_eval.divla.policy import DiVLAPolicy
from divla_eval.policy import Observation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("demos")
    parser.add_argument("--demos-to-check", type=int, default=3)
    parser.add_argument("--mask", default="valid", help="valid (held out) or train (seen in training)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy = DiVLAPolicy.from_pretrained(args.checkpoint)
    k = policy.metadata.execute_steps
    errors, same_phrase = [], []
    with h5py.File(args.demos, "r") as f:
        names = [n.decode() for n in f[f"mask/{args.mask}"][:]][: args.demos_to_check]
        for name in names:
            g = f["data"][name]
            instruction = str(g.attrs["instruction"])
            for t in range(0, len(g["actions"]) - k, k):
                images = {c: g[f"obs/{c}_image"][t] for c in policy.model.cfg.cameras}
                policy.reset(instruction, t)
                chunk = policy.infer(Observation(images, g["obs/proprio"][t], instruction, "panda"))
                errors.append(np.abs(chunk.actions[:k] - g["actions"][t : t + k]).mean(0))
                same_phrase.append(chunk.reasoning == g["reasoning"].asstr()[t])
    e = np.array(errors).mean(0)
    print(f"{len(errors)} calls on {len(names)} {args.mask} demos")
    print("mean |predicted - recorded| per action dim (x y z rx ry rz gripper):", np.round(e, 3))
    print(f"phrase equal to the recorded one: {np.mean(same_phrase):.1%}")


if __name__ == "__main__":
    main()
