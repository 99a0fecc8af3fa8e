#!/usr/bin/env bash
# Whole-run wall time with and without the teacher cache (issue 14), on this machine, one thread per run:
#   1. run_mixing_param_sweep.sh on RTE (first 800 training examples, 3 epochs) narrowed to 4 runs
#      (SEEDS="42 52", GAMMAS="0.5"): cache off, then disk (a fresh cache folder, so its one-off build is timed too);
#   2. a 3-epoch STS-B map run (bf16), cache off vs disk.
# usage: GLUE_DIR=../shared/data/glue bash results/teacher_cache/run_timing.sh      (from the repository root)
# Skips variants whose runs are finished; writes results/teacher_cache/timing.jsonl; summary: python results/teacher_cache/summarize.py
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-output/teacher_cache_timing}
LOG=results/teacher_cache/timing.jsonl
PY=${PYTHON:-python}
common=(--train.threads 1 --train.precision bf16 --no-train.tensorboard)
# the RTE teacher is made first, outside the timings
[ -f models/rte/model.safetensors ] || "$PY" quant_task_glue.py rte "${common[@]}" --train.max_steps 1 --train.output_root "$OUT/teacher_warmup"

timed() {  # name, then the command
  local name=$1; shift
  if grep -q "\"name\": \"$name\"" "$LOG" 2>/dev/null; then echo "skip $name (timed already)"; return; fi
  rm -rf "$OUT/$name"
  local t0; t0=$(date +%s.%N)
  "$@"
  local t1; t1=$(date +%s.%N)
  echo "{\"name\": \"$name\", \"wall_s\": $(echo "$t1 - $t0" | bc), \"command\": \"$*\"}" >> "$LOG"
}
for mode in off disk; do
  timed "sweep-rte-$mode" env SEEDS="42 52" GAMMAS="0.5" bash run_mixing_param_sweep.sh rte base "${common[@]}" \
    --data.limit_train 800 --teacher.cache "$mode" --teacher.cache_dir "$OUT/sweep-rte-$mode/cache" \
    --train.output_root "$OUT/sweep-rte-$mode"
done
for mode in off disk; do
  timed "stsb-map-$mode" bash run_kd_qat_map.sh sts-b "${common[@]}" --teacher.cache "$mode" \
    --teacher.cache_dir "$OUT/stsb-map-$mode/cache" --train.output_root "$OUT/stsb-map-$mode"
done
