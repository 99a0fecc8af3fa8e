#!/usr/bin/env bash
# Does Teacher Intervention converge faster? Baseline recipe vs TI-G two-step, same task, seed and step budget,
# dev metric every 20 optimizer steps; then curves.json + curves.png here (see README.md in this folder).
# usage: GLUE_DIR=../shared/data/glue bash results/ti_convergence/run.sh [TASK] [quant_task_glue.py flags...]
set -euo pipefail
cd "$(dirname "$0")/../.."
task=${1:-sts-b}; shift || true
flags=(--train.eval_every 20 --train.threads 1 "$@")  # two jobs side by side, one thread each
bash run_kd_qat_baseline.sh "$task" "${flags[@]}" > results/ti_convergence/baseline.log 2>&1 &
baseline=$!
{ bash run_TI_step_1.sh "$task" "${flags[@]}" && bash run_TI_step_2.sh "$task" gradual "${flags[@]}"; } \
  > results/ti_convergence/ti_g.log 2>&1 &
ti=$!
wait $baseline
wait $ti
"${PYTHON:-python}" results/ti_convergence/curves.py "$task" "${flags[@]}"
