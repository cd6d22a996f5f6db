#!/usr/bin/env bash
# DiVLA on factory sorting or bimanual bussing with the bin-picking recipe (7000 steps, alpha 1, 8 noise
# draws), then the cells of the paper's table for the task (sorting: 150 easy + 150 hard seen demos,
# easy/hard x seen/mixed; bussing: 300 seen demos, seen and mixed).
# Now the experiments divla-sorting, divla-bussing and their -noinj ablations (divla_eval/experiments.py):
#   scripts/divla_task.sh sorting|bussing [demos|train|eval|all]   (default: all)
#   NOINJ=1, EPISODES=N, WORKERS=N, CELLS="easy-seen easy-mixed" as flags:
#   divla-eval experiment divla-TASK[-noinj] --stage STAGE [--episodes N] [--workers N] [--cells ...]
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:?usage: scripts/divla_task.sh sorting|bussing [demos|train|eval|all]}
stage=${2:-all}
if [[ ${NOINJ:-0} == 1 ]]; then name=divla-$task-noinj; else name=divla-$task; fi
# shellcheck disable=SC2086  # CELLS: one word per cell
exec .venv/bin/divla-eval experiment "$name" --stage "${stage/#demos/collect}" ${EPISODES:+--episodes "$EPISODES"} \
    ${WORKERS:+--workers "$WORKERS"} ${CELLS:+--cells $CELLS} "${@:3}"
