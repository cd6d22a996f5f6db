"""Open-loop check of any saved policy on recorded demonstrations: replay each demo's observations in
the order an episode would show them (a call every `execute_steps` steps, the steps before a call
handed to a history policy's `observe`), and compare the first `execute_steps` predicted actions of
each call with the recorded ones (and a generated phrase with the recorded one, for policies that
reason). Separates "the model does not fit the data" (large error on `--mask train`), "it does not
generalise to new scenes" (large error only on `--mask valid`, the demos training held out) and
"closed-loop errors compound" (small error in both, low success anyway). `--swap-images` shows each
demo another demo's camera images: a policy that looks where the objects are errs much more then, one
that replays a typical motion from its proprioception hardly changes.

    .venv/bin/python scripts/openloop.py --policy divla \
        runs/train/divla-multitask-curve/snapshots/step-0015000 \
        data/multitask-flip_pot-200.hdf5 data/multitask-select_object-200.hdf5 --mask valid

Prints one row per demo file and a total: calls, mean |error| per action dimension, the share of
calls whose first gripper command has the recorded sign, and the phrase match rate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np
import torch

from divla_eval.data.demos import demo_names, episode_calls, open_demos
from divla_eval.errors import run_script
from divla_eval.policy import make_policy


def replay(
    policy, demo: h5py.Group, images_from: h5py.Group | None = None
) -> tuple[list[np.ndarray], list[bool], list[bool]]:
    """One demo, open loop: |predicted - recorded| of each call's executed actions, whether the first
    gripper command's sign matches, and whether the phrase matches (None-free: only policies that
    return a phrase add to it). `images_from`: another demo whose camera images (of the same step, or
    its last) replace this one's, everything else kept: how much the policy's actions depend on what
    it sees."""
    actions = demo["actions"][:]
    reasoning = demo["reasoning"].asstr()[:] if "reasoning" in demo else None
    errors, gripper, phrase = [], [], []
    k = max(1, policy.metadata.execute_steps)
    for t, obs in episode_calls(policy, demo, images_from=images_from):
        chunk = policy.infer(obs)
        n = min(k, len(chunk.actions), len(actions) - t)
        errors.append(np.abs(np.asarray(chunk.actions[:n]) - actions[t : t + n]).mean(0))
        gripper.append(bool(np.sign(chunk.actions[0][-1]) == np.sign(actions[t][-1])))
        if reasoning is not None and getattr(chunk, "reasoning", None) is not None:
            phrase.append(chunk.reasoning == reasoning[t])
    return errors, gripper, phrase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("demos", nargs="+")
    parser.add_argument("--policy", required=True, help="registered name: divla, diffusion_policy ...")
    parser.add_argument("--mask", default="valid", help="valid (held out) or train (seen in training)")
    parser.add_argument("--demos-to-check", type=int, default=3, help="per demo file")
    parser.add_argument(
        "--swap-images",
        action="store_true",
        help="show each demo the camera images of the next checked demo of its file (same step): the "
        "error's rise says how much the actions depend on the images",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    policy = make_policy(args.policy, args.checkpoint)
    swapped = ", images of the next demo" if args.swap_images else ""
    print(f"{args.policy} {args.checkpoint}, {args.mask} demos, {args.demos_to_check} per file{swapped}")
    print("file | calls | mean |error| (x y z rx ry rz gripper) | gripper sign | phrase")
    totals: list[list] = [[], [], []]
    for path in args.demos:
        with open_demos(path) as f:
            rows: list[list] = [[], [], []]
            names = demo_names(f, path, args.mask)[: args.demos_to_check]
            for i, name in enumerate(names):
                other = f["data"][names[(i + 1) % len(names)]] if args.swap_images else None
                for acc, got in zip(rows, replay(policy, f["data"][name], other), strict=True):
                    acc.extend(got)
        for acc, got in zip(totals, rows, strict=True):
            acc.extend(got)
        print(_row(Path(path).stem, *rows))
    print(_row("all", *totals))


def _row(label: str, errors: list, gripper: list, phrase: list) -> str:
    e = np.round(np.mean(errors, axis=0), 3)
    said = f"{np.mean(phrase):.0%}" if phrase else "-"
    return f"{label} | {len(errors)} | {e} | {np.mean(gripper):.0%} | {said}"


if __name__ == "__main__":
    run_script(main, "openloop.py")
