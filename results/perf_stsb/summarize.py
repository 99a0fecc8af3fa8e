"""Table of the runs copied into results/perf_stsb/runs/: dev scores (best and final), wall time, median ms/step.

    python results/perf_stsb/summarize.py          # prints the Markdown table in README.md
"""
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    print("| run | batching | precision | seed | best corr (step) | final Pearson / Spearman | wall time | median ms/step |")
    print("|---|---|---|---|---|---|---|---|")
    for run in sorted((HERE / "runs").iterdir()):
        cfg = json.loads((run / "run_config.json").read_text())
        res = json.loads((run / "result.json").read_text())
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        ms = statistics.median(r["ms_per_step"] for r in steps if "ms_per_step" in r)
        best, final = res["best"], res["final"]
        print(f"| {run.name} | {cfg['data']['batching']} | {cfg['train']['precision']} | {cfg['train']['seed']} | "
              f"{100 * best['metrics']['corr']:.2f} ({best['step']}) | {100 * final['pearson']:.2f} / {100 * final['spearman']:.2f} | "
              f"{res['wall_s'] / 60:.1f} min | {ms:.0f} |")


if __name__ == "__main__":
    main()
