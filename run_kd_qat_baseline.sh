#!/usr/bin/env bash
# TernaryBERT baseline KD-QAT (docs/algorithms.md §4): pred + rep + attn_score. These are the CLI defaults.
# usage: bash run_kd_qat_baseline.sh [TASK] [quant_task_glue.py flags...]   (default TASK: sts-b; --help lists the flags)
# Fine-tunes a teacher into models/<task> first if none is there. Runs go to output/<task>/<run name>/.
set -euo pipefail
cd "$(dirname "$0")"
exec "${PYTHON:-python}" quant_task_glue.py "$@"
