#!/usr/bin/env bash
# DiVLA on the paper's five Franka tasks, one model for all of them (issue 4): 60 expert demos per
# sub-task, one training on the five files (7000 steps, the bin-picking recipe), the fp16 export, 100
# episodes per sub-task, and (eval-visual) the same under distractors, background and lighting at 3.
# Now the experiments divla-multitask and divla-multitask-noinj (divla_eval/experiments.py):
#   scripts/divla_multitask.sh [demos|train|eval|eval-visual|all]   (default: all)
#   NOINJ=1: the reasoning-injection ablation; EPISODES=N, WORKERS=N, CELLS="flip_pot ..." as flags:
#   divla-eval experiment divla-multitask[-noinj] --stage STAGE [--episodes N] [--workers N] [--cells ...]
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
if [[ ${NOINJ:-0} == 1 ]]; then name=divla-multitask-noinj; else name=divla-multitask; fi
# shellcheck disable=SC2086  # CELLS: one word per cell
exec .venv/bin/divla-eval experiment "$name" --stage "${stage/#demos/collect}" ${EPISODES:+--episodes "$EPISODES"} \
    ${WORKERS:+--workers "$WORKERS"} ${CELLS:+--cells $CELLS} "${@:2}"
