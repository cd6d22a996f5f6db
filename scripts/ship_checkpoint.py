"""Copy a trained DiVLA checkpoint into the repository as a small fp16 reference checkpoint.

    .venv/bin/python scripts/ship_checkpoint.py runs/train/divla-bin_picking checkpoints/divla-bin_picking

Keeps what evaluation needs (config, fp16 safetensors, tokenizer) plus the training record
(divla_meta.json with the command, train_log.jsonl, losses.png); drops the optimiser state and the
fp32 periodic checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from divla_eval.divla.policy import DiVLAPolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--command", default="", help="the exact training command, for the record")
    args = parser.parse_args()
    policy = DiVLAPolicy.from_pretrained(args.src)
    meta = json.loads((args.src / "divla_meta.json").read_text())
    meta.update(shipped_from=str(args.src), dtype="float16")
    if args.command:
        meta["command"] = args.command
    policy.save_pretrained(args.dst, half=True, meta=meta)
    for name in ("train_log.jsonl", "losses.png"):
        if (args.src / name).is_file():
            shutil.copy2(args.src / name, args.dst / name)
    size = sum(p.stat().st_size for p in args.dst.iterdir()) / 1e6
    print(f"wrote {args.dst} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
