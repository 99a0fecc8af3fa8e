"""Quantizer properties, exact equality with short references written here, STE gradients, the model swap."""
import copy

import pytest
import torch
from torch import nn

from transformer.config import QuantConfig
from transformer.model import ActSlot, BertForGlue
from transformer.quant import (ActConfig, ActFakeQuantizer, learned_clips, load_learned_clips, QuantEmbedding, QuantLinear, TernaryWeightConfig,
                               UniformWeightConfig, WeightFakeQuantizer, quant_plan, quantize_activation, quantize_model,
                               set_quant_enabled, symmetric_codes, ternarize, uniform_quantize)
from tests.conftest import TINY

TERNARY = TernaryWeightConfig()
ACT8 = ActConfig()


def twn_reference(w: torch.Tensor, t: float = 0.7, clip: float = 2.5) -> torch.Tensor:
    """docs/algorithms.md §2 TWN, per tensor, written out literally."""
    w = torch.clamp(w, -clip, clip)
    delta = t * w.abs().mean()
    m = (w.abs() > delta).float()
    alpha = (w.abs() * m).sum() / m.sum()
    return alpha * torch.sign(w) * m


def act_reference(x: torch.Tensor, bits: int = 8, clip: float = 2.5) -> torch.Tensor:
    x = torch.clamp(x, -clip, clip)
    step = x.abs().max() / (2 ** (bits - 1) - 1)  # Δ = max/n; codes round(x / Δ) as ONNX QuantizeLinear
    return torch.round(x / step) * step


def test_ternary_matches_reference_exactly():
    w = torch.randn(16, 24) * 1.5
    torch.testing.assert_close(ternarize(w, TERNARY), twn_reference(w), rtol=0, atol=0)


def test_ternary_per_row_matches_reference_row_by_row():
    w = torch.randn(7, 24)
    q = ternarize(w, TernaryWeightConfig(granularity="row"))
    for r in range(7):
        torch.testing.assert_close(q[r], twn_reference(w[r]), rtol=0, atol=0)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_ternary_has_at_most_three_values_and_is_idempotent(granularity):
    cfg = TernaryWeightConfig(granularity=granularity)
    w = torch.randn(9, 40)
    q = ternarize(w, cfg)
    rows = [q] if granularity == "tensor" else list(q)
    for r in rows:
        vals = r.unique()
        assert len(vals) <= 3 and len(vals.abs().unique()) <= 2  # {-α, 0, +α}
    torch.testing.assert_close(ternarize(q, cfg), q, rtol=1e-6, atol=1e-7)


def test_ternary_zero_rows_give_zeros_not_nan():
    w = torch.randn(4, 8)
    w[1] = 0
    q = ternarize(w, TernaryWeightConfig(granularity="row"))
    assert torch.isfinite(q).all() and (q[1] == 0).all()
    assert (ternarize(torch.zeros(3, 3), TERNARY) == 0).all()


def test_ternary_threshold_ratio_is_used():
    w = torch.tensor([[0.1, 0.5, -1.0, 2.0]])  # mean|w| = 0.9
    # ratio 0.7: Δ = 0.63 -> keep -1.0, 2.0 ; α = 1.5.  ratio 0.1: Δ = 0.09 -> keep all ; α = 0.9
    torch.testing.assert_close(ternarize(w, TernaryWeightConfig(threshold_ratio=0.7)), torch.tensor([[0, 0, -1.5, 1.5]]))
    torch.testing.assert_close(ternarize(w, TernaryWeightConfig(threshold_ratio=0.1)), torch.tensor([[0.9, 0.9, -0.9, 0.9]]))


def test_act_quant_matches_reference_and_has_255_levels_zero_maps_to_zero():
    x = torch.randn(3, 5, 16) * 2
    x[0, 0, 0] = 0
    q = quantize_activation(x, ACT8)
    torch.testing.assert_close(q, act_reference(x), rtol=0, atol=0)
    assert len(q.unique()) <= 255 and q[0, 0, 0] == 0
    assert (quantize_activation(torch.zeros(2, 3), ACT8) == 0).all()  # max|x| = 0 -> zeros, no NaN


