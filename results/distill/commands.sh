#!/usr/bin/env bash
# The runs behind results/distill/README.md, one at a time: STS-B, MiniLM teacher (the fine-tuned 6-layer
# all-MiniLM-L6-v2 in TEACHER), 3-layer students, seed 42, the default budget (3 epochs = 540 steps).
# usage: TEACHER=models/sts-b GLUE_DIR=... bash results/distill/commands.sh; then python results/distill/summarise.py
set -euo pipefail
cd "$(dirname "$0")/../.."
TEACHER=${TEACHER:-models/sts-b}
common=(sts-b --model.teacher_dir "$TEACHER" --data.glue_dir "${GLUE_DIR:-glue_data}" --train.threads 1
        --train.precision bf16 --no-train.tensorboard --train.seed 42)
keep() {  # the run folders' small files (no weights) go under results/distill/runs/
  for d in output/sts-b/distill-"$1"*; do
    mkdir -p "results/distill/runs/$(basename "$d")"
    cp "$d"/{run_config,result,best,teacher_eval}.json "$d"/{metrics.jsonl,command.txt} "results/distill/runs/$(basename "$d")/"
  done
}
run() { name=$1; shift; echo "== $name"; bash run_distill.sh "${common[@]}" --train.run_name "distill-$name" "$@"; keep "$name"; }
# no distillation: plain fine-tune of the truncated (uniform layers 1, 3, 5) teacher, gold-label loss only
run none --distill.preset none --loss.label_loss_weight 1 --loss.logits_kd_weight 0 --loss.hidden_mse_weight 0 \
  --loss.attn_score_mse_weight 0
run tinybert-mix
run minilm-mix --distill.preset minilm
run tinybert-two_step --distill.schedule two_step
# ternary (W2A8) student with the better of the two mix presets (read from their result.json, not typed)
best=$("${PYTHON:-python}" results/distill/summarise.py --best-preset)
run "$best-mix-w2a8" --distill.preset "$best" --quant.enabled
