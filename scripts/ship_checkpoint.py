"""Copy a trained checkpoint (DiVLA or a baseline) into the repository as a small fp16 checkpoint.

    .venv/bin/python scripts/ship_checkpoint.py runs/train/divla-bin_picking checkpoints/divla-bin_picking

Keeps what evaluation needs (config, fp16 safetensors, tokenizer or text-encoder record) plus the
training record (the policy's <policy>_meta.json with the command, train_log.jsonl, losses.png);
drops the optimiser state and the fp32 periodic checkpoint. `runs/` is not in git, so a checkpoint
that is not shipped is lost with the machine: the reference scripts ship every model they train and
evaluate the shipped copy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from divla_eval.checkpoint import SIGNATURE_KEYS, CheckpointError, read_config
from divla_eval.policy import POLICIES


def policy_of(path: Path) -> str:
    """The registered policy a checkpoint directory belongs to, from its config.json's signature key."""
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a checkpoint: no config.json")
    config = read_config(path)
    for name, key in SIGNATURE_KEYS.items():
        if key in config:
            return name
    raise CheckpointError(f"{path}/config.json belongs to none of {', '.join(SIGNATURE_KEYS)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--command", default="", help="the exact training command, for the record")
    args = parser.parse_args()
    try:
        name = policy_of(args.src)
        factory = POLICIES.get(name)  # a LearnedPolicy: every policy with a checkpoint signature is one
        policy = factory.from_pretrained(args.src)
    except CheckpointError as exc:  # bad input: one line and exit code 2, as everywhere in the project
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    meta_file = args.src / factory.meta_file
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    meta.update(shipped_from=str(args.src), dtype="float16")
    if args.command:
        meta["command"] = args.command
    policy.save_pretrained(args.dst, half=True, meta=meta)
    for extra in ("train_log.jsonl", "losses.png"):
        if (args.src / extra).is_file():
            shutil.copy2(args.src / extra, args.dst / extra)
    size = sum(p.stat().st_size for p in args.dst.iterdir()) / 1e6
    print(f"wrote {args.dst} ({name}, {size:.1f} MB)")


if __name__ == "__main__":
    main()