def test_act_quant_4bit_levels():
    q = quantize_activation(torch.randn(1000), ActConfig(bits=4))
    assert len(q.unique()) <= 15


def test_per_token_scale_does_not_depend_on_the_rest_of_the_batch():
    x = torch.rand(2, 4, 8) - 0.5  # |x| < 2.5: the clamp does not hide the scale change
    y = x.clone()
    y[1] *= 4  # another sequence changes
    cfg = ActConfig(granularity="token")
    torch.testing.assert_close(quantize_activation(x, cfg)[0], quantize_activation(y, cfg)[0], rtol=0, atol=0)
    assert not torch.equal(quantize_activation(x, ACT8)[0], quantize_activation(y, ACT8)[0])  # per tensor does


def test_exclude_padding_ignores_padded_positions():
    x = torch.randn(2, 5, 8) * 0.5
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y = x.clone()
    y[0, 3:] = 2.4  # garbage in padding
    cfg = ActConfig(exclude_padding=True)
    torch.testing.assert_close(quantize_activation(x, cfg, valid)[valid], quantize_activation(y, cfg, valid)[valid],
                               rtol=0, atol=0)
    probs = torch.rand(2, 2, 5, 5)
    probs2 = probs.clone()
    probs2[0, :, 3:, :] = 1.0  # padded query rows of sample 0
    a, b = quantize_activation(probs, cfg, valid), quantize_activation(probs2, cfg, valid)
    torch.testing.assert_close(a[0, :, :3, :3], b[0, :, :3, :3], rtol=0, atol=0)


def test_exclude_padding_saturates_padding_codes_and_clips_their_gradient():
    # the valid max is 1.0, padding holds 2.0: its code would be 254 without saturation (an int8 store wraps it)
    x = torch.tensor([[[0.5], [-1.0], [2.0], [-2.0]]], requires_grad=True)  # (B=1, S=4, D=1)
    valid = torch.tensor([[True, True, False, False]])
    q = quantize_activation(x, ActConfig(exclude_padding=True), valid)
    step = torch.tensor(1.0) / 127  # Δ = valid max / 127
    torch.testing.assert_close(q.detach().flatten(), torch.tensor([round(0.5 * 127), -127, 127, -127]) * step,
                               rtol=0, atol=0)
    q.sum().backward()
    torch.testing.assert_close(x.grad.flatten(), torch.tensor([1.0, 1, 0, 0]))  # saturated = clipped
    codes, _, step = symmetric_codes(x.detach(), 8, 2.5, None, valid[:, :, None])
    assert codes.abs().max() == 127 and step.item() == (torch.tensor(1.0) / 127).item()


def test_cpu_codes_path_equals_the_reference():
    from transformer.fast import symmetric_codes_cpu
    from transformer.quant import symmetric_codes_reference
    for x, dims in ((torch.randn(4, 6, 32) * 2, None), (torch.rand(2, 3, 8, 8), None), (torch.randn(4, 6, 32) * 2, (-1,)),
                    (torch.rand(2, 3, 8, 8) * 0.1, (-1,))):
        for clip in (2.5, None):
            got, ref = symmetric_codes_cpu(x, 127, clip, dims), symmetric_codes_reference(x, 8, clip, dims)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])
            mask = lambda m: torch.ones_like(x, dtype=torch.bool) if m is None else m  # None = nothing clipped
            assert torch.equal(mask(got[1]), mask(ref[1]))


def test_clipped_ste_gradients():
    w = torch.tensor([-3.0, -2.5, -1.0, 0.2, 2.4, 2.5, 4.0], requires_grad=True)
    ternarize(w, TERNARY).sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([0.0, 0, 1, 1, 1, 0, 0]))
    x = torch.tensor([-9.0, 0.3, 2.6], requires_grad=True)
    quantize_activation(x, ACT8).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1, 0]))
    x.grad = None
    quantize_activation(x, ActConfig(clip=None)).sum().backward()  # no clamp: identity gradient
    torch.testing.assert_close(x.grad, torch.ones(3))


