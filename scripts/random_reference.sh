#!/usr/bin/env bash
# The random policy, the lower bound of every paper table, on the same evaluation cells as the trained
# policies (scripts/lib/recipes.sh), so that each table row has a chance level beside it. Some tasks
# can be solved by chance (a pushed pot that falls upright counts as flipped); this row says how often.
#
#   [TASK=T] [STAGE=eval|eval-visual] [EPISODES=N] scripts/random_reference.sh
#   TASK: bin_picking (default), multitask, sorting, bussing; STAGE: eval (default) or eval-visual
#   (distractors, background and lighting at level 3); EPISODES=N per cell (default 100);
#   WORKERS=N (default 2); CELLS="NAME ..." only those cells. Records go to
#   results/random/TASK-CELL[-CONDITION3]; a rerun resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/recipes.sh
task=${TASK:-bin_picking}
stage=${STAGE:-eval}
recipe "$task"
case "$stage" in
  eval)
    for cell in "${cells[@]}"; do
      run_cell "$task" "$cell" random - "results/random/$task-$(cell_name "$cell")"
    done ;;
  eval-visual)
    for pert in "${VISUAL_CONDITIONS[@]}"; do
      for cell in "${cells[@]}"; do
        run_cell "$task" "$cell" random - "results/random/$task-$(cell_name "$cell")-${pert}3" \
            --perturb "$pert:3"
      done
    done ;;
  *) echo "STAGE must be eval or eval-visual, not '$stage'" >&2; exit 2 ;;
esac
