#!/usr/bin/env bash
# DiVLA on the paper's five Franka tasks, one model for all of them (issue 4): expert demonstrations
# per sub-task, one training run on all five files together, the fp16 export, and an evaluation of
# 100 episodes per sub-task. Same recipe and budget as the bin-picking reference (7000 steps of batch
# 32, alpha 1, 8 noise draws per observation). Every step resumes where it stopped when rerun.
#
#   scripts/divla_multitask.sh [demos|train|eval|eval-visual|all]   (default: all)
#       eval-visual: the 100 episodes per sub-task again under distractors, background and lighting
#       at level 3 (the paper's three visual-generalisation conditions)
#   NOINJ=1 scripts/divla_multitask.sh [train|eval|eval-visual]   the reasoning-injection ablation
#       (TinyVLA's design: the action head gets no FiLM from the reasoning), same demos and recipe
#   EPISODES=N episodes per cell (default 100); WORKERS=N processes (default 2)
# The demo files, cells and run-directory names come from scripts/lib/recipes.sh, shared with
# TASK=multitask scripts/baseline_reference.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/recipes.sh
recipe multitask
name=divla-multitask
options=(--model-option diffusion_samples=8 --model-option alpha=1.0)
if [[ ${NOINJ:-0} == 1 ]]; then
  name=divla-multitask-noinj
  options+=(--model-option reasoning_injection=false)
fi
out=runs/train/$name
stage=${1:-all}
demos=()
for f in "${demo_files[@]}"; do demos+=(--demos "$f"); done
train_cmd=(.venv/bin/divla-eval train --policy divla --task multitask "${demos[@]}" --out "$out"
           --steps 7000 --threads 1 "${options[@]}")

if [[ $stage == demos || $stage == all ]]; then
  for t in "${MULTITASK_SUBTASKS[@]}"; do  # 60 demos per sub-task: 300, as for bin picking
    .venv/bin/divla-eval collect --task multitask --split "$t" --episodes 60 \
        --out "data/multitask-$t-60.hdf5" --workers "${WORKERS:-2}" --no-progress
  done
fi
if [[ $stage == train || $stage == all ]]; then
  require_demos
  "${train_cmd[@]}"
  .venv/bin/python scripts/ship_checkpoint.py "$out" "checkpoints/$name" --command "${train_cmd[*]}"
fi
if [[ $stage == eval || $stage == all ]]; then
  for cell in "${cells[@]}"; do
    run_cell multitask "$cell" divla "checkpoints/$name" "results/divla/${name#divla-}-$(cell_name "$cell")"
  done
fi
if [[ $stage == eval-visual || $stage == all ]]; then
  for pert in "${VISUAL_CONDITIONS[@]}"; do
    for cell in "${cells[@]}"; do
      run_cell multitask "$cell" divla "checkpoints/$name" \
          "results/divla/${name#divla-}-$(cell_name "$cell")-${pert}3" --perturb "$pert:3"
    done
  done
fi
