"""Export (docs/algorithms.md §9): packing round trips, the packed file gives the fake-quant weights bit for bit, the ONNX integer
graph equals the fake-quant model within fp32 rounding, and a finished run exports and evaluates through onnxruntime."""
import json

import pytest
import torch
from torch import nn

import export_student
import quant_task_glue
from transformer import export as E
from transformer.config import QuantConfig
from transformer.data import Batch
from transformer.model import load_bert
from transformer.quant import (ActConfig, QuantLinear, learned_clips, load_learned_clips, TernaryWeightConfig, UniformWeightConfig, quant_plan,
                               quantize_activation, quantize_model, symmetric_codes, ternary_codes, ternary_values)
from tests.conftest import MINILM, needs_minilm, tiny_flags


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The fp32 bit patterns, with -0 read as +0 (int8 codes have no signed zero; -0 == 0 in every product)."""
    return (t.float() + 0.0).view(torch.int32)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 64, 1001])
def test_pack_unpack_round_trip_and_size(bits, n):
    levels = 2 ** (bits - 1) - 1
    codes = torch.randint(-levels, levels + 1, (n,), dtype=torch.int8)
    packed = E.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and len(packed) == -(-n * bits // 8)
    assert torch.equal(E.unpack_codes(packed, bits, (n,)), codes)


def test_two_bit_layout_is_onnx_int2():
    # -1, 0, 1, 1 -> fields 11, 00, 01, 01 from the low bits: 0b01010011 = 83 (onnx.helper packs INT2 the same way)
    assert E.pack_codes(torch.tensor([-1, 0, 1, 1], dtype=torch.int8), 2).tolist() == [83]


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_ternary_codes_times_alpha_is_the_twn_value(granularity):
    w = torch.randn(9, 40)
    w[2] = 0  # nothing kept: α = 0
    w[3, 5] = 7.0  # beyond the clip
    cfg = TernaryWeightConfig(granularity=granularity)
    codes, alpha = ternary_codes(w, cfg)
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
    # the TWN formula written out (docs/algorithms.md §2.1), as ternary_values computed it before the refactor
    a = w.abs().clamp(max=2.5)
    mean = (lambda x: x.mean(-1, keepdim=True)) if granularity == "row" else (lambda x: x.mean())
    total = (lambda x: x.sum(-1, keepdim=True)) if granularity == "row" else (lambda x: x.sum())
    keep = (a > 0.7 * mean(a)).float()
    ref = total(a * keep) / total(keep).clamp_min(1) * torch.sign(w) * keep
    assert torch.equal(bits_of(ternary_values(w, cfg)[0]), bits_of(ref))
    assert torch.equal(bits_of(codes.float() * alpha), bits_of(ref))


@pytest.mark.parametrize("weight_bits,embedding_bits", [(2, None), (4, None), (8, None), (2, 4), (2, 8)])
def test_packed_file_gives_the_fake_quant_weights_bit_for_bit(tiny_base, tmp_path, weight_bits, embedding_bits):
    cfg = QuantConfig(weight_bits=weight_bits, embedding_bits=embedding_bits)
    model = quantize_model(load_bert(tiny_base), cfg)
    E.save_student(E.student_from_model(model, cfg), tmp_path / "s.safetensors")
    loaded = E.load_student(tmp_path / "s.safetensors")
    sd = loaded.fake_quant_state_dict()
    weights = [n for n, spec in quant_plan(model.shape.num_layers, cfg).items() if not isinstance(spec, ActConfig)]
    assert set(loaded.weights) == {f"{n}.weight" for n in weights} and "bert.embeddings.word_embeddings" in weights
    for name in weights:
        m = model.get_submodule(name)
        assert torch.equal(bits_of(sd[f"{name}.weight"]), bits_of(m.weight_quantizer(m.weight).detach())), name
    ids = torch.tensor([[2, 9, 30, 3, 0]])  # the looked-up rows (what training quantizes) equal the stored table's
    emb = model.bert.embeddings.word_embeddings
    assert torch.equal(bits_of(emb(ids).detach()), bits_of(sd["bert.embeddings.word_embeddings.weight"][ids]))
    for name, t in model.state_dict().items():  # what stays FP is stored as it is
        if name not in loaded.weights:
            assert torch.equal(sd[name], t), name
    assert loaded.acts == {n: s for n, s in quant_plan(model.shape.num_layers, cfg).items() if isinstance(s, ActConfig)}
    packed_bytes = sum(len(E.pack_codes(w.codes, w.bits)) for w in loaded.weights.values())
    assert packed_bytes == sum(-(-w.codes.numel() * w.bits // 8) for w in loaded.weights.values())
    assert loaded.weights["bert.embeddings.word_embeddings.weight"].bits == (embedding_bits or weight_bits)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity", ["tensor", "token"])
@pytest.mark.parametrize("exclude_padding", [False, True])
@pytest.mark.parametrize("clip", [2.5, None])
@pytest.mark.parametrize("signed", [False, True])
def test_onnx_activation_quantizer_gives_the_training_codes_exactly(bits, granularity, exclude_padding, clip, signed):
    spec = ActConfig(bits, clip, granularity, exclude_padding)
    x = torch.randn(3, 9, 40) * 1.5
    x[0, 0, :3] = torch.tensor([4.0, -4.0, -2.5])  # beyond the clip
    x[2, 1] = 0  # a zero token
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[1, 6:] = False
    valid[2, 4:] = False
    x[1, 7] *= 9  # padding beyond the valid max
    session = E.onnx_session(E.build_act_onnx(spec, signed).SerializeToString())
    codes, step = session.run(None, {"x": x.numpy(), "mask": valid[:, :, None].float().numpy()})
    ref, _, ref_step = symmetric_codes(x, bits, clip, None if granularity == "tensor" else (-1,),
                                       valid[:, :, None] if exclude_padding else None)
    got = torch.from_numpy(codes).to(torch.int16) - (0 if signed else 128)
    assert torch.equal(got, ref.to(torch.int16))
    assert torch.equal(torch.from_numpy(step).reshape(ref_step.shape), ref_step)


@pytest.mark.parametrize("weight_bits", [2, 8])
@pytest.mark.parametrize("granularity", ["tensor", "token"])
@pytest.mark.parametrize("shape", [(32, 37), (384, 96)])
def test_one_quantized_linear_through_onnx(granularity, shape, weight_bits):
    """The ONNX linear is the exact integer sum scaled once: within ~1 ulp of the exact value (fp64), closer than the
    fake-quant fp32 F.linear itself, whose difference from ONNX is its own summation rounding. 8-bit weights: the
    u8·u8 product (an int8 B side saturates in onnxruntime's u8·s8 kernel on CPUs without VNNI)."""
    K, N = shape
    lin = nn.Linear(K, N)
    nn.init.normal_(lin.weight, std=0.05)
    act = ActConfig(granularity=granularity)
    x = torch.randn(3, 7, K) * 1.3
    spec = TernaryWeightConfig() if weight_bits == 2 else UniformWeightConfig(bits=weight_bits)
    with torch.no_grad():
        fq = QuantLinear.from_linear(lin, spec)(quantize_activation(x, act))
    pw = E.pack_weight(lin.weight, spec)
    got = torch.from_numpy(
        E.onnx_session(E.build_linear_onnx(pw, lin.bias.detach(), act).SerializeToString()).run(None, {"x": x.numpy()})[0])
    codes, _, step = symmetric_codes(x, 8, 2.5, None if granularity == "tensor" else (-1,))
    prod = (codes.double() @ pw.codes.double().T) * step.double() * pw.scale.double()
    exact = prod + lin.bias.detach().double()
    eps = torch.finfo(torch.float32).eps
    bound = 2 * eps * (prod.abs() + lin.bias.detach().double().abs())  # two roundings of the scale, one of the add
    assert ((got.double() - exact).abs() <= bound).all()
    assert (got.double() - exact).abs().max() <= (fq.double() - exact).abs().max()
    print(f"K={K} {granularity}: max|onnx-fq| {(got - fq).abs().max():.3g}, max|onnx-exact| "
          f"{(got.double() - exact).abs().max():.3g}, max|fq-exact| {(fq.double() - exact).abs().max():.3g}")


def _batches(vocab: int, n: int = 4):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        B, S = 4, 12 + (5 * i) % 40
        ids = torch.randint(5, vocab, (B, S), generator=g)
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[1, S - 4:] = False
        mask[3, 5:] = False
        types = (torch.arange(S) > S // 2).long().expand(B, S) * mask  # a second segment
        out.append(Batch(ids * mask, types, mask, torch.zeros(B)))
    return out


QUANT_VARIANTS = {"tensor": {}, "token": {"act_granularity": "token"}, "exclude_padding": {"act_exclude_padding": True},
                  "token_exclude_padding": {"act_granularity": "token", "act_exclude_padding": True},
                  "w4": {"weight_bits": 4}, "w8": {"weight_bits": 8}, "a4": {"input_bits": 4},
                  "emb4": {"embedding_bits": 4}, "emb8": {"embedding_bits": 8},
                  "no_attn_acts": {"attn_acts": False},
                  "no_act_clip": {"act_clip": False}, "learned_clip": {"act_learned_clip": True},
                  "fp_qkv_embeddings_pooler": {"qkv": False, "embeddings": False, "pooler": False},
                  "fp": {"enabled": False}}


@pytest.mark.parametrize("variant", list(QUANT_VARIANTS))
def test_whole_model_onnx_matches_the_fake_quant_model(tiny_base, variant):
    cfg = QuantConfig(**QUANT_VARIANTS[variant])
    model = quantize_model(load_bert(tiny_base), cfg).eval()
    model64 = quantize_model(load_bert(tiny_base), cfg).eval().double()
    if cfg.act_learned_clip:  # trained clips differ per slot (and from clip_val): give each its own
        clips = {name: 0.8 + 0.05 * i for i, name in enumerate(learned_clips(model))}
        load_learned_clips(model, clips)
        load_learned_clips(model64, clips)
    session = E.onnx_session(E.build_onnx(E.student_from_model(model, cfg)).SerializeToString())
    report = E.parity(model, model64, session, _batches(model.shape.vocab_size, 32))
    print(variant, report)
    assert_parity(report)


def assert_parity(report: dict):
    """ONNX and PyTorch are two fp32 roundings of one function, as fp32 and fp64 PyTorch are: fp32 noise, plus now and
    then an activation code one step off (a flip, see `export.parity`) — about as often as between fp32 and fp64.
    A wrong scale, zero point or saturation would show as differences on every example."""
    assert report["argmax_agreement"] == 1.0
    flips, yardstick = report["examples_with_a_code_flip_onnx_vs_torch"], report["examples_with_a_code_flip_torch_fp64_vs_fp32"]
    assert flips <= 2 * yardstick + 0.05 * report["examples"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_base, glue_dir):
    tmp = tmp_path_factory.mktemp("export_run")
    argv = ["--data.task", "sts-b", *tiny_flags(tmp, tiny_base, glue_dir, 2)]
    assert quant_task_glue.main(argv) == 0
    return next((tmp / "out" / "sts-b").iterdir())


def test_export_run_writes_the_folder_and_evaluates_like_the_torch_student(tiny_run, glue_dir, capsys):
    assert export_student.main([str(tiny_run), "--glue-dir", str(glue_dir), "--parity-examples", "16"]) == 0
    out = tiny_run / "export"
    for f in (E.STUDENT_FILE, E.ONNX_FILE, "export.json", "run_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    info = json.loads((out / "export.json").read_text())
    assert info["sizes"]["compression_vs_fp32"] > 1 and info["parity"]["source"] == "dev"
    p = info["parity"]
    assert p["examples_with_a_code_flip_onnx_vs_torch"] <= 2 + 2 * p["examples_with_a_code_flip_torch_fp64_vs_fp32"]
    capsys.readouterr()
    flags = ["--data.glue_dir", str(glue_dir)]
    assert quant_task_glue.main(["--evaluate", str(tiny_run), *flags]) == 0
    torch_metrics = json.loads(capsys.readouterr().out)
    assert quant_task_glue.main(["--evaluate", str(out), *flags]) == 0
    onnx_metrics = json.loads(capsys.readouterr().out)
    assert onnx_metrics.keys() == torch_metrics.keys()
    for k in torch_metrics:
        assert onnx_metrics[k] == pytest.approx(torch_metrics[k], abs=1e-4), k


def test_export_without_glue_data_checks_parity_on_random_tokens(tiny_run, tmp_path):
    info = E.export_run(tiny_run, tmp_path / "export", glue_dir=str(tmp_path / "no_glue"))
    assert info["parity"]["source"].startswith("random tokens") and info["parity"]["examples"] == 8
    assert E.is_export_folder(tmp_path / "export")


@pytest.mark.slow
@needs_minilm
@pytest.mark.parametrize("variant", ["tensor", "token"])
def test_minilm_onnx_matches_the_fake_quant_model(variant):
    from transformers import AutoTokenizer
    cfg = QuantConfig(**QUANT_VARIANTS[variant])
    torch.manual_seed(0)
    model = quantize_model(load_bert(MINILM, num_labels=3, new_classifier=True), cfg).eval()
    nn.init.normal_(model.classifier.weight, std=0.5)  # HF's 0.02 init leaves near-ties that any rounding flips
    model64 = quantize_model(load_bert(MINILM, num_labels=3, new_classifier=True), cfg)
    model64.load_state_dict(model.state_dict())
    model64 = model64.eval().double()
    session = E.onnx_session(E.build_onnx(E.student_from_model(model, cfg)).SerializeToString())
    tok = AutoTokenizer.from_pretrained(str(MINILM))
    texts = ["a man is playing a guitar.", "the quick brown fox jumps over the lazy dog, twice.", "hello",
             "ternary weights and eight-bit activations make a small and fast encoder"]
    batches = []
    for first, second in ((texts[:2], texts[2:]), (texts[1:], None)):  # a batch of pairs, one of single sentences
        enc = tok(first, second, padding=True, return_tensors="pt")
        batches.append(Batch(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"].bool(), torch.zeros(2)))
    report = E.parity(model, model64, session, batches)
    print(variant, report)
    assert report["argmax_agreement"] == 1.0
    # six layers of 384-wide activations: every example has some flipped codes, in fp64 as in ONNX; compare sizes
    assert report["max_abs_logit_diff_onnx_vs_torch"] <= 2 * report["max_abs_logit_diff_torch_fp64_vs_fp32"]


@pytest.mark.slow
@needs_minilm
def test_bench_export_quick_writes_every_row(tmp_path):
    import sys
    from tests.conftest import REPO
    sys.path.insert(0, str(REPO / "bench"))
    import bench_export
    assert bench_export.main(["--quick", "--out", str(tmp_path / "b.json")]) == 0
    res = json.loads((tmp_path / "b.json").read_text())["models"]["minilm"]
    assert set(res["ms"]["1"]) == set(bench_export.ROWS) and all(v > 0 for v in res["ms"]["8"].values())
    assert res["bytes"]["packed W2A8 (safetensors)"] * 10 < res["bytes"]["torch fp32"]
