#!/usr/bin/env bash
# The reasoning-injection ablation (issue 4): the shipped DiVLA recipe with reasoning_injection=false
# (the action head gets no FiLM from the reasoning embedding: TinyVLA's design), shipped as
# checkpoints/divla-bin_picking-noinj, and both checkpoints evaluated on the 102 unseen objects,
# unperturbed and under each visual perturbation at level 3. Training ~65 min on one core; each
# evaluation ~5 min with 2 workers. Resumable: rerunning skips finished steps and episodes.
set -euo pipefail
cd "$(dirname "$0")/.."
demos=data/bin_picking-seen-300-v2.hdf5
out=runs/train/divla-bp-v2-s8a1-noinj
train_cmd=(.venv/bin/divla-eval train --policy divla --task bin_picking --demos "$demos" --out "$out"
           --steps 7000 --threads 1 --model-option diffusion_samples=8 --model-option alpha=1.0
           --model-option reasoning_injection=false)
"${train_cmd[@]}"
.venv/bin/python scripts/ship_checkpoint.py "$out" checkpoints/divla-bin_picking-noinj --command "${train_cmd[*]}"
workers=${WORKERS:-2}
for ckpt in divla-bin_picking-noinj divla-bin_picking; do
  suffix=$([ "$ckpt" = divla-bin_picking ] && echo v2 || echo noinj)
  for pert in none lighting:3 background:3 distractors:3; do
    tag=$([ "$pert" = none ] && echo "" || echo "-${pert/:/}")
    perturb=$([ "$pert" = none ] && echo "" || echo "--perturb $pert")
    # shellcheck disable=SC2086
    .venv/bin/divla-eval run --task bin_picking --objects unseen --policy divla --checkpoint "checkpoints/$ckpt" \
        --workers "$workers" --no-progress $perturb --out "results/divla/bin_picking-unseen-$suffix$tag"
  done
done
