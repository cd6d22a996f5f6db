#!/usr/bin/env bash
# The scripted-expert reference grid behind results/experts/ and README's expert table: every task x
# split x difficulty with no perturbation and with each perturbation at its highest level (3).
#
#   scripts/reference_runs.sh [rest|sorting|all]   (two streams, so two cores can share the work)
#
# Distractors change the physics, so each cell runs them with --matched-control: the same episodes
# with and without, which gives the unperturbed cell too. Background, lighting, camera and table
# only change pixels; the expert renders nothing, so its rollouts under them are bit-identical to
# the unperturbed ones (tests/test_perturbations.py checks this for every task). They are still run:
# one run per perturbation for the cheap tasks, the four composed in one run for sorting and bussing.
# Every run resumes where it stopped; `divla-eval summary` then writes results/experts/summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=results/experts
stream=${1:-all}
VISUAL=(background lighting camera table)
ALL_VISUAL=(--perturb background:3 --perturb lighting:3 --perturb camera:3 --perturb table:3)
run() { .venv/bin/divla-eval run --policy scripted --no-progress --workers 1 "$@"; }

rest() {
  for split in seen mixed; do
    run --task bussing --split "$split" --episodes 50 --perturb distractors:3 --matched-control \
        --out "$out/bussing-$split-distractors3"
  done
  for split in select_object flip_pot cube_to_colour_box cup_on_plate cube_in_box; do
    run --task multitask --split "$split" --episodes 50 --perturb distractors:3 --matched-control \
        --out "$out/multitask-$split-distractors3"
  done
  # 72 = each of the 36 held-out instructions twice, with different object layouts
  run --task novel_instruction --split novel --episodes 72 --perturb distractors:3 --matched-control \
      --out "$out/novel_instruction-novel-distractors3"
  run --task bin_picking --split unseen --episodes 102 --perturb distractors:3 --matched-control \
      --out "$out/bin_picking-unseen-distractors3"
  run --task bin_picking --split seen --episodes 52 --perturb distractors:3 --matched-control \
      --out "$out/bin_picking-seen-distractors3"
  for pert in "${VISUAL[@]}"; do
    for split in unseen seen; do
      run --task bin_picking --split "$split" --episodes 50 --perturb "$pert:3" \
          --out "$out/bin_picking-$split-${pert}3"
    done
    for split in select_object flip_pot cube_to_colour_box cup_on_plate cube_in_box; do
      run --task multitask --split "$split" --episodes 50 --perturb "$pert:3" \
          --out "$out/multitask-$split-${pert}3"
    done
    run --task novel_instruction --split novel --episodes 72 --perturb "$pert:3" \
        --out "$out/novel_instruction-novel-${pert}3"
  done
  for split in seen mixed; do
    run --task bussing --split "$split" --episodes 50 "${ALL_VISUAL[@]}" --out "$out/bussing-$split-visual3"
  done
  # the split demonstrations are collected on (its 24 instructions, three layouts each)
  run --task novel_instruction --split train --episodes 72 --perturb distractors:3 --matched-control \
      --out "$out/novel_instruction-train-distractors3"
  run --task novel_instruction --split train --episodes 72 "${ALL_VISUAL[@]}" \
      --out "$out/novel_instruction-train-visual3"
}

sorting() {
  for difficulty in easy hard; do
    for split in seen unseen mixed; do
      run --task sorting --difficulty "$difficulty" --split "$split" --episodes 50 \
          --perturb distractors:3 --matched-control --out "$out/sorting-$difficulty-$split-distractors3"
    done
  done
  for difficulty in easy hard; do
    for split in seen unseen mixed; do
      run --task sorting --difficulty "$difficulty" --split "$split" --episodes 50 "${ALL_VISUAL[@]}" \
          --out "$out/sorting-$difficulty-$split-visual3"
    done
  done
}

case "$stream" in
  rest) rest ;;
  sorting) sorting ;;
  all) rest; sorting ;;
  *) echo "usage: $0 [rest|sorting|all]" >&2; exit 2 ;;
esac
for d in "$out"/*/; do .venv/bin/divla-eval report "$d" >/dev/null; done
.venv/bin/divla-eval summary "$out"
