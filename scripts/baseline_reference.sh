#!/usr/bin/env bash
# The baselines trained on the same demonstrations with the same budget as the DiVLA reference of the
# task (7000 steps of batch 32, one torch thread), then evaluated on the same cells.
#
#   [TASK=T] [STAGE=S] scripts/baseline_reference.sh [openvla|octo|diffusion_policy ...]
#       (default: all three policies)
#   TASK: bin_picking (default; the 102 unseen objects), multitask (100 episodes per sub-task),
#         sorting (easy/hard x seen/mixed), bussing (seen, mixed); see scripts/lib/recipes.sh
#   STAGE: train, eval, eval-visual (multitask or bin picking again under distractors, background
#          and lighting at level 3), or all; default: train and eval
#   EPISODES=N episodes per cell (default 100; bin picking: all 102); WORKERS=N (default 2);
#   CELLS="easy-seen easy-mixed" only those cells (names as in the run directories)
# Run DiVLA's script of the task first: it collects the demos. Training resumes from its last
# checkpoint and evaluation from its last episode when rerun. After training, the model is shipped as
# an fp16 copy in checkpoints/POLICY-TAG (runs/ is not in git and goes with the machine) and the
# evaluation stages read that copy, as DiVLA's scripts do. (The bin-picking and OpenVLA multitask cells
# of before this change read the fp32 run directory runs/train/POLICY-TAG-7k.)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/recipes.sh
task=${TASK:-bin_picking}
stage=${STAGE:-default}
recipe "$task"
policies=("$@")
[ ${#policies[@]} -eq 0 ] && policies=(openvla octo diffusion_policy)
demos=()
for f in "${demo_files[@]}"; do demos+=(--demos "$f"); done
for policy in "${policies[@]}"; do
  out=runs/train/$policy-$tag-7k
  shipped=checkpoints/$policy-$tag
  if [[ $stage == train || $stage == all || $stage == default ]]; then
    require_demos
    train_cmd=(.venv/bin/divla-eval train --policy "$policy" --task "$task" "${demos[@]}" --out "$out"
               --steps 7000 --threads 1)
    "${train_cmd[@]}"
    .venv/bin/python scripts/ship_checkpoint.py "$out" "$shipped" --command "${train_cmd[*]}"
  fi
  if [[ $stage == eval || $stage == all || $stage == default ]]; then
    for cell in "${cells[@]}"; do
      run_cell "$task" "$cell" "$policy" "$shipped" "results/$policy/$task-$(cell_name "$cell")-7k"
    done
  fi
  if [[ $stage == eval-visual || $stage == all ]]; then
    for pert in "${VISUAL_CONDITIONS[@]}"; do
      for cell in "${cells[@]}"; do
        run_cell "$task" "$cell" "$policy" "$shipped" \
            "results/$policy/$task-$(cell_name "$cell")-${pert}3-7k" --perturb "$pert:3"
      done
    done
  fi
done
