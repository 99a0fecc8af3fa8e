"""Dev metrics of a finished run: the PyTorch fake-quant student vs its ONNX export through onnxruntime.

    python bench/compare_export_eval.py output/sts-b/<run name> --glue-dir /work/shared/data/glue \
        --out results/export/sts-b.json

Exports the run first if RUN_DIR/export/ is missing. Both evaluations are the ones `quant_task_glue.py --evaluate`
prints (same batches, same metrics); one thread each. Writes metrics, their differences, the export's sizes and
parity figures, and the wall time of each evaluation.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformer.export import evaluate_export, export_run, is_export_folder  # noqa: E402
from transformer.train import evaluate_run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--glue-dir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run, export = Path(args.run_dir), Path(args.run_dir) / "export"
    if not is_export_folder(export):
        export_run(run, export, args.glue_dir)
    t0 = time.perf_counter()
    torch_metrics = evaluate_run(run, args.glue_dir)
    t1 = time.perf_counter()
    onnx_metrics = evaluate_export(export, args.glue_dir, threads=1)
    t2 = time.perf_counter()
    info = json.loads((export / "export.json").read_text())
    result = {"run": run.name, "torch_fake_quant": torch_metrics, "onnxruntime_w2a8": onnx_metrics,
              "difference_points": {k: 100 * (onnx_metrics[k] - torch_metrics[k]) for k in torch_metrics},
              "eval_seconds": {"torch_fake_quant": round(t1 - t0, 1), "onnxruntime_w2a8": round(t2 - t1, 1)},
              "sizes": info["sizes"], "parity": info["parity"], "versions": info["versions"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
