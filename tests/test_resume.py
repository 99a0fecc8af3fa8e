"""Never lose work: exact resume after SIGKILL and after Ctrl-C, DDP (gloo) equals one process, gradient
accumulation equals one big batch, non-finite guards."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import quant_task_glue
from transformer import train as train_mod
from tests.conftest import REPO, tiny_flags

EXACT = ["--quant.act_granularity", "token", "--train.log_every", "1"]  # per-token scales: batch-split independent


def _cmd(tmp: Path, base: Path, glue: Path, out: str, steps: int, *extra: str) -> list[str]:
    flags = tiny_flags(tmp, base, glue, steps)
    flags[flags.index("--train.output_root") + 1] = str(tmp / out)
    return [sys.executable, str(REPO / "quant_task_glue.py"), "sts-b", *flags, "--train.eval_every", "5",
            "--train.threads", "1", *extra]


def _only_run(root: Path) -> Path:
    (run,) = list(root.glob("sts-b/*"))
    return run


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss/total"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss/total" in r]


def _assert_same_run(a: Path, b: Path):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = (json.loads((p / "result.json").read_text()) for p in (a, b))
    assert ra["best"] == rb["best"] and ra["final"] == rb["final"]
    assert _losses(a) == _losses(b)


def _make_teacher(tmp, base, glue):
    subprocess.run(_cmd(tmp, base, glue, "warmup", 1), check=True, capture_output=True)


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_exactly(tmp_path, tiny_base, glue_dir):
    _make_teacher(tmp_path, tiny_base, glue_dir)
    steps = 400
    ref = subprocess.run(_cmd(tmp_path, tiny_base, glue_dir, "ref", steps), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    cmd = _cmd(tmp_path, tiny_base, glue_dir, "crash", steps)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "crash" / "sts-b"
    deadline = time.time() + 120
    while not list(ckpt.glob("*/checkpoint.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # let it run past the checkpoint, so work after it is lost and must be redone
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = _only_run(tmp_path / "crash")
    assert proc.returncode == -signal.SIGKILL and not (run / "result.json").exists(), "the run finished before the kill"
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after step" in resumed.stdout
    assert not (run / "checkpoint.pt").exists()  # removed once the run is finished
    _assert_same_run(run, _only_run(tmp_path / "ref"))


@pytest.mark.slow
def test_sigint_stops_at_a_step_boundary_with_a_checkpoint(tmp_path, tiny_base, glue_dir):
    _make_teacher(tmp_path, tiny_base, glue_dir)
    cmd = _cmd(tmp_path, tiny_base, glue_dir, "int", 400, "--train.log_every", "1")
    t_first = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    logs = tmp_path / "int"
    while time.time() < deadline and not any(_losses(p.parent) for p in logs.glob("sts-b/*/metrics.jsonl")):
        time.sleep(0.02)  # training has started: the handler is in place
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    first_s = time.time() - t_first
    run = _only_run(tmp_path / "int")
    assert proc.returncode == 130 and "checkpoint saved" in err, err[-2000:]
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == _losses(run)[-1][0]  # the checkpoint is at the last completed step
    t_resume = time.time()
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    resumed_s = time.time() - t_resume
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [s for s, _ in _losses(run)]
    assert steps == list(range(1, 401))  # every step logged once: nothing lost, nothing repeated
    # the run's wall time covers both processes (a campaign resumes runs in a later session)
    wall = json.loads((run / "result.json").read_text())["wall_s"]
    assert 0 < state["wall_s"] < first_s and state["wall_s"] < wall <= state["wall_s"] + resumed_s + 0.1


DDP_TIMEOUT_S = 300  # a hung collective waits 30 min for gloo's own timeout: fail well before that


TI_STEP1 = ("--loss.attn_output_mse_weight", "1", "--ti.mode", "stochastic", "--ti.steps", "5")


NARROW = ("--distill.student_layers", "1", "--distill.student_hidden", "16", "--distill.student_heads", "2",
          "--loss.attn_score_mse_weight", "0")  # a student with projections: their gradients must be all-reduced too


@pytest.mark.slow
@pytest.mark.parametrize("extra,steps", [((), 6), (TI_STEP1, 5), (NARROW, 6)], ids=["kd-qat", "ti-step1", "distill"])
def test_two_gloo_processes_equal_one_process(tmp_path, tiny_base_no_dropout, glue_dir, extra, steps):
    # TI: every rank draws the same stochastic mode; parameters the intervention bypasses get no gradient
    _make_teacher(tmp_path, tiny_base_no_dropout, glue_dir)
    one = subprocess.run(_cmd(tmp_path, tiny_base_no_dropout, glue_dir, "one", 6, *EXACT, *extra), capture_output=True,
                         text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(_cmd(tmp_path, tiny_base_no_dropout, glue_dir, "two", 6, *EXACT, *extra), capture_output=True,
                         text=True, env=env, timeout=DDP_TIMEOUT_S)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(_only_run(tmp_path / "one")), _losses(_only_run(tmp_path / "two"))
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, steps + 1))
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-5)
    wa = load_file(str(_only_run(tmp_path / "one") / "model.safetensors"))
    wb = load_file(str(_only_run(tmp_path / "two") / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_micro_batches_equal_one_batch(tmp_path, tiny_base_no_dropout, glue_dir):
    flags = tiny_flags(tmp_path, tiny_base_no_dropout, glue_dir, 4)
    assert quant_task_glue.main(["sts-b", *flags, *EXACT, "--train.run_name", "one"]) == 0
    assert quant_task_glue.main(["sts-b", *flags, *EXACT, "--train.micro_batch_size", "3", "--train.run_name", "acc"]) == 0
    one, acc = tmp_path / "out" / "sts-b" / "one", tmp_path / "out" / "sts-b" / "acc"
    assert len(_losses(one)) == 4
    for (_, x), (_, y) in zip(_losses(one), _losses(acc)):
        assert y == pytest.approx(x, rel=1e-5)


def test_incompatible_config_and_corrupt_checkpoint_are_refused(tmp_path, tiny_base, glue_dir, capsys):
    flags = [*tiny_flags(tmp_path, tiny_base, glue_dir, 4), "--train.eval_every", "2", "--train.keep_checkpoint"]
    assert quant_task_glue.main(["sts-b", *flags, "--train.run_name", "r"]) == 0
    run = tmp_path / "out" / "sts-b" / "r"
    (run / "result.json").unlink()  # pretend it was interrupted after its last checkpoint
    capsys.readouterr()
    assert quant_task_glue.main(["sts-b", *flags, "--train.run_name", "r", "--optim.lr", "1e-3"]) == 2
    assert "different config (optim.lr)" in capsys.readouterr().err
    (run / "checkpoint.pt").write_bytes(b"\x00" * 10)
    assert quant_task_glue.main(["sts-b", *flags, "--train.run_name", "r"]) == 2
    assert "checkpoint.pt is corrupt or truncated" in capsys.readouterr().err


def _nan_at_step(monkeypatch, bad_call: int):
    real, calls = train_mod.distill_loss, {"n": 0}

    def flaky(*args, **kw):
        loss, terms = real(*args, **kw)
        calls["n"] += 1
        return (loss * float("nan"), terms) if calls["n"] == bad_call else (loss, terms)
    monkeypatch.setattr(train_mod, "distill_loss", flaky)


def test_nonfinite_loss_stops_with_the_step_and_terms_and_saves_the_batch(tmp_path, tiny_base, glue_dir, monkeypatch, capsys):
    flags = tiny_flags(tmp_path, tiny_base, glue_dir, 4)
    assert quant_task_glue.main(["sts-b", *flags, "--train.max_steps", "1"]) == 0  # teacher first
    _nan_at_step(monkeypatch, 2)
    assert quant_task_glue.main(["sts-b", *flags]) == 3
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step 2" in err and "'total': nan" in err and "hidden_mse" in err
    (dump,) = (tmp_path / "out" / "sts-b").glob("*/nonfinite_step2.pt")
    saved = torch.load(dump, weights_only=False)
    assert saved["step"] == 2 and saved["batches"][0]["input_ids"].shape[0] == 8


def test_nonfinite_batch_can_be_skipped(tmp_path, tiny_base, glue_dir, monkeypatch):
    flags = tiny_flags(tmp_path, tiny_base, glue_dir, 4)
    assert quant_task_glue.main(["sts-b", *flags, "--train.max_steps", "1"]) == 0
    _nan_at_step(monkeypatch, 2)
    assert quant_task_glue.main(["sts-b", *flags, "--train.on_nonfinite", "skip", "--train.run_name", "skip"]) == 0
    result = json.loads((tmp_path / "out" / "sts-b" / "skip" / "result.json").read_text())
    assert result["skipped_nonfinite"] == 1


@pytest.mark.slow
def test_two_step_distillation_with_two_gloo_processes_equals_one_process(tmp_path, tiny_base_no_dropout, glue_dir):
    # step 2 of the same command reads step 1's result.json: no rank may start it before rank 0 has written it
    _make_teacher(tmp_path, tiny_base_no_dropout, glue_dir)
    extra = (*EXACT, "--distill.student_layers", "1", "--distill.schedule", "two_step")
    runs = {}
    for n, out in ((1, "one"), (2, "two")):
        env = {**os.environ, "NPROC": str(n), "OMP_NUM_THREADS": "1"}
        r = subprocess.run(_cmd(tmp_path, tiny_base_no_dropout, glue_dir, out, 6, *extra), capture_output=True, text=True, env=env,
                           timeout=DDP_TIMEOUT_S)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[out] = sorted(p.parent for p in (tmp_path / out).glob("sts-b/*/result.json"))
    assert len(runs["one"]) == len(runs["two"]) == 2
    for a, b in zip(runs["one"], runs["two"]):
        assert [s for s, _ in _losses(a)] == [s for s, _ in _losses(b)]
        for (_, x), (_, y) in zip(_losses(a), _losses(b)):
            assert y == pytest.approx(x, rel=1e-5)
