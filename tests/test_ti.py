"""Teacher Intervention (docs/algorithms.md §6): what each mode replaces, the stop-gradients, the schedules, the two steps."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import quant_task_glue
from tests.conftest import TINY, tiny_flags
from transformer.config import ConfigError, parse_config, resolve
from transformer.intervention import MODE_CODE, mode_at
from transformer.model import KEEPABLE, BertForGlue, Intervention
from transformer.quant import quantize_model
from transformer.config import QuantConfig
from transformer.rundir import run_folder
from transformer.train import step1_folder, student_init_folder

SHAPE = dataclasses.replace(TINY, hidden_dropout=0.0, attn_dropout=0.0)
B, S = 3, 7


def _models(quantized: bool = False):
    torch.manual_seed(1)
    teacher = BertForGlue(SHAPE).eval()
    torch.manual_seed(2)
    student = BertForGlue(SHAPE)
    if quantized:
        student = quantize_model(student, QuantConfig())
    return teacher, student.train()  # dropout is 0, so train mode is deterministic


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, SHAPE.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, 5:] = False  # padding in one row
    mask[2, 3:] = False
    return ids, torch.zeros_like(ids), mask


def _teacher_out(teacher):
    ids, types, mask = _batch()
    with torch.no_grad():
        return teacher(ids, types, mask, keep=KEEPABLE)


def _capture_inputs(module):
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    return seen, handle


def _heads_merged(x):  # (B, H, S, d_h) -> (B, S, D)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


@pytest.mark.parametrize("quantized", [False, True])
def test_map_mode_mixes_teacher_probs_with_student_values(quantized):
    teacher, student = _models(quantized)
    t = _teacher_out(teacher)
    ids, types, mask = _batch()
    # the input of the output dense's activation quantizer = the merged per-head context that flows on
    hooks = [_capture_inputs(layer.attention.output.act_in) for layer in student.bert.encoder.layer]
    s = student(ids, types, mask, keep=KEEPABLE, intervene=Intervention("map", t))
    for (seen, h), sl, tl, layer in zip(hooks, s.layers, t.layers, student.bert.encoder.layer):
        h.remove()
        sa = layer.attention.self
        expected = sa.act_probs(tl.probs, mask) @ sl.value  # the student's quantizer on the teacher's probs
        torch.testing.assert_close(seen[0], _heads_merged(expected), rtol=0, atol=1e-6)
        # the returned probs are the student's own, softmax of the student's own scores
        torch.testing.assert_close(sl.probs, sl.scores.softmax(-1))
        assert not torch.allclose(sl.probs, tl.probs)


def test_context_mode_feeds_teacher_context_to_the_output_dense():
    teacher, student = _models()
    t = _teacher_out(teacher)
    ids, types, mask = _batch()
    hooks = [_capture_inputs(layer.attention.output.act_in) for layer in student.bert.encoder.layer]
    s = student(ids, types, mask, keep=KEEPABLE, intervene=Intervention("context", t))
    for (seen, h), sl, tl, layer in zip(hooks, s.layers, t.layers, student.bert.encoder.layer):
        h.remove()
        torch.testing.assert_close(seen[0], _heads_merged(tl.context), rtol=0, atol=0)
        torch.testing.assert_close(sl.context, sl.probs @ sl.value)  # returned context: the student's own P·V
        # what flows on is the student's dense of the teacher's context
        torch.testing.assert_close(sl.sa_output, layer.attention.output.dense(seen[0]))


def test_output_mode_uses_teacher_sa_output_then_student_residual_and_layernorm():
    teacher, student = _models()
    t = _teacher_out(teacher)
    ids, types, mask = _batch()
    s = student(ids, types, mask, keep=KEEPABLE, intervene=Intervention("output", t))
    h_in = s.embeddings
    for sl, tl, layer in zip(s.layers, t.layers, student.bert.encoder.layer):
        ln = layer.attention.output.LayerNorm
        expected = F.layer_norm(tl.sa_output + h_in, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        torch.testing.assert_close(sl.attn_output, expected, rtol=0, atol=1e-6)
        # the student's own dense result is still returned, and differs from the teacher's
        dense = layer.attention.output.dense
        torch.testing.assert_close(sl.sa_output, dense(_heads_merged(sl.context)))
        assert not torch.allclose(sl.sa_output, tl.sa_output)
        h_in = sl.hidden


def test_first_layer_scores_are_the_students_own_under_every_mode():
    teacher, student = _models()
    t = _teacher_out(teacher)
    ids, types, mask = _batch()
    plain = student(ids, types, mask, keep=KEEPABLE)
    for mode in ("map", "context", "output"):
        s = student(ids, types, mask, keep=KEEPABLE, intervene=Intervention(mode, t))
        # layer 0 sees the same input with or without intervention: its scores and probs are unchanged
        torch.testing.assert_close(s.layers[0].scores, plain.layers[0].scores, rtol=0, atol=0)
        torch.testing.assert_close(s.layers[0].probs, plain.layers[0].probs, rtol=0, atol=0)
        # the intervened tensor changes what comes after it
        assert not torch.allclose(s.logits, plain.logits)


def _grads(student, mode, loss_of):
    teacher, _ = _models()
    t = _teacher_out(teacher)
    ids, types, mask = _batch()
    student.zero_grad(set_to_none=True)
    s = student(ids, types, mask, keep=frozenset({"scores", "context", "hidden"}), intervene=Intervention(mode, t))
    loss_of(s).backward()
    return {n: p.grad for n, p in student.named_parameters()}


def _has_grad(g):
    return g is not None and g.abs().sum() > 0


@pytest.mark.parametrize("mode,stopped", [("map", ("query", "key")), ("context", ("query", "key", "value")),
                                          ("output", ("query", "key", "value"))])
def test_losses_after_the_replaced_tensor_do_not_reach_the_bypassed_projections(mode, stopped):
    _, student = _models()
    grads = _grads(student, mode, lambda s: s.logits.square().sum() + sum(h.square().sum() for h in s.hidden_states()))
    for i in range(SHAPE.num_layers):
        for proj in stopped:
            assert not _has_grad(grads[f"bert.encoder.layer.{i}.attention.self.{proj}.weight"]), (mode, i, proj)
        assert _has_grad(grads[f"bert.encoder.layer.{i}.intermediate.dense.weight"])
    if mode == "map":  # V still carries the gradient: the teacher's probs multiply the student's values
        assert _has_grad(grads["bert.encoder.layer.0.attention.self.value.weight"])
    if mode == "output":  # the attention-output dense result is replaced: no gradient reaches that dense
        assert not _has_grad(grads["bert.encoder.layer.0.attention.output.dense.weight"])


@pytest.mark.parametrize("mode,tensor", [("map", "scores"), ("context", "scores"), ("context", "context"),
                                         ("output", "context")])
def test_stop_gradient_on_the_layer_input_of_q_k_v(mode, tensor):
    # a loss on layer 1's own scores/context trains its Q, K (V) weights, but nothing flows into layer 0 through them
    _, student = _models()
    grads = _grads(student, mode, lambda s: getattr(s.layers[1], tensor).square().sum())
    assert _has_grad(grads["bert.encoder.layer.1.attention.self.query.weight"])
    for name, g in grads.items():
        if not name.startswith("bert.encoder.layer.1."):
            assert not _has_grad(g), name


def test_without_intervention_the_gradient_does_reach_the_layer_input():  # the control of the test above
    _, student = _models()
    ids, types, mask = _batch()
    s = student(ids, types, mask, keep=frozenset({"scores"}))
    s.layers[1].scores.square().sum().backward()
    assert _has_grad(student.bert.encoder.layer[0].output.dense.weight.grad)


def test_intervention_without_teacher_tensors_is_a_clear_error():
    teacher, student = _models()
    ids, types, mask = _batch()
    with torch.no_grad():
        t_plain = teacher(ids, types, mask)  # keeps nothing
    for mode, name in (("map", "probs"), ("context", "context"), ("output", "sa_output")):
        with pytest.raises(ValueError, match=f"needs the teacher's '{name}'"):
            student(ids, types, mask, intervene=Intervention(mode, t_plain))
    t_other = _teacher_out(teacher)  # a different batch shape
    with pytest.raises(ValueError, match="not the same batch"):
        student(ids[:, :4], types[:, :4], mask[:, :4], intervene=Intervention("map", t_other))
    with pytest.raises(ValueError, match="unknown Teacher Intervention mode"):
        student(ids, types, mask, intervene=Intervention("gradual", t_other))


@pytest.mark.parametrize("schedule,expected", [
    ("gradual", {0: "output", 9: "output", 10: "context", 19: "context", 20: "map", 59: "map"}),
    ("inverted", {0: "map", 19: "map", 20: "context", 39: "context", 40: "output", 59: "output"}),
    ("map", {0: "map", 59: "map"}), ("context", {0: "context", 59: "context"}), ("output", {0: "output", 59: "output"}),
])
def test_schedule_boundaries_at_n1_60(schedule, expected):
    assert {step: mode_at(schedule, step, 60) for step in expected} == expected


def test_schedule_boundaries_when_n1_is_not_divisible():
    # N1 = 7: N1/6 = 1.17, N1/3 = 2.33, 2·N1/3 = 4.67
    assert [mode_at("gradual", s, 7) for s in range(7)] == ["output"] * 2 + ["context"] + ["map"] * 4
    assert [mode_at("inverted", s, 7) for s in range(7)] == ["map"] * 3 + ["context"] * 2 + ["output"] * 2
    with pytest.raises(ValueError):
        mode_at("gradual", 7, 7)


def test_stochastic_schedule_is_uniform_and_reproducible():
    draws = [mode_at("stochastic", s, 3000, seed=42) for s in range(3000)]
    assert draws == [mode_at("stochastic", s, 3000, seed=42) for s in range(3000)]  # same on resume / every rank
    assert draws != [mode_at("stochastic", s, 3000, seed=52) for s in range(3000)]
    for mode in ("map", "context", "output"):
        assert abs(draws.count(mode) / 3000 - 1 / 3) < 0.03


def test_step2_without_mode_and_too_long_step1_are_config_errors(tmp_path, tiny_base, glue_dir):
    with pytest.raises(ConfigError, match="needs --ti.mode"):
        parse_config(["--ti.step", "2"])
    argv = ["--data.task", "sts-b", *tiny_flags(tmp_path, tiny_base, glue_dir, steps=4), "--ti.mode", "gradual",
            "--ti.steps", "4"]
    assert quant_task_glue.main(argv) == 2


def _ti_argv(tmp_path, tiny_base, glue_dir, *extra):
    return ["--data.task", "sts-b", *tiny_flags(tmp_path, tiny_base, glue_dir, steps=7), "--train.eval_every", "2",
            "--loss.attn_output_mse_weight", "1", "--ti.mode", "gradual", "--ti.steps", "5", "--train.tensorboard", *extra]


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_steps_end_to_end(tmp_path, tiny_base, glue_dir, capsys):
    # step 2 before step 1: a clear error naming the step-1 launcher
    assert quant_task_glue.main(_ti_argv(tmp_path, tiny_base, glue_dir, "--ti.step", "2")) == 2
    assert "run_TI_step_1.sh" in capsys.readouterr().err

    step1_argv = _ti_argv(tmp_path, tiny_base, glue_dir)
    assert quant_task_glue.main(step1_argv) == 0
    step1 = step1_folder(resolve(parse_config(step1_argv)))
    assert "ti_mode=gradual" in step1.name
    records = _records(step1)
    modes = {r["step"]: r["ti/mode"] for r in records if "ti/mode" in r}
    assert modes == {s + 1: mode_at("gradual", s, 5) for s in range(5)}  # every step, with the mode in force
    assert all(r["ti/mode_code"] == MODE_CODE[r["ti/mode"]] for r in records if "ti/mode" in r)
    assert [r["step"] for r in records if "eval/corr" in r] == [2, 4, 5]
    last = json.loads((step1 / "last.json").read_text())
    assert last["step"] == 5
    tb_tags = _tb_tags(step1)
    assert "ti/mode_code" in tb_tags and "loss/attn_output_mse" in tb_tags

    # the logged dev metric is the student's without intervention: re-evaluating the saved weights gives it
    from transformer.train import evaluate, load_tokenizer
    from transformer.data import load_task_data
    from transformer.model import load_bert
    cfg1 = resolve(parse_config(step1_argv))
    model = quantize_model(load_bert(step1 / "last"), cfg1.quant)
    data = load_task_data(cfg1.data, load_tokenizer(step1 / "last"), with_train=False)
    assert evaluate(model, data, cfg1, torch.device("cpu"))["corr"] == pytest.approx(last["metrics"]["corr"], abs=1e-6)

    # step 2 starts exactly from the step-1 student and runs the rest of the budget (7 - 5) without intervention
    step2_argv = _ti_argv(tmp_path, tiny_base, glue_dir, "--ti.step", "2")
    cfg2 = resolve(parse_config(step2_argv))
    assert student_init_folder(cfg2) == step1 / "last"
    init = load_bert(student_init_folder(cfg2), num_labels=1).state_dict()
    saved = load_file(str(step1 / "last" / "model.safetensors"))
    assert init.keys() == saved.keys() and all(torch.equal(init[k], saved[k]) for k in saved)
    capsys.readouterr()
    assert quant_task_glue.main(step2_argv) == 0
    step2 = run_folder(cfg2)
    assert step2 != step1 and step2.parent == step1.parent
    result = json.loads((step2 / "result.json").read_text())
    assert result["steps"] == 2 and result["ti"]["steps_before"] == 5 and result["ti"]["step1_run"] == str(step1)
    modes2 = {r["step"]: r["ti/mode"] for r in _records(step2) if "ti/mode" in r}
    assert modes2 == {1: "off", 2: "off"}
    assert all(math.isfinite(r["loss/total"]) for r in _records(step2) if "loss/total" in r)


def _tb_tags(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_step2_finds_a_custom_named_step1_run_through_step1_run(tmp_path, tiny_base, glue_dir, capsys):
    step1_argv = _ti_argv(tmp_path, tiny_base, glue_dir, "--train.run_name", "my-step1")
    assert quant_task_glue.main(step1_argv) == 0
    step1 = tmp_path / "out" / "sts-b" / "my-step1"
    assert (step1 / "last" / "model.safetensors").is_file()
    capsys.readouterr()
    # the derived name cannot find it: the error says how to name it
    assert quant_task_glue.main(_ti_argv(tmp_path, tiny_base, glue_dir, "--ti.step", "2")) == 2
    assert "--ti.step1_run" in capsys.readouterr().err
    # named explicitly, with a flag that drifted from step 1: it runs, and says what differs
    step2_argv = _ti_argv(tmp_path, tiny_base, glue_dir, "--ti.step", "2", "--ti.step1_run", str(step1),
                          "--optim.lr", "3e-5")
    assert quant_task_glue.main(step2_argv) == 0
    assert "differs from its step-1 run" in capsys.readouterr().out
    cfg2 = resolve(parse_config(step2_argv))
    assert student_init_folder(cfg2) == step1 / "last"
    result = json.loads((run_folder(cfg2) / "result.json").read_text())
    assert result["ti"]["step1_run"] == str(step1) and result["ti"]["steps_before"] == 5
    other = dataclasses.replace(cfg2, ti=dataclasses.replace(cfg2.ti, step1_run=str(tmp_path / "elsewhere")))
    assert run_folder(other) != run_folder(cfg2)  # continuing another step-1 run is another run
