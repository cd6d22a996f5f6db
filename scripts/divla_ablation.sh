#!/usr/bin/env bash
# The reasoning-injection ablation on bin picking (issue 4): the shipped recipe with
# reasoning_injection=false, shipped as checkpoints/divla-bin_picking-noinj, and both checkpoints on the
# 102 unseen objects, unperturbed and under each visual perturbation at level 3. WORKERS=N (default 2).
# Now the experiments divla-bin_picking-noinj and divla-bin_picking (divla_eval/experiments.py):
#   divla-eval experiment divla-bin_picking-noinj --stage train,eval,eval-visual
#   divla-eval experiment divla-bin_picking --stage eval,eval-visual --cells unseen
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/divla-eval experiment divla-bin_picking-noinj --stage train,eval,eval-visual ${WORKERS:+--workers "$WORKERS"} "$@"
exec .venv/bin/divla-eval experiment divla-bin_picking --stage eval,eval-visual --cells unseen ${WORKERS:+--workers "$WORKERS"} "$@"
