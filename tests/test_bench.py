"""bench/bench_step.py end to end on the tiny model (--quick): every row and every epoch variant is in the JSON with
positive numbers, and each benchmarked recipe is its launcher's config. No timing assertions."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

sys.path.insert(0, str(REPO / "bench"))
import bench_step  # noqa: E402

LAUNCH_ARGS = {"run_kd_qat_exploration.sh": ["rte", "base", "1", "0.5"]}


@pytest.mark.parametrize("name", [*(n for n in bench_step.RECIPES if n != "ti_step1"), "ti_step1_map"])
def test_recipe_is_the_launchers_config(name):
    cfg, _ = bench_step.recipe(name)
    launcher = bench_step.RECIPES["ti_step1" if name.startswith("ti_step1_") else name][0]
    r = subprocess.run(["bash", str(REPO / launcher), *LAUNCH_ARGS.get(launcher, ["rte"]), "--dry-run"],
                       capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    assert r.returncode == 0, r.stderr
    launched = json.loads(r.stdout)["config"]
    for section in ("loss", "quant", "optim", "ti"):
        assert launched[section] == cfg.to_dict()[section], section


def test_quick_benchmark_writes_every_row(tmp_path, tiny_base, glue_dir):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "bench_step.py"), "--quick", "--device", "cpu", "--model", str(tiny_base),
                        "--batch", "4", "--seq", "16", "--threads", "1", "--tasks", "rte", "sts-b",
                        "--glue-dir", str(glue_dir), "--epoch-examples", "24", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| config | ms/step (median) |" in r.stdout and "no CUDA device" in r.stdout
    result = json.loads(out.read_text())
    (shape,) = result["shapes"]
    rows = {row["config"]: row for row in shape["rows"]}
    assert list(rows) == ["hf_fp", "fp", "kd_baseline", "kd_map", "kd_output", "kd_unified", "ti_step1_map",
                          "kd_baseline_cached", "kd_map_cached", "ti_step1_map_cached",
                          *(["kd_map_cached_compiled"] if shutil.which("g++") else [])]
    for row in rows.values():
        for key in ("ms_per_step", "cpu_ms_per_step", "examples_per_s", "peak_mib", "time_ratio_vs_hf", "mem_ratio_vs_hf",
                    "tflops"):
            assert row[key] > 0, (row["config"], key)
        assert row["page_faults_per_step"] >= 0
        assert len(row["ms_all"]) == 2  # --quick: 2 rounds
    epochs = {(e["task"], e["variant"]): e for e in result["epochs"]}
    assert set(epochs) == {(t, v) for t in ("rte", "sts-b") for v in ("fixed", "shuffle", "length")}
    for e in epochs.values():
        assert e["seconds"] > 0 and e["examples"] == 24 and e["steps"] == 1 and e["padded_tokens"] >= e["real_tokens"] > 0
    assert {t["target"].split(" ")[0] for t in result["targets"]} >= {"kd_map", "kd_map_cached", "fp", "rte", "sts-b"}
    assert rows["kd_map_cached"]["flops_mult"] == 3 and rows["kd_map"]["flops_mult"] == 4  # no teacher forward
    assert result["meta"]["git_sha"] and result["meta"]["torch_threads"] == 1
