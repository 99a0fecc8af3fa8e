#!/usr/bin/env bash
# TernaryBERT baseline KD-QAT (SPEC §4): pred + rep + attn_score. These are the CLI defaults.
# usage: bash run_kd_qat_baseline.sh [TASK] [quant_task_glue.py flags...] (default TASK: sts-b)
# Fine-tunes a teacher into models/<task> first if none is there. Runs go to output/<task>/<run name>/.
set -euo pipefail
cd "$(dirname "$0")"
usage() { sed -n 2,4p "$0" | sed 's/^# \{0,1\}//'; }
task=sts-b
if [ $# -gt 0 ]; then
  case "$1" in -h|--help) usage; exit 0 ;; --*) ;; -*) usage >&2; exit 2 ;; *) task=$1; shift ;; esac
fi
exec "${PYTHON:-python}" quant_task_glue.py --data.task "$task" "$@"
