#!/usr/bin/env bash
# KD-QAT with the attention-map loss (KD-QAT "map" recipe, SPEC §4): pred + rep + attn_map.
# usage: bash run_kd_qat_map.sh [TASK] [quant_task_glue.py flags...]     (default TASK: sts-b)
# Fine-tunes a teacher into models/<task> first if none is there. Runs go to output/<task>/<run name>/.
set -euo pipefail
cd "$(dirname "$0")"
usage() { sed -n 2,4p "$0" | sed 's/^# \{0,1\}//'; }
task=sts-b
if [ $# -gt 0 ]; then
  case "$1" in -h|--help) usage; exit 0 ;; --*) ;; -*) usage >&2; exit 2 ;; *) task=$1; shift ;; esac
fi
exec "${PYTHON:-python}" quant_task_glue.py --data.task "$task" \
  --loss.attn_score_mse_weight 0 --loss.attn_prob_kl_weight 1 "$@"
