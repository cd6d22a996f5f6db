#!/usr/bin/env bash
# Learning curves of the reference policies (issue 25): one long training per policy with a constant
# learning rate after warm-up and a snapshot every EVERY steps, then every snapshot evaluated on one
# fixed grid (`divla-eval curve`). A constant schedule makes the snapshot at step s the model an s-step
# run would have made, so one run gives the whole curve and can be extended by raising STEPS.
#
#   [STEPS=70000] [EVERY=5000] [EPISODES=20] [CURVE_EVERY=1] \
#       bash scripts/learning_curve.sh POLICY [demos|train|curve|ship|all]      (default: all)
#   POLICY: divla, diffusion_policy, openvla or octo. Task: multitask (the paper's five Franka tasks),
#   DEMOS=200 expert demos per sub-task (data/multitask-<subtask>-200.hdf5, one worker), equal for every
#   policy; every policy trains with batch 32, lr 3e-4, one torch thread (beside other jobs).
#   curve: EPISODES per sub-task and snapshot (same seeds for every snapshot), every CURVE_EVERY-th
#   snapshot; results/curves/POLICY-multitask/ (curve.md, curve.csv, curve.png and the runs).
#   ship: the last snapshot as checkpoints/POLICY-multitask-v2 (fp16), with the training record.
# Every stage resumes where it stopped when rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/recipes.sh
policy=${1:?usage: scripts/learning_curve.sh divla|diffusion_policy|openvla|octo [demos|train|curve|ship|all]}
stage=${2:-all}
case "$policy" in
  divla) options=(--model-option diffusion_samples=8 --model-option alpha=1.0) ;;  # as the 7k reference
  diffusion_policy | openvla | octo) options=() ;;
  *) echo "POLICY must be one of divla, diffusion_policy, openvla, octo; got '$policy'" >&2; exit 2 ;;
esac
case "$stage" in
  demos | train | curve | ship | all) ;;
  *) echo "stage must be one of demos, train, curve, ship, all; got '$stage'" >&2; exit 2 ;;
esac
n=${DEMOS:-200}
out=runs/train/$policy-multitask-curve
demos=()
for t in "${MULTITASK_SUBTASKS[@]}"; do demos+=(--demos "data/multitask-$t-$n.hdf5"); done

if [[ $stage == demos || $stage == all ]]; then
  for t in "${MULTITASK_SUBTASKS[@]}"; do
    .venv/bin/divla-eval collect --task multitask --split "$t" --episodes "$n" \
        --out "data/multitask-$t-$n.hdf5" --workers 1 --no-progress
  done
fi
train_cmd=(.venv/bin/divla-eval train --policy "$policy" --task multitask "${demos[@]}" --out "$out"
           --steps "${STEPS:-70000}" --schedule constant --snapshot-every "${EVERY:-5000}"
           --threads 1 --no-progress "${options[@]}")
if [[ $stage == train || $stage == all ]]; then
  "${train_cmd[@]}"
fi
if [[ $stage == curve || $stage == all ]]; then
  .venv/bin/divla-eval curve "$out" --task multitask --episodes "${EPISODES:-20}" \
      --every "${CURVE_EVERY:-1}" --threads 1 --no-progress --out "results/curves/$policy-multitask"
fi
if [[ $stage == ship || $stage == all ]]; then
  last=$(ls -d "$out"/snapshots/step-* | tail -n 1)
  .venv/bin/python scripts/ship_checkpoint.py "$last" "checkpoints/$policy-multitask-v2" \
      --command "${train_cmd[*]} (snapshot ${last##*/})"
  cp "$out/train_log.jsonl" "checkpoints/$policy-multitask-v2/"  # the whole run's losses, for the record
fi