def test_uniform_weight_levels():
    w = torch.randn(32, 32)
    for bits in (4, 8):
        q = uniform_quantize(w, UniformWeightConfig(bits=bits))
        assert len(q.unique()) <= 2 ** bits - 1
        torch.testing.assert_close(q, act_reference(w, bits), rtol=0, atol=0)


def test_quant_linear_matches_reference_exactly():
    lin = nn.Linear(16, 8)
    ql = QuantLinear.from_linear(copy.deepcopy(lin), TERNARY)
    act = ActFakeQuantizer(ACT8)
    x = torch.randn(3, 5, 16)
    ref = torch.nn.functional.linear(act_reference(x), twn_reference(lin.weight.detach()), lin.bias)
    torch.testing.assert_close(ql(act(x)), ref, rtol=0, atol=0)


def test_disabled_quant_is_exactly_linear_also_after_a_step():
    lin = nn.Linear(16, 8)
    ql = QuantLinear.from_linear(copy.deepcopy(lin), TERNARY)
    ql.weight_quantizer.enabled = False
    x = torch.randn(4, 16)
    torch.testing.assert_close(ql(x), lin(x), rtol=0, atol=0)
    for m in (lin, ql):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(x).square().sum().backward()
        opt.step()
    torch.testing.assert_close(ql.weight, lin.weight, rtol=0, atol=0)


def test_latent_weight_changes_after_a_step():
    ql = QuantLinear.from_linear(nn.Linear(16, 8), TERNARY)
    before = ql.weight.detach().clone()
    opt = torch.optim.SGD(ql.parameters(), lr=0.1)
    ql(torch.randn(4, 16)).square().sum().backward()
    assert ql.weight.grad is not None and ql.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, ql.weight)


