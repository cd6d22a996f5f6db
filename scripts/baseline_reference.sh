#!/usr/bin/env bash
# The baselines trained on the same demos with the same budget as the DiVLA reference of the task (7000
# steps of batch 32, one torch thread), shipped as checkpoints/POLICY-TAG (fp16) and evaluated on the
# same cells. Now the experiments POLICY-TASK (divla_eval/experiments.py; `divla-eval experiment ls`):
#   [TASK=T] [STAGE=S] scripts/baseline_reference.sh [openvla|octo|diffusion_policy ...]  (default: all three)
#   TASK: bin_picking (default), multitask, sorting, bussing; STAGE: train, eval, eval-visual, all
#   (default: train and eval; all: the three); EPISODES=N, WORKERS=N, CELLS="..." as flags:
#   divla-eval experiment POLICY-TASK --stage STAGE [--episodes N] [--workers N] [--cells ...]
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${STAGE:-train,eval}
if [[ $stage == all ]]; then stage=train,eval,eval-visual; fi  # the demos come from DiVLA's experiment
policies=("$@")
if [[ $# -eq 0 ]]; then policies=(openvla octo diffusion_policy); fi
for policy in "${policies[@]}"; do
  # shellcheck disable=SC2086  # CELLS: one word per cell
  .venv/bin/divla-eval experiment "$policy-${TASK:-bin_picking}" --stage "$stage" \
      ${EPISODES:+--episodes "$EPISODES"} ${WORKERS:+--workers "$WORKERS"} ${CELLS:+--cells $CELLS}
done
