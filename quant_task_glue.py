#!/usr/bin/env python
"""KD-QAT of a ternary-weight / 8-bit-activation (W2A8) BERT student on a GLUE task.

    python quant_task_glue.py sts-b --loss.attn_score_mse_weight 0 --loss.attn_prob_kl_weight 1
    python quant_task_glue.py --evaluate output/sts-b/<run name>     # re-evaluate a saved student
    python quant_task_glue.py --evaluate output/sts-b/<run name>/export   # its ONNX export, through onnxruntime

Every flag is generated from the dataclasses in transformer/config.py (the only place defaults live).
If the teacher folder (default models/<task>) is empty, a full-precision teacher is fine-tuned first.
Rerunning an interrupted command resumes it from its last checkpoint. Multi-process (DDP):
`torchrun --nproc_per_node N quant_task_glue.py ...` or `NPROC=N python quant_task_glue.py ...`.
"""
from __future__ import annotations

import json
import os
import sys

import utils_glue
from transformer import distill
from transformer.config import ConfigError, build_parser, config_from_args, resolve, run_name
from transformer.distributed import DeviceError
from transformer.export import evaluate_export, is_export_folder
from transformer.model import CheckpointError
from transformer.train import NonFiniteError, RunError, RunInterrupted, ensure_teacher, evaluate_run, run_folder, train

USER_ERRORS = (ConfigError, utils_glue.DataError, CheckpointError, RunError, DeviceError)


def relaunch_with_torchrun(argv: list[str]) -> None:
    """NPROC=N (N > 1) outside torchrun: replace this process with `torchrun --nproc_per_node N` of itself."""
    n = int(os.environ.get("NPROC", "1") or "1")
    if n > 1 and "WORLD_SIZE" not in os.environ:
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={n}", os.path.abspath(__file__), *argv])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", nargs="?", help="task name, same as --data.task (default: sts-b)")
    parser.add_argument("--evaluate", metavar="RUN_DIR", help="evaluate a saved student on its dev set and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and run folder, then exit")
    parser.add_argument("--teacher-only", action="store_true",
                        help="fine-tune the teacher if its folder has none, print its finetune.json, then exit")
    args = parser.parse_args(argv)
    if not any(getattr(args, a, None) for a in ("evaluate", "dry_run", "teacher_only")):
        relaunch_with_torchrun(sys.argv[1:] if argv is None else argv)
    try:
        if getattr(args, "evaluate", None):
            glue_dir = getattr(args, "data.glue_dir", None)
            evaluate = evaluate_export if is_export_folder(args.evaluate) else evaluate_run  # export/: onnxruntime
            print(json.dumps(evaluate(args.evaluate, glue_dir), indent=2))
            return 0
        if getattr(args, "task", None):
            if hasattr(args, "data.task"):
                raise ConfigError("give the task either as TASK or as --data.task, not both")
            setattr(args, "data.task", args.task)
        cfg = resolve(config_from_args(args))
        if getattr(args, "dry_run", False):
            steps = distill.steps_of(cfg)  # two-step, both steps: one folder per step
            folders = {"run_folder": str(run_folder(cfg)), "run_name": run_name(cfg)} if len(steps) == 1 else \
                {"run_folders": [str(run_folder(c)) for c in steps]}
            print(json.dumps({**folders, "config": cfg.to_dict()}, indent=2))
            return 0
        command = [sys.executable, *(sys.argv if argv is None else ["quant_task_glue.py", *argv])]
        if getattr(args, "teacher_only", False):
            teacher = ensure_teacher(cfg, command)
            finetuned = teacher / "finetune.json"  # absent for a teacher made elsewhere
            print(finetuned.read_text() if finetuned.is_file() else json.dumps({"teacher_dir": str(teacher)}))
            return 0
        train(cfg, command=command)
    except RunInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
