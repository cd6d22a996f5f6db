#!/usr/bin/env bash
# Demonstrations per hour for every task on this machine (issue 3), into results/demo_rates.md; the demo
# files go to data/rates/ (ignored by git): delete them to measure again.
# Now the experiment demo-rates (divla_eval/experiments.py):
#   scripts/demo_rates.sh [EPISODES]    (default 10 per task) = divla-eval experiment demo-rates [--episodes N]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/divla-eval experiment demo-rates ${1:+--episodes "$1"}
