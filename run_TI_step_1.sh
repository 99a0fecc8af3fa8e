#!/usr/bin/env bash
# Teacher Intervention step 1 (docs/algorithms.md §6): the teacher's tensors replace the student's for ti.steps steps
# (default 60; CoLA 120), schedule gradual (TI-G: output, context, then map). Loss: pred + rep + attn_score + attn_output.
# usage: bash run_TI_step_1.sh [TASK] [quant_task_glue.py flags...]   (default TASK: sts-b; --help lists the flags)
# Other schedules: --ti.mode inverted | stochastic | map | context | output. Then: bash run_TI_step_2.sh TASK MODE
# (which runs this launcher with --ti.step 2, so both steps share this recipe).
set -euo pipefail
cd "$(dirname "$0")"
exec "${PYTHON:-python}" quant_task_glue.py --loss.attn_output_mse_weight 1 --ti.mode gradual --ti.step 1 "$@"
