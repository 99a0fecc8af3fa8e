#!/usr/bin/env bash
# KD-QAT with the attention-map loss (KD-QAT "map" recipe, docs/algorithms.md §4): pred + rep + attn_map.
# usage: bash run_kd_qat_map.sh [TASK] [quant_task_glue.py flags...]   (default TASK: sts-b; --help lists the flags)
# Fine-tunes a teacher into models/<task> first if none is there. Runs go to output/<task>/<run name>/.
set -euo pipefail
cd "$(dirname "$0")"
exec "${PYTHON:-python}" quant_task_glue.py \
  --loss.attn_score_mse_weight 0 --loss.attn_prob_kl_weight 1 "$@"
