"""General distillation (docs/algorithms.md §7): layer maps, student shape and init, projections, the new adaptors,
two-step freezing, a narrower student end to end, HF reload, exact resume. Tiny models, seconds."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import quant_task_glue
from tests.conftest import tiny_flags
from transformer import distill
from transformer.config import ConfigError, DistillConfig, LossConfig, RunConfig, parse_config, run_name
from transformer.losses import LossContext, cls_norm_mse, hidden_mse, logits_mse
from transformer.model import BertForGlue, EncoderOutput, LayerOutput, load_bert
from transformer.train import make_optimizer

HEAD_KEYS = ("bert.pooler.", "classifier.")


# ---------------------------------------------------------------------------------------------
# Layer maps and init layers

@pytest.mark.parametrize("teacher,student,expected", [
    (12, 6, [1, 3, 5, 7, 9, 11]), (12, 4, [2, 5, 8, 11]), (6, 3, [1, 3, 5]), (6, 4, [1, 2, 4, 5]), (6, 1, [5]),
    (4, 4, [0, 1, 2, 3]), (2, 1, [1])])
def test_uniform_map_spreads_layers_and_keeps_the_top(teacher, student, expected):
    assert distill.layer_map("uniform", teacher, student) == expected


@pytest.mark.parametrize("teacher,student,expected", [(6, 3, [3, 4, 5]), (12, 4, [8, 9, 10, 11]), (3, 3, [0, 1, 2])])
def test_last_map_takes_the_top_layers(teacher, student, expected):
    assert distill.layer_map("last", teacher, student) == expected


def test_explicit_map_and_its_one_line_errors():
    assert distill.layer_map("0,2,5", 6, 3) == [0, 2, 5]
    assert distill.layer_map("5,5", 6, 2) == [5, 5]  # two student layers may learn from one teacher layer
    with pytest.raises(ConfigError, match=r"names 2 layer\(s\) but the student has 3"):
        distill.layer_map("0,1", 6, 3)
    with pytest.raises(ConfigError, match=r"layer 6 does not exist, the teacher has layers 0..5"):
        distill.layer_map("0,6,1", 6, 3)
    with pytest.raises(ConfigError, match="more than the 2 of the teacher"):
        distill.layer_map("uniform", 2, 3)
    with pytest.raises(ConfigError, match="--distill.layer_map must be"):
        DistillConfig(layer_map="top")
    with pytest.raises(ConfigError, match="comma list"):
        DistillConfig(layer_map="1;2")


def test_init_layers():
    assert distill.init_layers("first", 6, 3) == [0, 1, 2]
    assert distill.init_layers("last", 6, 3) == [3, 4, 5]
    assert distill.init_layers("uniform", 6, 3) == [1, 3, 5]
    assert distill.init_layers("4,0", 6, 2) == [4, 0]


def _tiny_model(base: Path) -> BertForGlue:
    return load_bert(base)  # 2 layers, hidden 32, 4 heads (tests/conftest.py TINY)


def test_student_copies_the_chosen_source_layers_exactly(tiny_base):
    src = _tiny_model(tiny_base)
    for spec, picked in (("first", [0]), ("last", [1]), ("uniform", [1]), ("0", [0])):
        s = distill.build_student(DistillConfig(student_layers=1, init_layers=spec), src, seed=0)
        assert s.shape.num_layers == 1 and s.shape.hidden_size == src.shape.hidden_size
        sd, ssd = s.state_dict(), src.state_dict()
        for k, v in sd.items():
            j = picked[0] if k.startswith("bert.encoder.layer.0.") else None
            src_key = k.replace("layer.0.", f"layer.{j}.") if j is not None else k
            assert torch.equal(v, ssd[src_key]), (spec, k)


def test_same_shape_student_is_the_source_itself(tiny_base):
    src = _tiny_model(tiny_base)
    assert distill.build_student(DistillConfig(), src, seed=0) is src  # the KD-QAT default: nothing rebuilt


def test_other_width_is_a_seeded_hf_style_random_init(tiny_base):
    src = _tiny_model(tiny_base)
    d = DistillConfig(student_layers=1, student_hidden=16, student_heads=2, student_ffn=20)
    a, b = distill.build_student(d, src, seed=3), distill.build_student(d, src, seed=3)
    assert a.shape.hidden_size == 16 and a.shape.num_heads == 2 and a.shape.intermediate_size == 20
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    w = a.bert.encoder.layer[0].attention.self.query.weight
    assert abs(w.std().item() - a.shape.initializer_range) < 0.005 and not a.bert.encoder.layer[0].attention.self.query.bias.any()
    assert torch.equal(a.bert.embeddings.LayerNorm.weight, torch.ones(16))
    assert not a.bert.embeddings.word_embeddings.weight[a.shape.pad_token_id].any()
    with pytest.raises(ConfigError, match="starts from a random init: drop the flag"):
        distill.build_student(dataclasses.replace(d, init_layers="first"), src, seed=3)


def test_head_mismatch_and_width_only_terms_are_refused_in_one_line(tiny_base):
    t = _tiny_model(tiny_base).shape
    s = dataclasses.replace(t, num_heads=2)
    with pytest.raises(ConfigError, match="attn_score_mse compare attention heads one to one") as e:
        distill.check_shapes(s, t, LossConfig())
    assert "\n" not in str(e.value)
    distill.check_shapes(s, t, LossConfig(attn_score_mse_weight=0))  # hidden + logits need no equal heads
    narrow = dataclasses.replace(t, hidden_size=16, num_heads=2)
    with pytest.raises(ConfigError, match="attn_output_mse need the teacher's hidden size 32"):
        distill.check_shapes(narrow, t, LossConfig(attn_score_mse_weight=0, attn_output_mse_weight=1))


# ---------------------------------------------------------------------------------------------
# Projections

def _out(hidden: list[torch.Tensor], logits: torch.Tensor | None = None) -> EncoderOutput:
    return EncoderOutput(logits=logits if logits is not None else torch.zeros(hidden[0].shape[0], 1),
                         embeddings=hidden[0], layers=[LayerOutput(hidden=h) for h in hidden[1:]])


def test_projection_shapes_and_identity_when_widths_match():
    p = distill.Projections(16, 32, num_layers=3, initializer_range=0.02, seed=0)
    assert len(p.maps) == 4 and all(m.weight.shape == (32, 16) for m in p.maps)
    out = p(_out([torch.randn(2, 5, 16) for _ in range(4)]))
    assert out.embeddings.shape == (2, 5, 32) and all(lo.hidden.shape == (2, 5, 32) for lo in out.layers)
    same = distill.Projections(32, 32, num_layers=3, initializer_range=0.02, seed=0)
    x = _out([torch.randn(2, 5, 32) for _ in range(4)])
    assert len(same.maps) == 0 and same(x) is x


def test_projections_get_gradients_and_train(tiny_base):
    src = _tiny_model(tiny_base)
    student = distill.build_student(DistillConfig(student_layers=1, student_hidden=16, student_heads=2), src, seed=0)
    proj = distill.Projections(16, 32, 1, 0.02, seed=0)
    trained = distill.TrainedStudent(student, proj)
    names = [n for n, _ in trained.named_parameters()]
    assert names[-4:] == ["projections.maps.0.weight", "projections.maps.0.bias", "projections.maps.1.weight",
                          "projections.maps.1.bias"]
    opt = make_optimizer(trained, dataclasses.replace(RunConfig().optim, lr=1e-2))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)  # the projections join the optimizer
    ids = torch.randint(5, 30, (3, 7))
    with torch.no_grad():
        t_out = src(ids, torch.zeros_like(ids), torch.ones_like(ids), keep=frozenset({"hidden"}))
    s_out = trained(ids, torch.zeros_like(ids), torch.ones_like(ids), keep=frozenset({"hidden"}))
    ctx = LossContext(torch.ones(3, 7, dtype=torch.bool), torch.zeros(3), True, layer_map=[1])
    hidden_mse(s_out, t_out, ctx).backward()
    before = [m.weight.detach().clone() for m in proj.maps]
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in proj.maps)
    opt.step()
    assert all(not torch.equal(b, m.weight) for b, m in zip(before, proj.maps))


# ---------------------------------------------------------------------------------------------
# The new adaptors against hand-computed values (the reused terms are tested in test_losses.py)

def test_cls_norm_mse_by_hand():
    # [CLS] rows: student layer 0 (3, 4) -> (0.6, 0.8); teacher layer 1 (1, 0). ‖(0.6, 0.8) − (1, 0)‖² = 0.16 + 0.64
    s_h = torch.tensor([[[3.0, 4.0], [9.0, 9.0]]])  # (B=1, S=2, D=2); the second token is not [CLS]: ignored
    t0, t1 = torch.tensor([[[0.0, 5.0], [1.0, 1.0]]]), torch.tensor([[[2.0, 0.0], [7.0, 7.0]]])
    s, t = _out([s_h, s_h]), _out([t0, t0, t1])
    ctx = LossContext(torch.ones(1, 2, dtype=torch.bool), torch.zeros(1), True, layer_map=[1])
    assert cls_norm_mse(s, t, ctx).item() == pytest.approx(0.8)
    ctx0 = dataclasses.replace(ctx, layer_map=[0])  # (0.6, 0.8) vs (0, 1): 0.36 + 0.04
    assert cls_norm_mse(s, t, ctx0).item() == pytest.approx(0.4)
    # two samples, two student layers: summed over layers, averaged over the batch
    s2 = _out([torch.zeros(2, 1, 2), torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])])
    t2 = _out([torch.zeros(2, 1, 2), torch.tensor([[[0.0, 2.0]], [[0.0, 3.0]]])])
    ctx2 = LossContext(torch.ones(2, 1, dtype=torch.bool), torch.zeros(2), True, layer_map=[0, 0])
    # layer 0: sample 0 ‖(1,0)−(0,1)‖² = 2, sample 1: 0 -> mean 1; layer 1: 2 and 2 -> mean 2; total 3
    assert cls_norm_mse(s2, t2, ctx2).item() == pytest.approx(3.0)


def test_logits_mse_by_hand():
    s = EncoderOutput(logits=torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    t = EncoderOutput(logits=torch.tensor([[1.0, 0.0], [3.0, 1.0]]))
    ctx = LossContext(torch.ones(2, 1, dtype=torch.bool), torch.tensor([0, 1]), False, layer_map=[])
    assert logits_mse(s, t, ctx).item() == pytest.approx((0 + 4 + 9 + 1) / 4)


def test_hidden_mse_follows_the_layer_map():
    s = _out([torch.zeros(1, 1, 2), torch.ones(1, 1, 2)])
    t = _out([torch.zeros(1, 1, 2), torch.full((1, 1, 2), 5.0), torch.full((1, 1, 2), 3.0)])
    ctx = LossContext(torch.ones(1, 1, dtype=torch.bool), torch.zeros(1), True, layer_map=[1])
    assert hidden_mse(s, t, ctx).item() == pytest.approx(4.0)  # embeddings 0 + (1 − 3)²


# ---------------------------------------------------------------------------------------------
# Config: presets, run names, schedules

def test_presets_set_weights_and_flags_override_them():
    cfg = parse_config(["--distill.preset", "minilm", "--loss.attn_prob_kl_weight", "2"])
    assert (cfg.loss.attn_prob_kl_weight, cfg.loss.value_relation_kl_weight, cfg.loss.logits_kd_weight) == (2, 1, 1)
    assert cfg.loss.hidden_mse_weight == 0 and cfg.loss.attn_score_mse_weight == 0
    pkd = parse_config(["--distill.preset", "pkd"]).loss
    assert (pkd.label_loss_weight, pkd.logits_kd_weight, pkd.cls_norm_mse_weight, pkd.hidden_mse_weight) == (0.5, 0.5, 100, 0)
    assert parse_config(["--distill.preset", "tinybert"]).loss == LossConfig()
    again = RunConfig.from_dict(cfg.to_dict())  # a saved run_config.json reads back unchanged
    assert again == cfg
    name = run_name(parse_config(["--distill.preset", "minilm", "--loss.attn_prob_kl_weight", "2", "--distill.student_layers", "3"]))
    assert name == "sts-b-attn_prob_kl=2-student_layers=3-preset=minilm-s42"


def test_default_distill_config_leaves_kd_qat_runs_and_names_unchanged():
    assert run_name(RunConfig()) == "sts-b-s42"
    assert distill.steps_of(RunConfig()) == [RunConfig()]


def test_two_step_phases_split_the_terms():
    cfg = parse_config(["--distill.schedule", "two_step", "--distill.step", "1", "--loss.cls_norm_mse_weight", "1"])
    p1 = distill.phase_of(cfg)
    assert p1.name == "encoder" and p1.loss.logits_kd_weight == 0 and p1.loss.hidden_mse_weight == 1
    assert p1.loss.cls_norm_mse_weight == 1 and not p1.trains("classifier.weight") and p1.trains("bert.encoder.layer.0.output.dense.weight")
    p2 = distill.phase_of(dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, step="2")))
    assert p2.name == "head" and p2.loss.logits_kd_weight == 1 and p2.loss.hidden_mse_weight == 0
    assert p2.trains("bert.pooler.dense.weight") and p2.trains("classifier.bias") and not p2.trains("bert.embeddings.LayerNorm.weight")
    both = distill.steps_of(parse_config(["--distill.schedule", "two_step", "--train.run_name", "x"]))
    assert [(c.distill.step, c.train.run_name) for c in both] == [("1", "x-step1"), ("2", "x-step2")]
    with pytest.raises(ConfigError, match="step 1 .* has no loss term"):
        distill.phase_of(parse_config(["--distill.schedule", "two_step", "--distill.step", "1", "--loss.hidden_mse_weight", "0",
                                       "--loss.attn_score_mse_weight", "0"]))
    with pytest.raises(ConfigError, match="belong to --distill.schedule two_step"):
        parse_config(["--distill.step", "2"])


# ---------------------------------------------------------------------------------------------
# End to end on the tiny model

def _run(tmp: Path, base: Path, glue: Path, *extra: str, steps: int = 4) -> int:
    flags = tiny_flags(tmp, base, glue, steps)
    return quant_task_glue.main(["sts-b", *flags, "--train.threads", "1", "--train.log_every", "1", *extra])


def _head(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k.startswith(HEAD_KEYS)}


def _body(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(HEAD_KEYS)}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("quant", ["--no-quant.enabled", "--quant.enabled"])
def test_two_step_freezes_the_head_then_the_encoder_bit_for_bit(tmp_path, tiny_base, glue_dir, quant):
    assert _run(tmp_path, tiny_base, glue_dir, quant, "--distill.student_layers", "1", "--distill.schedule", "two_step",
                "--train.run_name", "ts", steps=6) == 0
    out = tmp_path / "out" / "sts-b"
    teacher = load_file(str(tmp_path / "teacher" / "model.safetensors"))
    step1, final = load_file(str(out / "ts-step1" / "last" / "model.safetensors")), load_file(str(out / "ts-step2" / "model.safetensors"))
    # step 1 trained the encoder (not the head, which is still the teacher's); step 2 the head (not the encoder)
    assert _equal(_head(step1), _head(teacher)) and not _equal(_body(step1), {k: teacher[k] for k in _body(step1)})
    assert _equal(_body(final), _body(step1)) and not _equal(_head(final), _head(step1))
    r1, r2 = (json.loads((out / n / "result.json").read_text()) for n in ("ts-step1", "ts-step2"))
    assert (r1["steps"], r2["steps"]) == (4, 2) and r2["distill"]["steps_before"] == 4
    assert r2["distill"]["step1_run"] == str(out / "ts-step1") and r1["distill"]["phase"] == "encoder"
    logged = [set(json.loads(l)) for l in (out / "ts-step1" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/hidden_mse" in k for k in logged) and not any("loss/logits_kd" in k for k in logged)
    logged2 = set().union(*(set(json.loads(l)) for l in (out / "ts-step2" / "metrics.jsonl").read_text().splitlines()))
    assert "loss/logits_kd" in logged2 and "loss/hidden_mse" not in logged2


def test_two_step_command_rerun_after_step1_continues_with_step2(tmp_path, tiny_base, glue_dir, capsys):
    flags = ["--distill.student_layers", "1", "--distill.schedule", "two_step"]
    assert _run(tmp_path, tiny_base, glue_dir, *flags, "--distill.step", "2") == 2  # step 2 first: one clear line
    assert "two-step step 2 continues the finished step-1 run" in capsys.readouterr().err
    assert _run(tmp_path, tiny_base, glue_dir, *flags, "--distill.step", "1") == 0  # step 1 alone
    capsys.readouterr()
    assert _run(tmp_path, tiny_base, glue_dir, *flags) == 0  # both: step 1 is kept, step 2 runs
    assert "two-step step 1 already finished" in capsys.readouterr().out
    assert len(list((tmp_path / "out" / "sts-b").glob("*step=2*/result.json"))) == 1


def test_narrower_student_end_to_end_with_projections_only_in_the_checkpoint(tmp_path, tiny_base, glue_dir):
    from transformers import BertForSequenceClassification
    narrow = ["--no-quant.enabled", "--distill.student_layers", "1", "--distill.student_hidden", "16", "--distill.student_heads", "2",
              "--distill.student_ffn", "20", "--loss.attn_score_mse_weight", "0", "--loss.cls_norm_mse_weight", "1",
              "--train.keep_checkpoint", "--train.eval_every", "2", "--train.run_name", "narrow"]
    assert _run(tmp_path, tiny_base, glue_dir, *narrow) == 0
    run = tmp_path / "out" / "sts-b" / "narrow"
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"]) == (16, 1, 2, 20)
    saved = load_file(str(run / "model.safetensors"))
    assert not any("projection" in k for k in saved)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert {k: tuple(v.shape) for k, v in state["projections"].items() if k.endswith("weight")} == \
        {"maps.0.weight": (32, 16), "maps.1.weight": (32, 16)}
    logged = set().union(*(set(json.loads(l)) for l in (run / "metrics.jsonl").read_text().splitlines()))
    assert {"loss/hidden_mse", "loss/cls_norm_mse", "loss/logits_kd", "eval_examples_per_s"} <= logged
    # the saved student is a plain HF BERT of its own shape: same logits as ours
    hf = BertForSequenceClassification.from_pretrained(str(run)).eval()
    ours = load_bert(run).eval()
    ids = torch.randint(5, 30, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits, ours(ids, torch.zeros_like(ids), mask).logits,
                                   rtol=0, atol=1e-5)
    assert json.loads((run / "result.json").read_text())["student"]["parameters"] == sum(p.numel() for p in ours.parameters())


def test_resume_of_a_distillation_run_equals_the_uninterrupted_run(tmp_path, tiny_base, glue_dir):
    narrow = ["--distill.student_layers", "1", "--distill.student_hidden", "16", "--distill.student_heads", "2",
              "--loss.attn_score_mse_weight", "0", "--train.eval_every", "2"]
    assert _run(tmp_path, tiny_base, glue_dir, *narrow, "--train.run_name", "ref", steps=6) == 0
    assert _run(tmp_path, tiny_base, glue_dir, *narrow, "--train.run_name", "cut", "--train.keep_checkpoint", steps=6) == 0
    out = tmp_path / "out" / "sts-b"
    cut = out / "cut"
    (cut / "result.json").unlink()  # as if killed after its last checkpoint (step 4): steps 5, 6 are redone
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["step"] == 4
    assert _run(tmp_path, tiny_base, glue_dir, *narrow, "--train.run_name", "cut", steps=6) == 0
    ra, rb = (load_file(str(out / n / "model.safetensors")) for n in ("ref", "cut"))
    assert _equal(ra, rb)

    def losses(run):
        return [(r["step"], r["loss/total"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss/total" in r]
    assert losses(out / "ref") == losses(cut) and len(losses(cut)) == 6


def test_teacher_intervention_needs_the_teachers_shape():
    from transformer.config import resolve
    with pytest.raises(ConfigError, match="Teacher Intervention needs a student of the teacher's shape"):
        resolve(parse_config(["--ti.mode", "gradual", "--distill.student_layers", "3"]))
    resolve(parse_config(["--ti.mode", "gradual", "--distill.preset", "tinybert"]))  # a preset alone is fine


def test_dry_run_of_both_steps_names_both_folders(capsys):
    assert quant_task_glue.main(["sts-b", "--distill.schedule", "two_step", "--dry-run"]) == 0
    folders = json.loads(capsys.readouterr().out)["run_folders"]
    assert [f.split("-")[-2] for f in folders] == ["step=1", "step=2"]
