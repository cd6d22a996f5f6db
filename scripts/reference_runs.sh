#!/usr/bin/env bash
# The scripted-expert reference grid behind results/experts/: every task x split x difficulty under
# distractors (with a matched control) and each visual perturbation at level 3, then
# results/experts/summary.md. Now the experiments experts and experts-sorting (divla_eval/experiments.py):
#   scripts/reference_runs.sh [rest|sorting|all]   (two streams, so two cores can share the work)
#   = divla-eval experiment experts (rest), divla-eval experiment experts-sorting (sorting)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-all}" in
  rest) names=(experts) ;;
  sorting) names=(experts-sorting) ;;
  all) names=(experts experts-sorting) ;;
  *) echo "usage: $0 [rest|sorting|all]" >&2; exit 2 ;;
esac
for name in "${names[@]}"; do .venv/bin/divla-eval experiment "$name"; done
