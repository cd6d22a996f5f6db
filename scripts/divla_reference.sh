#!/usr/bin/env bash
# The shipped DiVLA reference checkpoint (checkpoints/divla-bin_picking) and its evaluation, end to end:
# expert demonstrations on the seen objects, training, the fp16 export, evaluation on the unseen and
# the seen objects. About 1 h 45 min on 2 cores (8 min demos, 64 min training, ~30 min evaluation).
# Training is seeded; on another machine (other thread counts, other BLAS) the weights can still differ
# in the last bits, so expect the same numbers within their confidence intervals, not bit for bit.
set -euo pipefail
cd "$(dirname "$0")/.."
demos=data/bin_picking-seen-300-v2.hdf5
out=runs/train/divla-bp-v2-s8a1
# alpha 1 (not the paper's 10) and 8 noise draws per observation: see README, "Train and evaluate DiVLA"
train_cmd=(.venv/bin/divla-eval train --policy divla --task bin_picking --demos "$demos" --out "$out"
           --steps 7000 --threads 1 --model-option diffusion_samples=8 --model-option alpha=1.0)
.venv/bin/divla-eval collect --task bin_picking --objects seen --episodes 300 --out "$demos" --workers 2
"${train_cmd[@]}"
.venv/bin/python scripts/ship_checkpoint.py "$out" checkpoints/divla-bin_picking --command "${train_cmd[*]}"
for split in unseen seen; do
  .venv/bin/divla-eval run --task bin_picking --objects "$split" --policy divla \
      --checkpoint checkpoints/divla-bin_picking --workers 2 --out "results/divla/bin_picking-$split-v2"
  .venv/bin/divla-eval report "results/divla/bin_picking-$split-v2"
done
