"""Summarise the teacher-cache timings (run_timing.sh) and sizes (bench/cache_sizes.py) into README.md here.

    python results/teacher_cache/summarize.py [--runs output/teacher_cache_timing]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default=str(HERE.parents[1] / "output" / "teacher_cache_timing"))
    args = p.parse_args()
    timings = [json.loads(l) for l in (HERE / "timing.jsonl").read_text().splitlines()] if (HERE / "timing.jsonl").exists() else []
    lines = ["# Teacher cache: whole-run wall time and sizes", "",
             "Made by `results/teacher_cache/run_timing.sh` (commands below) and `bench/cache_sizes.py`; this file by",
             "`python results/teacher_cache/summarize.py`. One thread per run, bf16 autocast, on this 2-core machine while",
             "other jobs shared it (wall times are of that machine state; each pair ran back to back).", "",
             "| variant | wall time (s) | CPU time (s) | runs | dev score of each run (best) |", "|---|---|---|---|---|"]
    for t in timings:
        runs = sorted(Path(args.runs, t["name"]).glob("*/*/result.json"))
        scores = []
        for r in runs:
            res = json.loads(r.read_text())
            sel = res["best"]["select_metric"]
            scores.append(f"{r.parent.name}: {sel} {100 * res['best']['metrics'][sel]:.2f}")
        lines.append(f"| {t['name']} | {t['wall_s']:.0f} | {t.get('cpu_s', float('nan')):.0f} | {len(runs)} | {'; '.join(scores)} |")
    pairs = {}
    for t in timings:
        base, mode = t["name"].rsplit("-", 1)
        pairs.setdefault(base, {})[mode] = t
    lines += ["", "| experiment | cache off: wall / CPU (s) | cache on, build included: wall / CPU (s) | speed-up wall / CPU |",
              "|---|---|---|---|"]
    for base, m in pairs.items():
        if "off" in m and "disk" in m:
            a, b = m["off"], m["disk"]
            lines.append(f"| {base} | {a['wall_s']:.0f} / {a['cpu_s']:.0f} | {b['wall_s']:.0f} / {b['cpu_s']:.0f} | "
                         f"{a['wall_s'] / b['wall_s']:.2f}× / {a['cpu_s'] / b['cpu_s']:.2f}× |")
    lines += ["", "Commands:", ""] + [f"- `{t['name']}`: `{t['command']}`" for t in timings]
    sizes = HERE / "sizes.json"
    if sizes.exists():
        rows = json.loads(sizes.read_text())["rows"]
        lines += ["", "## Cache size from the real token lengths of each training set", "",
                  "`python bench/cache_sizes.py --out results/teacher_cache/sizes.json` (GLUE folder: the four tasks present here).", "",
                  "| task | examples | mean tokens | recipe | teacher | per example (fp32) | whole task fp32 (GiB) | bf16 (GiB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['task']} | {r['examples']} | {r['mean_tokens']:.1f} | {r['recipe']} | {r['teacher']} | "
                         f"{r['fp32_kib_per_example']:.0f} KiB | {r['fp32_bytes'] / 2**30:.2f} | {r['bf16_bytes'] / 2**30:.2f} |")
    (HERE / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
