#!/usr/bin/env bash
# The scripted-expert reference runs behind results/experts/ (README's expert table). Each line is one
# `divla-eval run`; reports are written next to the records. Rerunning resumes finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=results/experts
run() { .venv/bin/divla-eval run --no-progress --workers 2 "$@"; }
for pert in distractors background lighting camera table; do
  run --task bin_picking --objects unseen --episodes 50 --perturb "$pert:3" --matched-control \
      --out "$out/bin_picking-unseen-${pert}3"
done
for split in select_object flip_pot cube_to_colour_box cup_on_plate cube_in_box; do
  run --task multitask --split "$split" --out "$out/multitask-$split"
done
run --task novel_instruction --split novel --out "$out/novel_instruction-novel"
for split in seen mixed; do
  run --task bussing --split "$split" --episodes 50 --out "$out/bussing-$split"
done
for d in "$out"/*/; do .venv/bin/divla-eval report "$d" >/dev/null; done
