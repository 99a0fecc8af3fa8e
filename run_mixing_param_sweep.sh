#!/usr/bin/env bash
# Both unified forms, L_map + γ·L_output and γ·L_map + L_output, γ in 0.1..0.9, seeds 42 52 62, one after another.
# usage: bash run_mixing_param_sweep.sh TASK [MODEL] [quant_task_glue.py flags...]   (MODEL: base | large | folder)
# Each run lands in its own folder: the coefficients and the seed are in the run name.
# SEEDS="42" GAMMAS="0.5" narrow the grid (default: seeds 42 52 62, γ 0.1 ... 0.9).
set -euo pipefail
cd "$(dirname "$0")"
usage() { sed -n 2,5p "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; ""|-*) usage >&2; exit 2 ;; esac
task=$1; shift
model=base
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then model=$1; shift; fi
for seed in ${SEEDS:-42 52 62}; do
  for g in ${GAMMAS:-0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9}; do
    bash run_kd_qat_exploration.sh "$task" "$model" 1 "$g" "$seed" "$@"
    bash run_kd_qat_exploration.sh "$task" "$model" "$g" 1 "$seed" "$@"
  done
done
