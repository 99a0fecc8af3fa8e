cd /work/main && . .venv/bin/activate
export GLUE_DIR=../shared/data/glue
common="rte --train.max_steps 80 --train.threads 2"
s=$(date +%s); bash run_kd_qat_map.sh $common --train.run_name rte-map-80-uninterrupted > /tmp/realruns/rte_ref.log 2>&1; echo "rte_ref_rc=$? wall_s=$(( $(date +%s)-s ))" >> /tmp/realruns/times.txt
run=output/rte/rte-map-80-interrupted
bash run_kd_qat_map.sh $common --train.run_name rte-map-80-interrupted > /tmp/realruns/rte_int1.log 2>&1 &
pid=$!
until grep -q '"step": 50' $run/metrics.jsonl 2>/dev/null; do sleep 0.5; done
pkill -KILL -f "rte-map-80-interrupted"; wait $pid; echo "killed rc=$? at: $(tail -1 $run/metrics.jsonl | cut -c1-60) checkpoint_step=$(python -c "import torch;print(torch.load('$run/checkpoint.pt',weights_only=False)['step'])")" >> /tmp/realruns/times.txt
s=$(date +%s); bash run_kd_qat_map.sh $common --train.run_name rte-map-80-interrupted > /tmp/realruns/rte_int2.log 2>&1; echo "rte_resume_rc=$? wall_s=$(( $(date +%s)-s ))" >> /tmp/realruns/times.txt
