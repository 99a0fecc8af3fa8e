#!/usr/bin/env bash
# Unified KD-QAT loss (docs/algorithms.md §4): pred + rep + MAP_COEFF·attn_map + OUTPUT_COEFF·attn_output.
# usage: bash run_kd_qat_exploration.sh TASK MODEL MAP_COEFF OUTPUT_COEFF [SEED] [quant_task_glue.py flags...]
#   MODEL: base -> teacher models/<task>; large -> models/BERT_large/<task>; anything else: a teacher folder.
set -euo pipefail
cd "$(dirname "$0")"
usage() { sed -n 2,4p "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -lt 4 ]; then usage >&2; exit 2; fi
task=$1 model=$2 map=$3 out=$4; shift 4
seed=42
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then seed=$1; shift; fi
case "$model" in
  base) teacher=models/$task ;;
  large) teacher=models/BERT_large/$task ;;
  *) teacher=$model ;;
esac
exec "${PYTHON:-python}" quant_task_glue.py --data.task "$task" --model.teacher_dir "$teacher" --train.seed "$seed" \
  --loss.attn_score_mse_weight 0 --loss.attn_prob_kl_weight "$map" --loss.attn_output_mse_weight "$out" "$@"
