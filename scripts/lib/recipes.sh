# Sourced by the reference scripts (DiVLA's and the baselines'), so that every policy of a task trains
# on the same demonstration files and is scored on the same evaluation cells, under the same names.

MULTITASK_SUBTASKS=(select_object flip_pot cube_to_colour_box cup_on_plate cube_in_box)
VISUAL_CONDITIONS=(distractors background lighting)  # the paper's visual-generalisation conditions

# recipe TASK sets, for the task:
#   demo_files  the demonstration files every policy trains on (collected by DiVLA's script of the task)
#   cells       the evaluation cells of the paper's table, each "DIFFICULTY SPLIT" ("-": no difficulty)
#   episodes    episodes per cell: EPISODES, else 100; empty for bin picking (all 102 unseen objects)
#   tag         the short name of the task's training runs
# CELLS="NAME ..." restricts the cells to those names (see cell_name and select_cells).
recipe() {
  local t
  case "$1" in
    bin_picking)
      demo_files=(data/bin_picking-seen-300-v2.hdf5); cells=("- unseen"); tag=bp-v2 ;;
    multitask)
      demo_files=(); cells=()
      for t in "${MULTITASK_SUBTASKS[@]}"; do
        demo_files+=("data/multitask-$t-60.hdf5"); cells+=("- $t")
      done
      tag=multitask ;;
    sorting)
      demo_files=(data/sorting-easy-seen-150.hdf5 data/sorting-hard-seen-150.hdf5)
      cells=("easy seen" "easy mixed" "hard seen" "hard mixed"); tag=sorting ;;
    bussing)
      demo_files=(data/bussing-seen-300.hdf5); cells=("- seen" "- mixed"); tag=bussing ;;
    *)
      echo "TASK must be one of bin_picking, multitask, sorting, bussing; got '$1'" >&2
      return 2 ;;
  esac
  episodes=${EPISODES:-100}
  if [[ $1 == bin_picking && -z ${EPISODES:-} ]]; then episodes=; fi
  if [[ -n ${CELLS:-} ]]; then select_cells "$1"; fi
}

# select_cells TASK keeps only the cells named in CELLS (space-separated cell names, e.g.
# CELLS="easy-seen easy-mixed"), to spend a short session on part of a table
select_cells() {
  local kept=() c names=()
  for c in "${cells[@]}"; do
    names+=("$(cell_name "$c")")
    if [[ " $CELLS " == *" ${names[-1]} "* ]]; then kept+=("$c"); fi
  done
  if [[ ${#kept[@]} -eq 0 ]]; then
    echo "CELLS='$CELLS' names none of $1's cells: ${names[*]}" >&2
    return 2
  fi
  cells=("${kept[@]}")
}

# cell_name "DIFFICULTY SPLIT": the cell's part of a run directory's name, e.g. hard-mixed or unseen
cell_name() {
  local difficulty split
  read -r difficulty split <<<"$1"
  if [[ $difficulty == - ]]; then echo "$split"; else echo "$difficulty-$split"; fi
}

# run_cell TASK "DIFFICULTY SPLIT" POLICY CHECKPOINT OUT [more `divla-eval run` options]
# evaluates one cell (resuming OUT if it has episodes) and writes its report; CHECKPOINT "-" is for a
# policy without one (random). One torch thread per worker (THREADS=N to change): these scripts run
# beside other jobs, and two runs of two threads each on 2 cores made an OpenVLA call 14-50x slower.
run_cell() {
  local task=$1 cell=$2 policy=$3 checkpoint=$4 out=$5 difficulty split
  shift 5
  read -r difficulty split <<<"$cell"
  local args=(--task "$task" --split "$split" --policy "$policy"
              --workers "${WORKERS:-2}" --threads "${THREADS:-1}" --no-progress --out "$out")
  if [[ $checkpoint != - ]]; then args+=(--checkpoint "$checkpoint"); fi
  if [[ $difficulty != - ]]; then args+=(--difficulty "$difficulty"); fi
  if [[ -n $episodes ]]; then args+=(--episodes "$episodes"); fi
  .venv/bin/divla-eval run "${args[@]}" "$@"
  .venv/bin/divla-eval report "$out"
}

# require_demos: stops with the command that collects the task's demonstrations when one is missing
require_demos() {
  local f
  for f in "${demo_files[@]}"; do
    if [[ ! -f $f ]]; then
      echo "missing $f: collect the demonstrations first with DiVLA's script of the task:" \
           "scripts/divla_reference.sh (bin_picking), scripts/divla_multitask.sh demos," \
           "scripts/divla_task.sh sorting|bussing demos" >&2
      return 2
    fi
  done
}
