#!/usr/bin/env bash
# DiVLA on factory sorting or bimanual bussing, with the bin-picking reference recipe (300 expert demos
# on seen objects, 7000 steps of batch 32, alpha 1, 8 noise draws per observation), then the
# evaluation cells of the paper's table for the task. Every stage resumes where it stopped.
#
#   scripts/divla_task.sh sorting|bussing [demos|train|eval|all]   (default: all)
#       sorting: 150 easy + 150 hard demos on seen objects; evaluated easy/hard x seen/mixed
#       bussing: 300 demos on seen objects (the two-arm head); evaluated on seen and mixed
#   EPISODES=N (default 100) episodes per evaluation cell; WORKERS=N (default 2) processes for
#   demos and evaluation; NOINJ=1 the reasoning-injection ablation on the same demos; CELLS="NAME ..."
#   only those evaluation cells (e.g. CELLS="easy-seen easy-mixed").
# The baselines train on the same files and run the same cells: TASK=sorting scripts/baseline_reference.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/recipes.sh
task=${1:?usage: scripts/divla_task.sh sorting|bussing [demos|train|eval|all]}
stage=${2:-all}
workers=${WORKERS:-2}
case "$task" in
  sorting)
    collect() {
      for d in easy hard; do
        .venv/bin/divla-eval collect --task sorting --difficulty "$d" --split seen --episodes 150 \
            --out "data/sorting-$d-seen-150.hdf5" --workers "$workers" --no-progress
      done
    } ;;
  bussing)
    collect() {
      .venv/bin/divla-eval collect --task bussing --split seen --episodes 300 \
          --out data/bussing-seen-300.hdf5 --workers "$workers" --no-progress
    } ;;
  *) echo "task must be sorting or bussing, not '$task'" >&2; exit 2 ;;
esac
recipe "$task"
name=divla-$task
options=(--model-option diffusion_samples=8 --model-option alpha=1.0)
if [[ ${NOINJ:-0} == 1 ]]; then
  name=$name-noinj
  options+=(--model-option reasoning_injection=false)
fi
demos=()
for f in "${demo_files[@]}"; do demos+=(--demos "$f"); done
train_cmd=(.venv/bin/divla-eval train --policy divla --task "$task" "${demos[@]}" --out "runs/train/$name"
           --steps 7000 --threads 1 "${options[@]}")

if [[ $stage == demos || $stage == all ]]; then collect; fi
if [[ $stage == train || $stage == all ]]; then
  require_demos
  "${train_cmd[@]}"
  .venv/bin/python scripts/ship_checkpoint.py "runs/train/$name" "checkpoints/$name" --command "${train_cmd[*]}"
fi
if [[ $stage == eval || $stage == all ]]; then
  for cell in "${cells[@]}"; do
    run_cell "$task" "$cell" divla "checkpoints/$name" "results/divla/${name#divla-}-$(cell_name "$cell")"
  done
fi