def test_quant_embedding_equals_quantizing_the_whole_table():
    emb = nn.Embedding(20, 8, padding_idx=0)
    qe = QuantEmbedding.from_embedding(copy.deepcopy(emb), TernaryWeightConfig(granularity="row"))
    ids = torch.tensor([[1, 5, 5, 0], [19, 3, 2, 2]])
    table = emb.weight.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.embedding(ids, ternarize(table, TernaryWeightConfig(granularity="row")), 0)
    out = qe(ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(qe.weight.grad, table.grad)


@pytest.mark.parametrize("bits", [4, 8])
def test_embedding_bits_give_per_row_uniform_levels_with_ternary_linears(bits):
    cfg = QuantConfig(embedding_bits=bits)
    plan = quant_plan(1, cfg)
    assert plan["bert.embeddings.word_embeddings"] == UniformWeightConfig(bits, "row", 2.5)
    assert isinstance(plan["bert.encoder.layer.0.attention.self.query"], TernaryWeightConfig)  # linears unchanged
    table = torch.randn(6, 32)
    table[2] *= 10  # a row with a larger range has its own step
    q = WeightFakeQuantizer(plan["bert.embeddings.word_embeddings"])(table)
    n = 2 ** (bits - 1) - 1
    for row, qrow in zip(table, q):
        step = row.clamp(-2.5, 2.5).abs().max() / n
        torch.testing.assert_close(qrow, torch.round(row.clamp(-2.5, 2.5) / step) * step, rtol=0, atol=0)
        assert len(torch.unique(qrow)) <= 2 * n + 1


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def test_quantize_model_swaps_what_spec_says_and_keeps_parameters():
    model = BertForGlue(TINY)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    quantize_model(model, QuantConfig())
    assert list(model.state_dict()) == keys  # HF names unchanged: saved students load anywhere
    assert all(p is params[n] for n, p in model.named_parameters())  # same Parameter objects
    L = TINY.num_layers
    assert _count(model, QuantLinear) == 6 * L + 1  # Q, K, V, attn-out, FFN1, FFN2 per layer + pooler
    assert type(model.classifier) is nn.Linear
    assert isinstance(model.bert.embeddings.word_embeddings, QuantEmbedding)
    assert type(model.bert.embeddings.position_embeddings) is nn.Embedding
    assert _count(model, ActFakeQuantizer) == 8 * L + 1  # qkv in, q, k, v, probs, attn-out in, FFN1 in, FFN2 in; pooler
    assert _count(model, ActSlot) == 0


def test_component_switches():
    model = quantize_model(BertForGlue(TINY), QuantConfig(ffn1=False, ffn2=False, embeddings=False, attn_acts=False))
    assert _count(model, QuantLinear) == 4 * TINY.num_layers + 1
    assert _count(model, ActFakeQuantizer) == 2 * TINY.num_layers + 1
    assert type(model.bert.embeddings.word_embeddings) is nn.Embedding
    fp = BertForGlue(TINY)
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    assert quantize_model(fp, QuantConfig(enabled=False)) is fp  # disabled: the same model, untouched
    assert _count(fp, QuantLinear) == _count(fp, ActFakeQuantizer) == 0 and _count(fp, ActSlot) == 8 * TINY.num_layers + 1
    assert all(torch.equal(v, before[k]) for k, v in fp.state_dict().items())


def test_disabled_quantized_model_equals_fp_model():
    fp = BertForGlue(TINY).eval()
    q = quantize_model(copy.deepcopy(fp), QuantConfig()).eval()
    ids = torch.randint(5, TINY.vocab_size, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    args = (ids, torch.zeros_like(ids), mask)
    assert not torch.equal(q(*args).logits, fp(*args).logits)
    set_quant_enabled(q, False)
    torch.testing.assert_close(q(*args).logits, fp(*args).logits, rtol=0, atol=0)


def test_bad_bits_are_rejected():
    from transformer.config import ConfigError
    with pytest.raises(ConfigError, match="weight_bits"):
        QuantConfig(weight_bits=3)
    with pytest.raises(ConfigError, match="input_bits"):
        QuantConfig(input_bits=16)


# ---------------------------------------------------------------- cheaper paths, same semantics (issue 5)

def test_nothing_clipped_path_matches_the_reference_with_identity_gradient():
    # attention probabilities after dropout lie in [0, 1/0.9]: below the clip, so the clamp and STE mask are skipped
    probs = (torch.rand(2, 3, 6, 6).softmax(-1) / 0.9).requires_grad_()
    q = quantize_activation(probs, ACT8)
    torch.testing.assert_close(q, act_reference(probs.detach()), rtol=0, atol=0)
    q.backward(torch.arange(q.numel(), dtype=q.dtype).view_as(q))
    torch.testing.assert_close(probs.grad, torch.arange(q.numel(), dtype=q.dtype).view_as(q), rtol=0, atol=0)
    w = (torch.randn(16, 24) * 0.1).requires_grad_()  # |w| < clip everywhere
    torch.testing.assert_close(ternarize(w, TERNARY), twn_reference(w.detach()), rtol=0, atol=0)
    ternarize(w, TERNARY).sum().backward()
    assert (w.grad == 1).all()


def test_per_token_scale_matches_a_row_by_row_reference():
    x = torch.randn(3, 5, 16) * 2
    x[1] *= 0.1  # a whole sequence below the clip
    q = quantize_activation(x, ActConfig(granularity="token"))
    for b in range(3):
        for t in range(5):
            torch.testing.assert_close(q[b, t], act_reference(x[b, t]), rtol=0, atol=0)


def _saved_bytes(fn, x):
    """Bytes of the tensors the autograd graph of fn(x) keeps for the backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(x)
    return sum(t.numel() * t.element_size() for t in saved)


def test_activation_ste_keeps_a_byte_mask_and_nothing_when_nothing_is_clipped():
    x = (torch.randn(4, 8, 32) * 2).requires_grad_()
    assert _saved_bytes(lambda t: quantize_activation(t, ACT8), x) == x.numel()  # one bool per element
    probs = torch.rand(4, 2, 8, 8).softmax(-1).requires_grad_()
    assert _saved_bytes(lambda t: quantize_activation(t, ACT8), probs) == 0


# ---------------------------------------------------------------- saved activations as int8 codes

def _kd_grads(student, teacher, cfg, ti_mode, codes: bool):
    import contextlib
    import transformer.train as T
    from transformer.fast import saved_activations_as_codes
    from transformer.data import Batch
    b = Batch(torch.randint(5, TINY.vocab_size, (4, 9), generator=torch.Generator().manual_seed(1)), torch.zeros(4, 9, dtype=torch.long), torch.ones(4, 9, dtype=torch.bool),
              torch.tensor([0, 1, 1, 0]))
    b.attention_mask[1, 6:] = False
    original = T.saved_activations_as_codes
    T.saved_activations_as_codes = saved_activations_as_codes if codes else contextlib.nullcontext
    try:
        student.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same dropout draws
        loss, _ = T.kd_forward(student, teacher, b, cfg, ti_mode)
        loss.backward()
    finally:
        T.saved_activations_as_codes = original
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("flags,ti_mode", [
    ([], None), (["--loss.attn_score_mse_weight", "0", "--loss.attn_prob_kl_weight", "1"], None),
    (["--loss.attn_output_mse_weight", "1", "--ti.mode", "map"], "map"),
    (["--loss.attn_output_mse_weight", "1", "--ti.mode", "context"], "context"),
    (["--loss.attn_output_mse_weight", "1", "--ti.mode", "output"], "output"),
    # every activation option (the batch has padding): padding-excluded scales, per-token scales, no clip, 4 bits
    (["--quant.act_exclude_padding"], None), (["--quant.act_exclude_padding", "--loss.attn_score_mse_weight", "0",
                                               "--loss.attn_prob_kl_weight", "1"], None),
    (["--quant.act_exclude_padding", "--loss.attn_output_mse_weight", "1", "--ti.mode", "map"], "map"),
    (["--quant.act_granularity", "token"], None), (["--no-quant.act_clip"], None), (["--quant.input_bits", "4"], None),
    (["--quant.act_exclude_padding", "--no-quant.act_clip", "--quant.input_bits", "4"], None)])
def test_int8_codes_of_saved_activations_give_bit_identical_gradients(flags, ti_mode):
    from transformer.config import parse_config
    cfg = parse_config(flags)
    teacher = BertForGlue(TINY)
    student = quantize_model(copy.deepcopy(teacher), cfg.quant).train()
    teacher.eval().requires_grad_(False)
    plain, coded = (_kd_grads(student, teacher, cfg, ti_mode, codes) for codes in (False, True))
    assert plain.keys() == coded.keys()
    for name in plain:
        torch.testing.assert_close(coded[name], plain[name], rtol=0, atol=0, msg=name)


def test_a_quantizer_output_packs_to_int8_codes_that_unpack_to_the_same_bits():
    from transformer.fast import Codes as _Codes, CodeStore as _CodeStore
    from transformer.quant import symmetric_codes
    x = torch.randn(6, 40) * 3
    codes, _, step = symmetric_codes(x, 8, 2.5)
    int_codes = codes.to(torch.int8)
    values = codes * step
    store = _CodeStore()
    store.register(values, int_codes, step)
    packed = store.pack(values)
    assert isinstance(packed, _Codes) and packed.codes.dtype == torch.int8
    assert torch.equal(_CodeStore.unpack(packed), values)
    assert torch.equal(_CodeStore.unpack(store.pack(values.t())), values.t())  # a view of it: packed too
    assert not isinstance(store.pack(x), _Codes)  # any other tensor is kept as it is ...
    y = (x.clone().requires_grad_() * 2).softmax(-1)
    assert store.pack(y).grad_fn is None and store.pack(y).data_ptr() == y.data_ptr()  # ... without its graph: no cycle
    values.add_(1)  # written after it was made: no longer codes · Δ
    assert not isinstance(store.pack(values), _Codes)


needs_compiler = pytest.mark.skipif(not any(__import__("shutil").which(c) for c in ("g++", "c++", "clang++")),
                                    reason="torch.compile on CPU needs a C++ compiler")


@needs_compiler
@pytest.mark.slow  # compiling takes tens of seconds
def test_compiled_quantizer_equals_the_eager_one():
    from transformer.fast import compiled_quantizers
    for x in (torch.randn(4, 9, 32) * 2, torch.rand(2, 3, 9, 9), torch.randn(4, 7, 32) * 0.1):
        for cfg in (ACT8, ActConfig(granularity="token"), ActConfig(clip=None), ActConfig(bits=4)):
            eager = x.clone().requires_grad_()
            fused = x.clone().requires_grad_()
            q_e = quantize_activation(eager, cfg)
            with compiled_quantizers():
                q_c = quantize_activation(fused, cfg)
            assert torch.equal(q_e, q_c), cfg
            g = torch.randn_like(x)
            q_e.backward(g)
            q_c.backward(g)
            assert torch.equal(eager.grad, fused.grad), cfg


@needs_compiler
@pytest.mark.slow  # compiling takes tens of seconds
def test_a_compiled_kd_step_gives_the_eager_gradients():
    from transformer.config import parse_config
    cfg = parse_config(["--loss.attn_score_mse_weight", "0", "--loss.attn_prob_kl_weight", "1"])
    on = parse_config(["--loss.attn_score_mse_weight", "0", "--loss.attn_prob_kl_weight", "1", "--train.compile"])
    teacher = BertForGlue(TINY)
    student = quantize_model(copy.deepcopy(teacher), cfg.quant).train()
    teacher.eval().requires_grad_(False)
    import transformer.train as T
    from transformer.data import Batch
    b = Batch(torch.randint(5, TINY.vocab_size, (4, 9)), torch.zeros(4, 9, dtype=torch.long),
              torch.ones(4, 9, dtype=torch.bool), torch.tensor([0, 1, 1, 0]))
    grads = []
    for c in (cfg, on):
        student.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss, _ = T.kd_forward(student, teacher, b, c)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0, msg=n)


def test_learned_clip_is_pact_value_and_gradients_by_hand():
    """Forward: the fixed-clip quantizer at clip = α. Backward: x gets w where |x| < α; α gets +w above α, −w below −α."""
    x = torch.tensor([-3.0, -1.0, 0.5, 2.0, 4.0], requires_grad=True)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    q = ActFakeQuantizer(ActConfig(8, 2.5, "tensor", False, learned_clip=True))
    assert isinstance(q.clip, torch.nn.Parameter) and q.clip.item() == 2.5
    out = q(x)
    assert torch.equal(out, quantize_activation(x.detach(), ActConfig(8, 2.5)))
    (out * w).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0]))
    assert q.clip.grad.item() == 5.0 - 1.0
    with torch.no_grad():
        q.clip.fill_(1.5)
    assert torch.equal(q(x), quantize_activation(x.detach(), ActConfig(8, 1.5)))


def test_learned_clips_save_and_load_by_slot_name(tiny_base):
    from transformer.model import load_bert
    cfg = QuantConfig(act_learned_clip=True)
    a, b = (quantize_model(load_bert(tiny_base), cfg) for _ in range(2))
    clips = learned_clips(a)
    assert len(clips) == sum(isinstance(s, ActConfig) for s in quant_plan(a.shape.num_layers, cfg).values())
    assert set(clips.values()) == {2.5}
    load_learned_clips(b, {n: 1.0 + i for i, n in enumerate(clips)})
    assert list(learned_clips(b).values()) == [1.0 + i for i in range(len(clips))]
    with pytest.raises(ValueError, match="missing"):
        load_learned_clips(b, dict(list(clips.items())[1:]))
    assert learned_clips(quantize_model(load_bert(tiny_base), QuantConfig())) == {}
