#!/usr/bin/env bash
# Whole-run wall time with and without the teacher cache (issue 14), on this machine, one thread per run:
#   1. run_mixing_param_sweep.sh on RTE (first 800 training examples, 3 epochs) narrowed to 4 runs
#      (SEEDS="42 52", GAMMAS="0.5"): cache off, then disk (a fresh cache folder, so its one-off build is timed too);
#   2. a 3-epoch STS-B map run (bf16), cache off vs disk.
# usage: GLUE_DIR=../shared/data/glue bash results/teacher_cache/run_timing.sh      (from the repository root)
# Skips variants already timed; appends wall and CPU seconds (user + system of every process it started) to
# results/teacher_cache/timing.jsonl. Summary: python results/teacher_cache/summarize.py
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-output/teacher_cache_timing}
LOG=results/teacher_cache/timing.jsonl
PY=${PYTHON:-python}
common=(--train.threads 1 --train.precision bf16 --no-train.tensorboard)
# the RTE teacher is made first, outside the timings
[ -f models/rte/model.safetensors ] || "$PY" quant_task_glue.py rte "${common[@]}" --train.max_steps 1 --train.output_root "$OUT/teacher_warmup"

timed() {  # name, then the command: runs it, appends {name, wall_s, cpu_s, command, loadavg}
  local name=$1; shift
  if grep -q "\"name\": \"$name\"" "$LOG" 2>/dev/null; then echo "skip $name (timed already)"; return; fi
  rm -rf "${OUT:?}/$name"
  "$PY" - "$name" "$LOG" "$@" <<'PYEOF'
import json, os, resource, subprocess, sys, time
name, log, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
t0, l0 = time.time(), os.getloadavg()
subprocess.run(cmd, check=True)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
rec = {"name": name, "wall_s": round(time.time() - t0, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime, 1),
       "loadavg_start": l0, "loadavg_end": os.getloadavg(), "command": " ".join(cmd)}
with open(log, "a") as f:
    f.write(json.dumps(rec) + "\n")
print(rec)
PYEOF
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
