#!/usr/bin/env bash
# The random policy, the lower bound of every paper table, on the same cells as the trained policies.
# Now the experiments random-TASK (divla_eval/experiments.py):
#   [TASK=T] [STAGE=eval|eval-visual] [EPISODES=N] [WORKERS=N] [CELLS="..."] scripts/random_reference.sh
#   = divla-eval experiment random-TASK --stage STAGE [--episodes N] [--workers N] [--cells ...]
#   TASK: bin_picking (default), multitask, sorting, bussing; records in results/random/TASK-CELL[-CONDITION3]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC2086  # CELLS: one word per cell
exec .venv/bin/divla-eval experiment "random-${TASK:-bin_picking}" --stage "${STAGE:-eval}" \
    ${EPISODES:+--episodes "$EPISODES"} ${WORKERS:+--workers "$WORKERS"} ${CELLS:+--cells $CELLS} "$@"
