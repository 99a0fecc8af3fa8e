#!/usr/bin/env bash
# General distillation (docs/algorithms.md §7): distil models/<task> into a smaller student, full precision unless
# --quant.enabled (then ternary W2A8). Default: 3-layer student, uniform layer map and init, TinyBERT preset, mix.
# usage: bash run_distill.sh [TASK] [quant_task_glue.py flags...]   (default TASK: sts-b; --help lists the flags)
# e.g.  --distill.schedule two_step (both steps; --distill.step 1|2 for one), --distill.preset minilm|pkd,
#       --distill.student_hidden 192 --distill.student_heads 6 --distill.student_ffn 768, --quant.enabled
# runtime (STS-B, MiniLM teacher, 1 CPU thread, bf16): about 5 minutes; results/distill/README.md has the scores.
set -euo pipefail
cd "$(dirname "$0")"
exec "${PYTHON:-python}" quant_task_glue.py --no-quant.enabled --distill.student_layers 3 --distill.preset tinybert "$@"
