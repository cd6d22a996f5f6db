#!/usr/bin/env bash
# Learning curves of the reference policies on multitask (issue 25): 200 demos per sub-task, one long
# training at a constant learning rate with a snapshot every 5000 steps, every snapshot evaluated on one
# fixed grid (results/curves/POLICY-multitask), the last one shipped as checkpoints/POLICY-multitask-v2.
# Now the experiments POLICY-multitask-curve (divla_eval/experiments.py):
#   [STEPS=70000] [EPISODES=20] [CURVE_EVERY=1] bash scripts/learning_curve.sh POLICY [demos|train|curve|ship|all]
#   = divla-eval experiment POLICY-multitask-curve --stage STAGE [--steps N] [--episodes N] [--curve-every K]
#   POLICY: divla, diffusion_policy, openvla or octo. EVERY and DEMOS are fixed by the experiment.
set -euo pipefail
cd "$(dirname "$0")/.."
policy=${1:?usage: scripts/learning_curve.sh divla|diffusion_policy|openvla|octo [demos|train|curve|ship|all]}
stage=${2:-all}
if [[ ${EVERY:-5000} != 5000 || ${DEMOS:-200} != 200 ]]; then
  echo "EVERY and DEMOS are part of the experiment $policy-multitask-curve (divla_eval/experiments.py)" >&2
  exit 2
fi
exec .venv/bin/divla-eval experiment "$policy-multitask-curve" --stage "${stage/#demos/collect}" \
    ${STEPS:+--steps "$STEPS"} ${EPISODES:+--episodes "$EPISODES"} ${CURVE_EVERY:+--curve-every "$CURVE_EVERY"}
