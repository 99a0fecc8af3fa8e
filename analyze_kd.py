#!/usr/bin/env python
"""Why a KD loss helps: compare a teacher with KD-QAT students (docs/algorithms.md §8), figures + numbers into one folder.

    python analyze_kd.py --teacher models/sts-b --students output/sts-b/<run A> output/sts-b/<run B> \\
        --labels map baseline --task sts-b --out results/analysis/sts-b --n-examples 64 --hessian-examples 16

Writes attention_map_distance.png, attention_map_distance_heads.png, hessian_spectrum.png,
attention_output_range.png, attention_output_range_summary.png, norm_analysis.png, attention_heatmaps_layer<L>.png
and analysis.json (every number behind the figures, with the command). --analyses picks a subset.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import utils_glue
from transformer import analysis
from transformer import analysis_plots as plots
from transformer.config import ConfigError
from transformer.distributed import DeviceError, pick_device
from transformer.model import CheckpointError
from transformer.rundir import RunError

ANALYSES = ("distance", "hessian", "range", "norm", "heatmap")
USER_ERRORS = (analysis.AnalysisError, CheckpointError, RunError, ConfigError, utils_glue.DataError, DeviceError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="fine-tuned FP teacher folder (HF format)")
    p.add_argument("--students", nargs="+", required=True, help="student run folders of quant_task_glue.py")
    p.add_argument("--task", required=True, help="GLUE task every checkpoint must belong to")
    p.add_argument("--out", required=True, help="folder for the PNGs and analysis.json")
    p.add_argument("--labels", nargs="+", help="one short name per student for legends (default: run folder names)")
    p.add_argument("--glue-dir", help="GLUE folder (default: the first student's data.glue_dir)")
    p.add_argument("--analyses", nargs="+", choices=ANALYSES, default=list(ANALYSES), help="what to run")
    p.add_argument("--n-examples", type=int, default=64, help="first N dev examples for every analysis but the Hessian")
    p.add_argument("--hessian-examples", type=int, default=16, help="dev examples for the Hessian (one estimate each)")
    p.add_argument("--hessian-k", type=int, default=3, help="top-k Hessian eigenvalues per example")
    p.add_argument("--hessian-tol", type=float, default=1e-3, help="power-iteration relative tolerance")
    p.add_argument("--hessian-max-iter", type=int, default=100, help="power-iteration steps per eigenvalue at most")
    p.add_argument("--heatmap-example", type=int, default=0, help="dev example index for the heat maps and per-token range")
    p.add_argument("--heatmap-layer", type=int, help="layer (1-based) of the heat maps (default: the last)")
    p.add_argument("--heatmap-heads", type=int, nargs="+", help="heads (1-based) to show (default: all)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="examples per forward; 1 keeps a student's per-tensor activation scale to its own sample")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dpi", type=int, default=plots.DPI)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:
        setup = analysis.load_setup(args.teacher, args.students, args.task, n_examples=args.n_examples,
                                    glue_dir=args.glue_dir, labels=args.labels, device=pick_device(args.device))
        if not 0 <= args.heatmap_example < len(setup.dev):
            raise analysis.AnalysisError(f"--heatmap-example {args.heatmap_example} is not below --n-examples {len(setup.dev)}")
        L = setup.teacher.shape.num_layers
        layer = args.heatmap_layer or L
        if not 1 <= layer <= L:
            raise analysis.AnalysisError(f"--heatmap-layer must be in 1..{L}, got {args.heatmap_layer}")
        H = setup.teacher.shape.num_heads
        if args.heatmap_heads and not all(1 <= h <= H for h in args.heatmap_heads):
            raise analysis.AnalysisError(f"--heatmap-heads must be in 1..{H}, got {args.heatmap_heads}")
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    command = [Path(sys.argv[0]).name if argv is None else "analyze_kd.py", *(sys.argv[1:] if argv is None else argv)]
    record = {"command": " ".join(command), "task": setup.task.name, "teacher": str(args.teacher),
              "students": dict(zip(setup.students, map(str, args.students))), "n_examples": len(setup.dev)}
    dpi, bs = args.dpi, args.batch_size
    tokens = analysis.example_tokens(setup, args.heatmap_example)

    def step(name: str):
        print(f"{name} ...", flush=True)
        return time.time()

    if "distance" in args.analyses:
        t = step("attention-map distances")
        dist = analysis.compare_attention_maps(setup, batch_size=bs)
        plots.plot_attention_map_distance(dist, out / "attention_map_distance.png", dpi)
        plots.plot_attention_map_distance_heads(dist, out / "attention_map_distance_heads.png", dpi)
        record["attention_map_distance"] = {"note": "per student, metric -> [layer][head], mean over examples; "
                                            "cover_ratio uses 1-based ranks", **dist, "seconds": time.time() - t}
    if "hessian" in args.analyses:
        t = step(f"Hessian spectra ({args.hessian_examples} examples per model)")
        spectra = analysis.hessian_spectra(setup, args.hessian_examples, args.hessian_k, args.hessian_tol,
                                           args.hessian_max_iter)
        plots.plot_hessian_spectrum(spectra, out / "hessian_spectrum.png", dpi)
        record["hessian"] = {"note": "per model, [example][k] eigenvalues, largest |λ| first; loss = task loss + "
                             "0.01·Σ‖p‖₂", "tol": args.hessian_tol, "max_iter": args.hessian_max_iter, **spectra,
                             "seconds": time.time() - t}
    if "range" in args.analyses:
        t = step("attention-output dynamic range")
        ranges = analysis.attention_output_ranges(setup, batch_size=bs)
        plots.plot_attention_output_range(ranges, args.heatmap_example, tokens, out / "attention_output_range.png", dpi)
        plots.plot_attention_output_range_summary(ranges, out / "attention_output_range_summary.png", dpi)
        record["attention_output_range"] = {"note": "per model, per layer over all tokens", "seconds": time.time() - t,
                                            **{k: analysis.range_summary(r) for k, r in ranges.items()}}
    if "norm" in args.analyses:
        t = step("norm analysis")
        norms = analysis.norm_analyses(setup, batch_size=bs)
        plots.plot_norm_analysis(norms, out / "norm_analysis.png", dpi)
        record["norm_analysis"] = {"note": "per model, quantity -> [layer][head][class] or [layer][class]",
                                   "classes": analysis.TOKEN_CLASSES, **norms, "seconds": time.time() - t}
    if "heatmap" in args.analyses:
        step(f"attention heat maps (example {args.heatmap_example}, layer {layer})")
        maps = analysis.attention_heatmaps(setup, args.heatmap_example)
        plots.plot_attention_heatmaps(maps, layer, tokens, args.heatmap_heads, out / f"attention_heatmaps_layer{layer}.png", dpi)
        record["heatmap"] = {"example": args.heatmap_example, "layer": layer, "tokens": tokens}
    (out / "analysis.json").write_text(json.dumps(analysis.to_jsonable(record), indent=1) + "\n")
    print(f"figures and analysis.json written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
