#!/usr/bin/env bash
# The shipped DiVLA reference checkpoint (checkpoints/divla-bin_picking) and its evaluation, end to end:
# expert demonstrations on the seen objects, training, the fp16 export, evaluation on the unseen ones.
# Training is seeded; on another machine (other thread counts, other BLAS) the weights can still differ
# in the last bits, so expect the same numbers within their confidence intervals, not bit for bit.
set -euo pipefail
cd "$(dirname "$0")/.."
demos=data/bin_picking-seen-150.hdf5
train_cmd=(.venv/bin/divla-eval train --policy divla --task bin_picking --demos "$demos"
           --out runs/train/divla-bin_picking --steps 5000 --batch-size 32)
.venv/bin/divla-eval collect --task bin_picking --objects seen --episodes 150 --out "$demos"
"${train_cmd[@]}"
.venv/bin/python scripts/ship_checkpoint.py runs/train/divla-bin_picking checkpoints/divla-bin_picking \
    --command "${train_cmd[*]}"
.venv/bin/divla-eval run --task bin_picking --objects unseen --policy divla \
    --checkpoint checkpoints/divla-bin_picking --workers 2 --out results/divla/bin_picking-unseen
.venv/bin/divla-eval report results/divla/bin_picking-unseen
