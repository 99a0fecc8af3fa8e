"""Dev-metric curves of the baseline run and the TI-G two-step runs against global optimizer steps.

    python results/ti_convergence/curves.py TASK [the flags given to the three runs]

Finds the three runs by name (as the launchers do), writes curves.json and curves.png next to this file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from transformer.config import build_parser, config_from_args, resolve  # noqa: E402
from transformer.rundir import run_folder  # noqa: E402

HERE = Path(__file__).resolve().parent
TI_FLAGS = ["--loss.attn_output_mse_weight", "1", "--ti.mode", "gradual"]  # as run_TI_step_{1,2}.sh set them


def _cfg(task: str, flags: list[str]):
    return resolve(config_from_args(build_parser().parse_args(["--data.task", task, *flags])))


def eval_curve(run: Path, metric: str, offset: int = 0) -> list[tuple[int, float]]:
    """(global step, dev metric) for every evaluation of a run; offset = steps that came before it."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(offset + r["step"], r[f"eval/{metric}"]) for r in rows if f"eval/{metric}" in r]


def first_step_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, value in curve if value >= target), None)


def main(task: str, flags: list[str]) -> dict:
    base_cfg = _cfg(task, flags)
    runs = {"baseline": run_folder(base_cfg),
            "ti_step1": run_folder(_cfg(task, [*flags, *TI_FLAGS, "--ti.step", "1"])),
            "ti_step2": run_folder(_cfg(task, [*flags, *TI_FLAGS, "--ti.step", "2"]))}
    metric = json.loads((runs["baseline"] / "best.json").read_text())["select_metric"]
    n1 = json.loads((runs["ti_step2"] / "result.json").read_text())["ti"]["steps_before"]
    baseline = eval_curve(runs["baseline"], metric)
    ti = eval_curve(runs["ti_step1"], metric) + eval_curve(runs["ti_step2"], metric, offset=n1)
    target = baseline[-1][1]
    out = {"task": task, "metric": metric, "flags": flags, "n1": n1, "runs": {k: str(v) for k, v in runs.items()},
           "baseline": baseline, "ti_g": ti, "baseline_final": target, "ti_g_final": ti[-1][1],
           "baseline_best": max(v for _, v in baseline), "ti_g_best": max(v for _, v in ti),
           "steps_to_baseline_final": {"baseline": first_step_reaching(baseline, target),
                                       "ti_g": first_step_reaching(ti, target)}}
    (HERE / "curves.json").write_text(json.dumps(out, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(*zip(*baseline), "o-", ms=3, label="baseline (pred + rep + attn_score)")
    ax.plot(*zip(*ti), "s-", ms=3, label="TI-G two-step (pred + rep + attn_score + attn_output)")
    ax.axvline(n1, color="grey", ls=":", lw=1, label=f"end of TI step 1 (N1 = {n1})")
    ax.axhline(target, color="C0", ls="--", lw=0.8, label=f"baseline final {metric} {target:.4f}")
    ax.set_xlabel("optimizer step (global)")
    ax.set_ylabel(f"dev {metric}" + (" = (Pearson + Spearman) / 2" if metric == "corr" else ""))
    ax.set_title(f"{task}: W2A8 student, same seed and step budget")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "curves.png", dpi=120)
    print(json.dumps({k: out[k] for k in ("baseline_final", "ti_g_final", "baseline_best", "ti_g_best",
                                          "steps_to_baseline_final")}, indent=2))
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sts-b", sys.argv[2:])
