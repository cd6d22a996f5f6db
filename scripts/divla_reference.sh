#!/usr/bin/env bash
# The shipped DiVLA reference checkpoint (checkpoints/divla-bin_picking) and its evaluation, end to end:
# expert demos on the seen objects, training, the fp16 export, evaluation on the unseen and the seen
# objects (about 1 h 45 min on 2 cores). Training is seeded; on another machine (other thread counts,
# other BLAS) the weights can differ in the last bits: expect the same numbers within their CIs.
# Now the experiment divla-bin_picking (divla_eval/experiments.py); arguments go to it (e.g. --dry-run):
#   divla-eval experiment divla-bin_picking --stage collect,train,eval
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/divla-eval experiment divla-bin_picking --stage collect,train,eval "$@"
