#!/usr/bin/env bash
# The baselines trained on the same demonstrations with the same budget as the DiVLA reference of the
# task (7000 steps of batch 32, one torch thread), then evaluated like it.
#
#   scripts/baseline_reference.sh [openvla|octo|diffusion_policy ...]   (default: all three)
#   TASK=multitask scripts/baseline_reference.sh [...]
#
# bin_picking (default): the 300 seen demos of scripts/divla_reference.sh, then the 102 unseen objects.
# multitask: the 5 x 60 demos of scripts/divla_multitask.sh (one model for the five sub-tasks), then
# 100 episodes per sub-task. Run the DiVLA script of the task first: it collects the demos.
# Training resumes from its last checkpoint and evaluation from its last episode when rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
task=${TASK:-bin_picking}
policies=("$@")
[ ${#policies[@]} -eq 0 ] && policies=(openvla octo diffusion_policy)
SUBTASKS=(select_object flip_pot cube_to_colour_box cup_on_plate cube_in_box)
case "$task" in
  bin_picking) demos=(--demos data/bin_picking-seen-300-v2.hdf5); tag=bp-v2 ;;
  multitask)
    demos=()
    for t in "${SUBTASKS[@]}"; do demos+=(--demos "data/multitask-$t-60.hdf5"); done
    tag=multitask ;;
  *) echo "TASK must be bin_picking or multitask, not '$task'" >&2; exit 2 ;;
esac
for policy in "${policies[@]}"; do
  out=runs/train/$policy-$tag-7k
  .venv/bin/divla-eval train --policy "$policy" --task "$task" "${demos[@]}" --out "$out" \
      --steps 7000 --threads 1
  if [[ $task == bin_picking ]]; then
    .venv/bin/divla-eval run --task bin_picking --objects unseen --policy "$policy" --checkpoint "$out" \
        --workers "${WORKERS:-2}" --out "results/$policy/bin_picking-unseen-7k"
    .venv/bin/divla-eval report "results/$policy/bin_picking-unseen-7k"
  else
    for t in "${SUBTASKS[@]}"; do
      .venv/bin/divla-eval run --task multitask --split "$t" --episodes 100 --policy "$policy" \
          --checkpoint "$out" --workers "${WORKERS:-2}" --no-progress --out "results/$policy/multitask-$t-7k"
      .venv/bin/divla-eval report "results/$policy/multitask-$t-7k"
    done
  fi
done
