#!/usr/bin/env python
"""Build results/distill/README.md's table from the runs' own files (result.json, metrics.jsonl, run_config.json).

    python results/distill/summarise.py                 # prints the markdown table
    python results/distill/summarise.py --best-preset   # the better mix preset (tinybert or minilm), for commands.sh
Reads results/distill/runs/distill-*/ (copies of the run folders' small files; see commands.sh).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = [  # (label, run folders; a two-step row sums its steps' wall time and reports its last step)
    ("3-layer, no distillation (label loss only)", ["distill-none"]),
    ("3-layer, tinybert mix", ["distill-tinybert-mix"]),
    ("3-layer, minilm mix", ["distill-minilm-mix"]),
    ("3-layer, tinybert two-step", ["distill-tinybert-two_step-step1", "distill-tinybert-two_step-step2"]),
]


def _read(run: Path, name: str):
    return json.loads((run / name).read_text())


def _metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def score(run: Path) -> float:
    r = _read(run, "result.json")
    return r["best"]["metrics"][r["best"]["select_metric"]]


def teacher_size(teacher_dir: Path) -> tuple[int | None, int | None]:
    """(parameters, bytes) of the teacher's model.safetensors, from its header (no weights loaded)."""
    f = teacher_dir / "model.safetensors"
    if not f.is_file():
        return None, None
    from safetensors import safe_open
    with safe_open(str(f), "pt") as h:
        n = 0
        for k in h.keys():
            size = 1
            for d in h.get_slice(k).get_shape():
                size *= d
            n += size
    return n, f.stat().st_size


def row(label: str, runs: list[Path]) -> dict:
    last = runs[-1]
    r = _read(last, "result.json")
    speeds = [m["eval_examples_per_s"] for m in _metrics(last) if "eval_examples_per_s" in m]
    cfg = _read(last, "run_config.json")
    return {"label": label, "score": score(last), "params": r["student"]["parameters"], "bytes": r["student"]["file_bytes"],
            "speed": statistics.median(speeds), "wall": sum(_read(p, "result.json")["wall_s"] for p in runs),
            "steps": sum(_read(p, "result.json")["steps"] for p in runs), "quant": cfg["quant"]["enabled"]}


def best_preset(root: Path) -> str:
    return max(("tinybert", "minilm"), key=lambda p: score(root / f"distill-{p}-mix"))


def table(root: Path) -> str:
    rows = [row(label, [root / n for n in names]) for label, names in ROWS]
    for q in sorted(root.glob("distill-*-mix-w2a8")):
        rows.append(row(f"3-layer ternary W2A8, {q.name.split('-')[1]} mix", [q]))
    first = root / ROWS[0][1][0]
    teacher = _read(first, "result.json")["teacher"]
    t_speed = next(m["teacher_examples_per_s"] for m in _metrics(first) if "teacher_examples_per_s" in m)
    t_params, t_bytes = teacher_size(Path(_read(first, "run_config.json")["model"]["teacher_dir"]))
    select = _read(first, "result.json")["best"]["select_metric"]
    out = [f"| student | dev {select} | Δ vs teacher | parameters | file (MB) | dev examples/s | steps | wall (s) |",
           "|---|---|---|---|---|---|---|---|",
           f"| 6-layer teacher (FP) | {teacher[select]:.4f} | — | {t_params or '?':,} | "
           f"{t_bytes / 1e6 if t_bytes else float('nan'):.1f} | {t_speed:.0f} | — | — |"]
    for r in rows:
        out.append(f"| {r['label']} | {r['score']:.4f} | {r['score'] - teacher[select]:+.4f} | {r['params']:,} | "
                   f"{r['bytes'] / 1e6:.1f} | {r['speed']:.0f} | {r['steps']} | {r['wall']:.0f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=HERE / "runs")
    p.add_argument("--best-preset", action="store_true")
    a = p.parse_args()
    print(best_preset(a.runs) if a.best_preset else table(a.runs))


if __name__ == "__main__":
    main()
