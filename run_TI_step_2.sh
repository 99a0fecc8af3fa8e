#!/usr/bin/env bash
# Teacher Intervention step 2 (docs/algorithms.md §6): starts from the final student of a TI step-1 run, intervention
# off, for the rest of the budget (baseline steps − ti.steps, its own LR schedule), with step 1's recipe.
# usage: bash run_TI_step_2.sh [TASK] [STEP1_OPTION] [flags...]
#   TASK default sts-b; STEP1_OPTION default gradual (or inverted, stochastic, map, context, output).
#   The step-1 run is the one run_TI_step_1.sh made with the same flags; --ti.step1_run DIR names another.
set -euo pipefail
cd "$(dirname "$0")"
usage() { sed -n 4,6p "$0" | sed 's/^# \{0,1\}//'; }
task=sts-b
option=gradual
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then task=$1; shift; fi
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then option=$1; shift; fi
case "$option" in
  gradual|inverted|stochastic|map|context|output) ;;
  *) echo "unknown STEP1_OPTION '$option'" >&2; usage >&2; exit 2 ;;
esac
# step 1's launcher with step 2 on top: the recipe lives in one place, so the two steps cannot drift apart
exec bash run_TI_step_1.sh "$task" --ti.mode "$option" --ti.step 2 "$@"
