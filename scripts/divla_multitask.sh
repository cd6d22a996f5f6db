#!/usr/bin/env bash
# DiVLA on the paper's five Franka tasks, one model for all of them (issue 4): expert demonstrations
# per sub-task, one training run on all five files together, the fp16 export, and an evaluation of
# 100 episodes per sub-task. Same recipe and budget as the bin-picking reference (7000 steps of batch
# 32, alpha 1, 8 noise draws per observation). Every step resumes where it stopped when rerun.
#
#   scripts/divla_multitask.sh [demos|train|eval|eval-visual|all]   (default: all)
#       eval-visual: the 100 episodes per sub-task again under distractors, background and lighting
#       at level 3 (the paper's three visual-generalisation conditions)
#   NOINJ=1 scripts/divla_multitask.sh [train|eval]   the reasoning-injection ablation (TinyVLA's
#       design: the action head gets no FiLM from the reasoning), on the same demos and recipe
set -euo pipefail
cd "$(dirname "$0")/.."
SUBTASKS=(select_object flip_pot cube_to_colour_box cup_on_plate cube_in_box)
PER_TASK=${PER_TASK:-60}  # demos per sub-task (300 in all, as many as the bin-picking reference)
name=divla-multitask
options=(--option diffusion_samples=8 --option alpha=1.0)
if [[ ${NOINJ:-0} == 1 ]]; then
  name=divla-multitask-noinj
  options+=(--option reasoning_injection=false)
fi
out=runs/train/$name
stage=${1:-all}
demos=()
for t in "${SUBTASKS[@]}"; do demos+=(--demos "data/multitask-$t-$PER_TASK.hdf5"); done
train_cmd=(.venv/bin/divla-eval train --policy divla --task multitask "${demos[@]}" --out "$out"
           --steps 7000 --threads 1 "${options[@]}")

if [[ $stage == demos || $stage == all ]]; then
  for t in "${SUBTASKS[@]}"; do
    .venv/bin/divla-eval collect --task multitask --split "$t" --episodes "$PER_TASK" \
        --out "data/multitask-$t-$PER_TASK.hdf5" --workers 2 --no-progress
  done
fi
if [[ $stage == train || $stage == all ]]; then
  "${train_cmd[@]}"
  .venv/bin/python scripts/ship_checkpoint.py "$out" "checkpoints/$name" --command "${train_cmd[*]}"
fi
if [[ $stage == eval || $stage == all ]]; then
  for t in "${SUBTASKS[@]}"; do
    .venv/bin/divla-eval run --task multitask --split "$t" --episodes 100 --policy divla \
        --checkpoint "checkpoints/$name" --workers "${WORKERS:-2}" --no-progress --out "results/divla/${name#divla-}-$t"
    .venv/bin/divla-eval report "results/divla/${name#divla-}-$t"
  done
fi
if [[ $stage == eval-visual || $stage == all ]]; then
  for pert in distractors background lighting; do
    for t in "${SUBTASKS[@]}"; do
      .venv/bin/divla-eval run --task multitask --split "$t" --episodes 100 --policy divla \
          --checkpoint "checkpoints/$name" --perturb "$pert:3" --workers "${WORKERS:-2}" --no-progress \
          --out "results/divla/${name#divla-}-$t-${pert}3"
    done
  done
fi
