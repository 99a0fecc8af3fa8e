"""Optimizer, schedule, and tiny end-to-end KD-QAT runs through the CLI (run folder, logs, reload, errors)."""
import dataclasses
import json
import math

import pytest
import torch

import quant_task_glue
from transformer.model import BertForGlue
from transformer.train import BertAdam, lr_at, param_groups
from tests.conftest import REPO, TINY, tiny_flags


def test_lr_schedule_warmup_decay_and_no_idle_step():
    total, peak = 100, 1.0
    lrs = [lr_at(s, total, peak, 0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # 10 warm-up steps
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5)
    assert min(lrs) > 0 and lrs[-1] == pytest.approx(1 / 90)  # reaches 0 only after the last step
    assert lr_at(0, 10, 2e-5, 0.0) == pytest.approx(2e-5)


def test_bertadam_first_step_has_no_bias_correction_and_clips_per_tensor():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    q = torch.nn.Parameter(torch.tensor([0.5]))
    opt = BertAdam([{"params": [p], "weight_decay": 0.1}, {"params": [q], "weight_decay": 0.0}], lr=0.01,
                   eps=0.0, max_grad_norm=1.0)
    p.grad = torch.tensor([3.0, 4.0])   # norm 5 -> clipped to (0.6, 0.8)
    q.grad = torch.tensor([0.5])        # norm 0.5 -> unchanged (per tensor, not global)
    opt.step()
    # m = 0.1 g, v = 0.001 g^2 -> update = 0.1/sqrt(0.001) sign(g) = 3.1623 sign(g); + decoupled wd 0.1 p
    u = 0.1 / math.sqrt(0.001)
    torch.testing.assert_close(p.detach(), torch.tensor([1.0 - 0.01 * (u + 0.1), -2.0 - 0.01 * (u - 0.2)]))
    torch.testing.assert_close(q.detach(), torch.tensor([0.5 - 0.01 * u]))


def test_no_weight_decay_on_biases_and_layernorm():
    groups = param_groups(BertForGlue(TINY), 0.01)
    decay_names = {n for n, p in BertForGlue(TINY).named_parameters()}
    assert groups[1]["weight_decay"] == 0 and groups[0]["weight_decay"] == 0.01
    n_no_decay = sum(1 for n in decay_names if n.endswith(".bias") or "LayerNorm" in n)
    assert len(groups[1]["params"]) == n_no_decay


def _run(tmp_path, tiny_base, glue_dir, *extra, steps=3):
    argv = ["--data.task", "sts-b", *tiny_flags(tmp_path, tiny_base, glue_dir, steps), "--train.eval_every", "2",
            "--train.log_every", "1", *extra]
    return quant_task_glue.main(argv), argv


def test_tiny_kd_qat_run_end_to_end(tmp_path, tiny_base, glue_dir, capsys):
    rc, argv = _run(tmp_path, tiny_base, glue_dir, "--loss.attn_score_mse_weight", "0", "--loss.attn_prob_kl_weight", "1",
                    "--train.tensorboard")
    assert rc == 0
    assert (tmp_path / "teacher" / "model.safetensors").exists() and (tmp_path / "teacher" / "finetune.json").exists()
    runs = list((tmp_path / "out" / "sts-b").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert "attn_prob_kl=1" in run.name and run.name.endswith("-s42")
    for f in ("run_config.json", "command.txt", "git_sha.txt", "metrics.jsonl", "best.json", "result.json",
              "teacher_eval.json", "config.json", "model.safetensors", "tokenizer_config.json"):
        assert (run / f).exists(), f
    assert list((run / "tb").iterdir())
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "teacher/corr" in records[0]
    losses = [r for r in records if "loss/total" in r]
    assert [r["step"] for r in losses] == [1, 2, 3]
    assert all(math.isfinite(r["loss/attn_prob_kl"]) and "loss/hidden_mse" in r and "lr" in r for r in losses)
    assert "loss/attn_score_mse" not in losses[0]
    assert [r["step"] for r in records if "eval/corr" in r] == [2, 3]  # every 2 steps and at the last step
    best = json.loads((run / "best.json").read_text())
    assert best["step"] in (2, 3) and "corr" in best["metrics"]
    # the saved student reloads with its quantizers and gives the recorded dev metric
    capsys.readouterr()
    assert quant_task_glue.main(["--evaluate", str(run)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["corr"] == pytest.approx(best["metrics"]["corr"], abs=1e-6)
    # and HF loads it too (latent FP weights)
    from transformers import BertForSequenceClassification
    assert BertForSequenceClassification.from_pretrained(str(run)).config.num_labels == 1


def test_finished_run_is_refused_unless_overwrite(tmp_path, tiny_base, glue_dir, capsys):
    assert _run(tmp_path, tiny_base, glue_dir, steps=1)[0] == 0
    capsys.readouterr()
    rc, _ = _run(tmp_path, tiny_base, glue_dir, steps=1)
    err = capsys.readouterr().err
    assert rc == 2 and "already holds a finished run" in err and "Traceback" not in err
    assert _run(tmp_path, tiny_base, glue_dir, "--train.overwrite", steps=1)[0] == 0


def test_fp_student_and_other_recipes_run(tmp_path, tiny_base, glue_dir):
    terms = ["attn_output_mse", "context_mse", "sa_output_mse", "value_relation_kl", "label_loss"]
    rc, _ = _run(tmp_path, tiny_base, glue_dir, "--no-quant.enabled", *(x for t in terms for x in (f"--loss.{t}_weight", "1")),
                 "--optim.optimizer", "adamw", "--data.batching", "fixed", steps=2)
    assert rc == 0
    (run,) = (tmp_path / "out" / "sts-b").iterdir()
    losses = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "loss/total" in l]
    assert [r["step"] for r in losses] == [1, 2]
    for r in losses:  # every enabled term is logged, finite and non-negative; the total is their weighted sum
        for t in ["logits_kd", "hidden_mse", "attn_score_mse", *terms]:
            assert math.isfinite(r[f"loss/{t}"]) and r[f"loss/{t}"] >= 0, t
        parts = sum(v for k, v in r.items() if k.startswith("loss/") and k != "loss/total")
        assert r["loss/total"] == pytest.approx(parts, rel=1e-5)
    # an FP student: no quantizer when reloaded, and its logits are those of the plain HF model
    from transformer.train import load_run
    from transformer.quant import ActFakeQuantizer, WeightFakeQuantizer
    model, cfg = load_run(run)
    assert not cfg.quant.enabled and cfg.data.batching == "fixed" and cfg.train.eval_batch_size == 8
    assert not any(isinstance(m, (ActFakeQuantizer, WeightFakeQuantizer)) for m in model.modules())
    from transformers import BertForSequenceClassification
    hf = BertForSequenceClassification.from_pretrained(str(run)).eval()
    ids = torch.randint(5, TINY.vocab_size, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    torch.testing.assert_close(model.eval()(ids, torch.zeros_like(ids), mask).logits,
                               hf(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


def test_best_selection_never_keeps_nan_over_a_number():
    from transformer.train import better
    nan = float("nan")
    assert better(nan, None) and better(0.1, None)  # the first evaluation is always kept (a student must exist)
    assert better(0.2, nan) and not better(nan, 0.2) and not better(nan, nan)
    assert better(0.3, 0.2) and not better(0.2, 0.2) and not better(0.1, 0.2)


def test_a_nan_first_evaluation_does_not_lock_the_best_checkpoint(tmp_path, tiny_base, glue_dir, monkeypatch, capsys):
    import transformer.train as T
    from transformer.quant import QuantLinear
    real, calls = T.evaluate, []

    def evaluate(model, data, cfg, device):  # the student's first evaluation: constant predictions (NaN)
        m = real(model, data, cfg, device)
        if not any(isinstance(x, QuantLinear) for x in model.modules()):  # the teacher (fine-tune, teacher_eval)
            return m
        calls.append(1)
        return {k: float("nan") for k in m} if len(calls) == 1 else m

    monkeypatch.setattr(T, "evaluate", evaluate)
    rc, _ = _run(tmp_path, tiny_base, glue_dir, "--train.eval_every", "1", steps=3)
    assert rc == 0
    (run,) = (tmp_path / "out" / "sts-b").iterdir()
    best = json.loads((run / "best.json").read_text())
    assert best["step"] in (2, 3) and math.isfinite(best["metrics"]["corr"])
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    (first,) = [r for r in records if r["step"] == 1 and "eval/corr" in r]
    assert math.isnan(first["eval/corr"]) and "corr" in first["eval/nan_metrics"]  # logged as NaN, named


def test_ms_per_step_times_the_training_step_alone(tmp_path, tiny_base, glue_dir, monkeypatch):
    import transformer.train as T

    class Clock:  # a fake clock: evaluation and checkpoints take 1000 s each, every other call 1 ms
        now = 0.0

        def time(self):
            self.now += 0.001
            return self.now

    clock = Clock()
    real_eval, real_save = T.evaluate, T.save_checkpoint

    def slow(fn):
        def wrapped(*a, **kw):
            clock.now += 1000
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(T, "time", clock)
    monkeypatch.setattr(T, "evaluate", slow(real_eval))
    monkeypatch.setattr(T, "save_checkpoint", slow(real_save))
    rc, _ = _run(tmp_path, tiny_base, glue_dir, "--train.eval_every", "1", steps=3)
    assert rc == 0
    (run,) = (tmp_path / "out" / "sts-b").iterdir()
    speeds = [json.loads(l)["ms_per_step"] for l in (run / "metrics.jsonl").read_text().splitlines() if "ms_per_step" in l]
    assert len(speeds) == 3 and max(speeds) < 1000  # no evaluation's or checkpoint's 1000 s in any of them


@pytest.mark.parametrize("extra,match", [
    (["--data.task", "nosuchtask"], "nosuchtask"),
    (["--data.glue_dir", "/nonexistent/glue"], "/nonexistent/glue"),
    (["--quant.weight_bits", "3"], "weight_bits"),
    (["--model.base_dir", "/nonexistent/base"], "/nonexistent/base"),
])
def test_user_errors_exit_2_with_one_line_and_leave_nothing(tmp_path, tiny_base, glue_dir, capsys, extra, match):
    rc, _ = _run(tmp_path, tiny_base, glue_dir, *extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and match in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "teacher").exists()


def test_teacher_with_wrong_num_labels_is_refused(tmp_path, tiny_base, glue_dir, capsys):
    # an RTE teacher (2 labels) used for STS-B (regression, 1 output)
    assert quant_task_glue.main(["--data.task", "rte", *tiny_flags(tmp_path, tiny_base, glue_dir, 1)]) == 0
    rc, _ = _run(tmp_path, tiny_base, glue_dir)
    err = capsys.readouterr().err
    assert rc == 2 and "num_labels=2 but the task needs 1" in err
    assert not (tmp_path / "out" / "sts-b").exists()


def test_a_teacher_folder_with_other_files_is_never_replaced(tmp_path, tiny_base, glue_dir, capsys):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "notes.txt").write_text("mine")
    rc, _ = _run(tmp_path, tiny_base, glue_dir)
    assert rc == 2 and "holds files but no model checkpoint" in capsys.readouterr().err
    assert (tmp_path / "teacher" / "notes.txt").read_text() == "mine"


def test_custom_tsv_task_trains_without_code_changes(tmp_path, tiny_base, glue_dir):
    """A KLUE/NSMC-style task: named columns in a TSV with a header, described by a JSON file."""
    folder = tmp_path / "glue" / "nsmc"
    folder.mkdir(parents=True)
    rows = ["id\tdocument\tlabel"] + [f"{i}\t{'good movie' if i % 2 else 'bad plot'} {i}\t{i % 2}" for i in range(24)]
    for split in ("train", "dev"):
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    spec = tmp_path / "nsmc.json"
    spec.write_text(json.dumps({"name": "nsmc", "text_a": "document", "text_b": None, "label": "label",
                                "labels": ["0", "1"], "metric": "accuracy"}))
    flags = tiny_flags(tmp_path, tiny_base, tmp_path / "glue")
    assert quant_task_glue.main(["--data.task", "nsmc", "--data.custom_task", str(spec), *flags]) == 0
    (run,) = (tmp_path / "out" / "nsmc").iterdir()
    result = json.loads((run / "result.json").read_text())
    assert result["task"] == "nsmc" and "acc" in result["final"]


def test_bf16_autocast_step_keeps_quantizers_in_fp32_and_close_to_fp32(tiny_base):
    import copy
    from transformer.config import RunConfig
    from transformer.data import Batch
    from transformer.model import load_bert
    from transformer.quant import ActFakeQuantizer, quantize_model
    from transformer.train import kd_forward
    teacher = load_bert(tiny_base, num_labels=2, new_classifier=True)
    student = quantize_model(copy.deepcopy(teacher), RunConfig().quant).eval()  # eval: no dropout draws to compare
    teacher.eval().requires_grad_(False)
    seen = []
    for m in student.modules():
        if isinstance(m, ActFakeQuantizer):
            m.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype)))
    b = Batch(torch.randint(5, 50, (3, 9)), torch.zeros(3, 9, dtype=torch.long), torch.ones(3, 9, dtype=torch.bool),
              torch.tensor([0, 1, 1]))
    cfg = RunConfig()
    losses = {}
    for precision in ("fp32", "bf16"):
        seen.clear()
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
        losses[precision], _ = kd_forward(student, teacher, b, c)
        assert {out for _, out in seen} == {torch.float32}  # the quantizer math and its output stay fp32
    assert torch.bfloat16 in {inp for inp, _ in seen}  # ... though under autocast some inputs arrive in bf16
    losses["bf16"].backward()
    assert torch.isclose(losses["bf16"], losses["fp32"], rtol=0.05)


def test_bf16_run_end_to_end(tmp_path, tiny_base, glue_dir):
    assert _run(tmp_path, tiny_base, glue_dir, "--train.precision", "bf16", steps=2)[0] == 0
    run = next((tmp_path / "out").glob("*/*precision=bf16*"))
    assert json.loads((run / "run_config.json").read_text())["train"]["precision"] == "bf16"


def test_a_second_launch_is_refused_while_a_run_trains_and_a_killed_holder_leaves_no_lock(tmp_path, tiny_base, glue_dir,
                                                                                           capsys):
    import os
    import signal
    import subprocess
    import sys
    from transformer.config import parse_config, resolve
    from transformer.rundir import run_folder
    argv = ["--data.task", "sts-b", *tiny_flags(tmp_path, tiny_base, glue_dir, 3), "--train.eval_every", "2",
            "--train.log_every", "1"]
    folder = run_folder(resolve(parse_config(argv)))
    holder = subprocess.Popen(  # another process that holds the run folder's lock, as a training launch would
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from transformer.rundir import FolderLock; "
         "FolderLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(600)", str(folder)],
        stdout=subprocess.PIPE, text=True, cwd=str(tmp_path.parent), env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert quant_task_glue.main(argv) == 2
        err = capsys.readouterr().err
        assert str(folder) in err and f"pid {holder.pid}" in err and len(err.strip().splitlines()) == 1
        assert [p.name for p in folder.iterdir()] == [".lock"]  # refused before anything was written
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: no cleanup, the lock file stays behind
        holder.wait()
    assert (folder / ".lock").exists()
    assert quant_task_glue.main(argv) == 0  # the stale lock is taken over
    assert (folder / "result.json").exists() and not (folder / ".lock").exists()


def test_teacher_only_fine_tunes_the_teacher_once_and_trains_no_student(tmp_path, tiny_base, glue_dir, capsys):
    flags = tiny_flags(tmp_path, tiny_base, glue_dir)
    assert quant_task_glue.main(["sts-b", *flags, "--teacher-only"]) == 0
    made = json.loads((tmp_path / "teacher" / "finetune.json").read_text())
    capsys.readouterr()
    assert made["steps"] == 2 and "corr" in made["dev"]
    assert not (tmp_path / "out").exists()  # no student run
    stamp = (tmp_path / "teacher" / "model.safetensors").stat().st_mtime_ns
    assert quant_task_glue.main(["sts-b", *flags, "--teacher-only"]) == 0  # there already: kept, not remade
    assert (tmp_path / "teacher" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads(capsys.readouterr().out)["steps"] == 2  # it prints the teacher's finetune.json


def test_learned_activation_clips_train_at_their_own_lr_save_and_reload(tmp_path, tiny_base, glue_dir, capsys):
    rc, _ = _run(tmp_path, tiny_base, glue_dir, "--quant.act_learned_clip", "--optim.clip_lr", "0.05", steps=3)
    assert rc == 0
    (run,) = (tmp_path / "out" / "sts-b").iterdir()
    assert "act_learned_clip=on" in run.name and "clip_lr=0.05" in run.name
    clips = json.loads((run / "act_clips.json").read_text())
    # BertAdam's first steps move a parameter by up to ~3.2·lr (no bias correction): at the model's LR 2e-5 no clip
    # could move 0.002 in 3 steps, at clip_lr 0.05 some do, and none by more than 3 · 3.2 · 0.05
    moved = [abs(v - 2.5) for v in clips.values()]
    assert max(moved) > 0.002 and max(moved) < 3 * 3.2 * 0.05
    best = json.loads((run / "best.json").read_text())
    capsys.readouterr()
    assert quant_task_glue.main(["--evaluate", str(run)]) == 0  # reloads the clips (2.5 everywhere would differ)
    assert json.loads(capsys.readouterr().out)["corr"] == pytest.approx(best["metrics"]["corr"], abs=1e-6)


def test_param_groups_put_learned_clips_in_their_own_group():
    from transformer.config import QuantConfig
    from transformer.quant import quantize_model
    model = quantize_model(BertForGlue(TINY), QuantConfig(act_learned_clip=True))
    groups = param_groups(model, 0.01, clip_lr_scale=50.0)
    assert len(groups) == 3 and groups[2]["lr_scale"] == 50.0 and groups[2]["weight_decay"] == 0
    assert len(groups[2]["params"]) == sum(1 for n, _ in model.named_parameters() if n.endswith(".clip"))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
