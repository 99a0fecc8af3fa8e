#!/usr/bin/env bash
# Teacher Intervention step 2 (SPEC §6): starts from the final student of the step-1 run of STEP1_OPTION (found by
# its run name, so pass the same extra flags as to step 1), intervention off, for the rest of the budget
# (baseline steps − ti.steps, its own LR schedule). Loss: pred + rep + attn_score + attn_output.
# usage: bash run_TI_step_2.sh [TASK] [STEP1_OPTION] [quant_task_glue.py flags...]
#   TASK default sts-b; STEP1_OPTION default gradual (or inverted, stochastic, map, context, output)
set -euo pipefail
cd "$(dirname "$0")"
usage() { sed -n 5,6p "$0" | sed 's/^# \{0,1\}//'; }
task=sts-b
option=gradual
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then task=$1; shift; fi
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then option=$1; shift; fi
case "$option" in
  gradual|inverted|stochastic|map|context|output) ;;
  *) echo "unknown STEP1_OPTION '$option'" >&2; usage >&2; exit 2 ;;
esac
exec "${PYTHON:-python}" quant_task_glue.py "$task" --loss.attn_output_mse_weight 1 --ti.mode "$option" --ti.step 2 "$@"
