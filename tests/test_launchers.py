"""Every shell launcher end to end, a few steps on the tiny model (real GLUE data when present)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_flags

pytestmark = pytest.mark.slow


def launch(script: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **(env_extra or {})}
    return subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, env=env, timeout=600)


def finished_runs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("*/*/result.json"))


@pytest.mark.parametrize("script,terms", [
    ("run_kd_qat_map.sh", {"loss/attn_prob_kl", "loss/hidden_mse", "loss/logits_kd"}),
    ("run_kd_qat_output.sh", {"loss/attn_output_mse", "loss/hidden_mse", "loss/logits_kd"}),
    ("run_kd_qat_baseline.sh", {"loss/attn_score_mse", "loss/hidden_mse", "loss/logits_kd"}),
    ("run_kd_qat_small.sh", {"loss/attn_prob_kl", "loss/hidden_mse", "loss/logits_kd"}),
])
def test_recipe_launchers(tmp_path, tiny_base, glue_dir, script, terms):
    r = launch(script, "sts-b", *tiny_flags(tmp_path, tiny_base, glue_dir), "--train.log_every", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = finished_runs(tmp_path / "out")
    if script == "run_kd_qat_small.sh":  # its recipe: longer, faster, no activation clip, 8-bit word embeddings
        cfg = json.loads((run / "run_config.json").read_text())
        assert (cfg["train"]["epochs"], cfg["optim"]["lr"], cfg["quant"]["act_clip"], cfg["quant"]["embedding_bits"]) == \
            (6.0, 5e-5, False, 8)
    logged = {k for line in (run / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    assert terms <= logged and not ({"loss/attn_score_mse", "loss/attn_prob_kl", "loss/attn_output_mse"} - terms) & logged
    assert (run / "model.safetensors").exists() and json.loads((run / "best.json").read_text())["step"] >= 1


@pytest.mark.parametrize("script,ti", [("run_kd_qat_map.sh", {"mode": "off", "step": 1, "steps": 60, "step1_run": None}),
                                       ("run_TI_step_1.sh", {"mode": "gradual", "step": 1, "steps": 60, "step1_run": None}),
                                       ("run_TI_step_2.sh", {"mode": "gradual", "step": 2, "steps": 60, "step1_run": None})])
def test_default_task_is_sts_b(tmp_path, tiny_base, glue_dir, script, ti):
    r = launch(script, *tiny_flags(tmp_path, tiny_base, glue_dir), "--dry-run")
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)["config"]
    assert config["data"]["task"] == "sts-b" and config["ti"] == ti


def test_exploration_launcher_sets_both_coefficients_and_seed(tmp_path, tiny_base, glue_dir):
    # MODEL given as a folder: the teacher is fine-tuned there first (tiny_flags' own teacher_dir is dropped)
    flags = tiny_flags(tmp_path, tiny_base, glue_dir)
    i = flags.index("--model.teacher_dir")
    r = launch("run_kd_qat_exploration.sh", "rte", str(tmp_path / "teacher_rte"), "0.3", "1", "52", *flags[:i], *flags[i + 2:])
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = finished_runs(tmp_path / "out")
    cfg = json.loads((run / "run_config.json").read_text())
    assert cfg["loss"]["attn_prob_kl_weight"] == 0.3 and cfg["loss"]["attn_output_mse_weight"] == 1.0
    assert cfg["train"]["seed"] == 52 and run.name.endswith("-s52")


def test_sweep_launcher_gives_each_run_its_own_folder(tmp_path, tiny_base, glue_dir):
    flags = tiny_flags(tmp_path, tiny_base, glue_dir, steps=1)
    flags[flags.index("--model.teacher_dir") + 1] = str(tmp_path / "t")  # exploration overrides it with MODEL
    r = launch("run_mixing_param_sweep.sh", "sts-b", str(tmp_path / "t"), *flags, env_extra={"SEEDS": "42 52", "GAMMAS": "0.5"})
    assert r.returncode == 0, r.stderr[-2000:]
    names = sorted(p.name for p in finished_runs(tmp_path / "out"))
    assert len(names) == 4 and len(set(names)) == 4
    assert sum("attn_prob_kl=0.5" in n for n in names) == 2 and sum(n.endswith("-s52") for n in names) == 2


def test_ti_launchers_step_1_then_step_2(tmp_path, tiny_base, glue_dir):
    flags = [*tiny_flags(tmp_path, tiny_base, glue_dir, steps=4), "--ti.steps", "2", "--train.log_every", "1"]
    r = launch("run_TI_step_1.sh", "rte", *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    (step1,) = finished_runs(tmp_path / "out")
    cfg = json.loads((step1 / "run_config.json").read_text())
    assert cfg["ti"] == {"mode": "gradual", "step": 1, "steps": 2, "step1_run": None} and cfg["loss"]["attn_output_mse_weight"] == 1.0
    assert (step1 / "last" / "model.safetensors").exists()
    r = launch("run_TI_step_2.sh", "rte", "gradual", *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    (step2,) = set(finished_runs(tmp_path / "out")) - {step1}
    result = json.loads((step2 / "result.json").read_text())
    assert result["steps"] == 2 and result["ti"] == {"mode": "gradual", "step": 2, "steps_before": 2, "step1_run": str(step1)}
    # another step-1 option has no step-1 run yet: a clear error
    r = launch("run_TI_step_2.sh", "rte", "inverted", *flags)
    assert r.returncode == 2 and "run_TI_step_1.sh rte --ti.mode inverted" in r.stderr


@pytest.mark.parametrize("schedule,quant", [("mix", "--no-quant.enabled"), ("mix", "--quant.enabled"),
                                            ("two_step", "--no-quant.enabled"), ("two_step", "--quant.enabled")])
def test_distill_launcher_mix_and_two_step_fp_and_ternary(tmp_path, tiny_base, glue_dir, schedule, quant):
    # the tiny teacher has 2 layers: a 1-layer student stands in for the default 3-layer one
    flags = [*tiny_flags(tmp_path, tiny_base, glue_dir, steps=4), "--distill.student_layers", "1", "--train.log_every", "1"]
    r = launch("run_distill.sh", "sts-b", *flags, "--distill.schedule", schedule, quant)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = finished_runs(tmp_path / "out")
    assert len(runs) == (2 if schedule == "two_step" else 1)
    for run in runs:
        cfg = json.loads((run / "run_config.json").read_text())
        assert cfg["distill"]["preset"] == "tinybert" and cfg["quant"]["enabled"] == (quant == "--quant.enabled")
        assert json.loads((run / "config.json").read_text())["num_hidden_layers"] == 1
    logged = {k for line in (runs[-1] / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    assert "loss/logits_kd" in logged and ("loss/hidden_mse" in logged) == (schedule == "mix")


def test_distill_launcher_defaults(tmp_path, tiny_base, glue_dir):
    r = launch("run_distill.sh", *tiny_flags(tmp_path, tiny_base, glue_dir), "--dry-run")
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)["config"]
    assert config["data"]["task"] == "sts-b" and config["quant"]["enabled"] is False
    assert {k: config["distill"][k] for k in ("student_layers", "layer_map", "init_layers", "preset", "schedule")} == \
        {"student_layers": 3, "layer_map": "uniform", "init_layers": "uniform", "preset": "tinybert", "schedule": "mix"}


@pytest.mark.parametrize("script,args", [("run_distill.sh", ["sts-b", "extra"]), ("run_kd_qat_exploration.sh", []), ("run_mixing_param_sweep.sh", []),
                                         ("run_TI_step_2.sh", ["sts-b", "gradually"]),
                                         ("run_kd_qat_map.sh", ["-x"]), ("run_kd_qat_output.sh", ["rte", "extra"])])
def test_bad_arguments_print_usage(script, args):
    r = launch(script, *args)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_cli_help_documents_every_flag():
    import dataclasses
    from transformer.config import RunConfig
    r = subprocess.run([sys.executable, str(REPO / "quant_task_glue.py"), "--help"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "250"})
    assert r.returncode == 0
    defaults = RunConfig()
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            flag = f"--{section.name}.{f.name}"
            value = getattr(getattr(defaults, section.name), f.name)
            shown = f"{flag}, --no-{section.name}.{f.name}" if isinstance(value, bool) else flag
            assert shown in r.stdout, flag  # booleans come as a positive flag and its --no- form
    for extra in ("--evaluate", "--dry-run", "--config", "task"):
        assert extra in r.stdout
