#!/usr/bin/env python
"""Export a finished KD-QAT run: packed W2A8 safetensors + integer ONNX model for onnxruntime (docs/algorithms.md §9).

    python export_student.py output/sts-b/<run name>            # writes output/sts-b/<run name>/export/
    python quant_task_glue.py --evaluate output/sts-b/<run name>/export   # dev metrics through onnxruntime

Prints export.json: file sizes, compression against fp32, parity of the ONNX logits with the fake-quant model.
"""
from __future__ import annotations

import argparse
import json
import sys

from transformer.export import export_run
from transformer.model import CheckpointError
from transformer.rundir import RunError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder of quant_task_glue.py (run_config.json, model.safetensors, ...)")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/export)")
    parser.add_argument("--glue-dir", help="GLUE data for the parity check (default: the run's data.glue_dir)")
    parser.add_argument("--parity-examples", type=int, default=256, help="dev examples for the parity figures")
    args = parser.parse_args(argv)
    try:
        info = export_run(args.run_dir, args.out, args.glue_dir, args.parity_examples)
    except (RunError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
