"""Each KD term on tiny hand-made tensors: hand-computed values, zero for identical inputs, padding invariance."""
import math

import pytest
import torch

from transformer.config import LossConfig
from transformer.losses import (LOSSES, LossContext, attn_output_mse, attn_prob_kl, attn_score_mse, context_mse,
                                distill_loss, hidden_mse, label_loss, logits_kd, required_tensors, sa_output_mse,
                                value_relation_kl)
from transformer.model import MASK_VALUE, EncoderOutput, LayerOutput


def out(logits=None, embeddings=None, **per_layer) -> EncoderOutput:
    """EncoderOutput with one layer holding the given tensors."""
    return EncoderOutput(logits=logits if logits is not None else torch.zeros(1, 2), embeddings=embeddings,
                         layers=[LayerOutput(**per_layer)])


def ctx(valid, labels=None, regression=False, **kw) -> LossContext:
    valid = torch.as_tensor(valid, dtype=torch.bool)
    return LossContext(valid, labels if labels is not None else torch.zeros(len(valid), dtype=torch.long),
                       regression, [0], **kw)


ONE = [[True, True]]


def test_logits_kd_hand_value():
    # p_T = softmax(0, ln 3) = (1/4, 3/4); log_softmax(0, 0) = -ln 2 each -> CE = ln 2
    s, t = out(torch.zeros(1, 2)), out(torch.tensor([[0.0, math.log(3)]]))
    assert logits_kd(s, t, ctx(ONE)).item() == pytest.approx(math.log(2))
    # mean over the batch, sum over classes: a second identical row keeps ln 2
    s2, t2 = out(torch.zeros(2, 2)), out(torch.tensor([[0.0, math.log(3)]] * 2))
    assert logits_kd(s2, t2, ctx([[True]] * 2)).item() == pytest.approx(math.log(2))
    # temperature 2: p_T = softmax(0, ln3/2) = (1/(1+√3), √3/(1+√3)); student uniform -> still ln 2
    assert logits_kd(s, t, ctx(ONE, temperature=2.0)).item() == pytest.approx(math.log(2))


def test_logits_kd_regression_is_mse():
    s, t = out(torch.tensor([[1.0], [3.0]])), out(torch.tensor([[2.0], [1.0]]))
    assert logits_kd(s, t, ctx([[True]] * 2, regression=True)).item() == pytest.approx((1 + 4) / 2)


def test_label_loss_hand_values():
    s = out(torch.tensor([[0.0, 0.0], [0.0, math.log(3)]]))
    # CE: row 0 -> ln 2 ; row 1, label 1 -> -ln(3/4)
    got = label_loss(s, None, ctx([[True]] * 2, labels=torch.tensor([0, 1]))).item()
    assert got == pytest.approx((math.log(2) - math.log(0.75)) / 2)
    r = out(torch.tensor([[2.0], [0.0]]))
    assert label_loss(r, None, ctx([[True]] * 2, labels=torch.tensor([1.0, 2.0]), regression=True)).item() == pytest.approx(2.5)


def test_hidden_mse_sums_embeddings_and_layers():
    z = torch.zeros(1, 2, 3)
    s = out(embeddings=z, hidden=z)
    t = out(embeddings=z + 1, hidden=z + 2)
    assert hidden_mse(s, t, ctx(ONE)).item() == pytest.approx(1 + 4)


def test_attn_score_mse_zeroes_masked_entries():
    # one head, keys: 2 valid + 1 masked; masked columns hold the additive mask on both sides
    s = torch.tensor([[[[1.0, 2.0, MASK_VALUE], [0.0, 0.0, MASK_VALUE], [1.0, 1.0, MASK_VALUE]]]])
    t = torch.tensor([[[[2.0, 2.0, MASK_VALUE + 5], [0.0, 2.0, MASK_VALUE], [1.0, 1.0, MASK_VALUE]]]])
    # squared diffs: (1, 0, 0), (0, 4, 0), (0, 0, 0) over 9 entries
    got = attn_score_mse(out(scores=s), out(scores=t), ctx([[True, True, False]])).item()
    assert got == pytest.approx(5 / 9)


def test_attn_prob_kl_hand_value_on_a_padded_3x3_map():
    # valid length 2 inside S = 3. Teacher rows (1/2, 1/2), student rows (1/4, 3/4) on the valid block.
    pt = torch.tensor([[[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.3, 0.3, 0.4]]]])
    ps = torch.tensor([[[[0.25, 0.75, 0.0], [0.25, 0.75, 0.0], [0.9, 0.05, 0.05]]]])
    row = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    got = attn_prob_kl(out(probs=ps), out(probs=pt), ctx([[True, True, False]])).item()
    assert got == pytest.approx(2 * row / 2)  # Σ over the 2 valid rows, divided by s_b = 2


def test_attn_prob_kl_averages_samples_by_their_own_length():
    # sample 0: length 1 (KL 0); sample 1: length 2 with the rows above -> mean over b of (0, row)
    pt = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    ps = torch.tensor([[[[1.0, 0.0], [0.1, 0.9]]], [[[0.25, 0.75], [0.25, 0.75]]]])
    row = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    got = attn_prob_kl(out(probs=ps), out(probs=pt), ctx([[True, False], [True, True]])).item()
    assert got == pytest.approx((0 + row) / 2)


def test_value_relation_kl_is_zero_for_identical_and_positive_otherwise():
    v = torch.randn(2, 2, 4, 3)
    valid = [[True, True, True, False], [True, True, True, True]]
    assert value_relation_kl(out(value=v), out(value=v.clone()), ctx(valid)).item() == pytest.approx(0, abs=1e-7)
    assert value_relation_kl(out(value=v), out(value=v * 2), ctx(valid)).item() > 0


@pytest.mark.parametrize("fn,name", [(attn_output_mse, "attn_output"), (sa_output_mse, "sa_output")])
def test_token_mse_hand_value(fn, name):
    a, b = torch.zeros(1, 2, 2), torch.tensor([[[1.0, 1.0], [3.0, 1.0]]])
    assert fn(out(**{name: a}), out(**{name: b}), ctx(ONE)).item() == pytest.approx((1 + 1 + 9 + 1) / 4)


def test_context_mse_hand_value():
    a, b = torch.zeros(1, 1, 2, 2), torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    assert context_mse(out(context=a), out(context=b), ctx(ONE)).item() == pytest.approx(1.0)


def _pad(x, dims, n, value):
    """Append n positions filled with `value` along each of dims."""
    for d in dims:
        shape = list(x.shape)
        shape[d] = n
        x = torch.cat([x, torch.full(shape, value)], dim=d)
    return x


@pytest.mark.parametrize("name,fn,dims", [
    ("attn_output", attn_output_mse, (1,)), ("sa_output", sa_output_mse, (1,)), ("context", context_mse, (2,)),
    ("scores", attn_score_mse, (2, 3)), ("probs", attn_prob_kl, (2, 3)), ("value", value_relation_kl, (2,)),
])
def test_padding_does_not_change_masked_losses(name, fn, dims):
    B, H, S, D = 2, 2, 3, 4
    shape = (B, S, D) if dims == (1,) else (B, H, S, S) if len(dims) == 2 else (B, H, S, D)
    a, b = torch.rand(shape), torch.rand(shape)
    if name == "probs":
        a, b = a.softmax(-1), b.softmax(-1)
    valid = torch.ones(B, S, dtype=torch.bool)
    base = fn(out(**{name: a}), out(**{name: b}), ctx(valid, padding_invariant=True)).item()
    # pad 2 positions with different garbage on each side; probs/scores padded keys as a masked model would give
    fill_a, fill_b = (0.0, 0.0) if name == "probs" else (MASK_VALUE, MASK_VALUE) if name == "scores" else (0.7, -0.3)
    pa, pb = _pad(a, dims, 2, fill_a), _pad(b, dims, 2, fill_b)
    if len(dims) == 2:  # padded query rows are garbage, not masked
        pa[..., S:, :S] = 0.123
        pb[..., S:, :S] = 0.456
    pvalid = torch.cat([valid, torch.zeros(B, 2, dtype=torch.bool)], dim=1)
    padded = fn(out(**{name: pa}), out(**{name: pb}), ctx(pvalid, padding_invariant=True)).item()
    assert padded == pytest.approx(base, rel=1e-5)


def test_published_mse_averages_over_padding():
    a, b = torch.zeros(1, 2, 1), torch.ones(1, 2, 1)
    padded = (_pad(a, (1,), 2, 0.0), _pad(b, (1,), 2, 0.0))
    valid = torch.tensor([[True, True, False, False]])
    assert attn_output_mse(out(attn_output=padded[0]), out(attn_output=padded[1]), ctx(valid)).item() == pytest.approx(0.5)
    assert attn_output_mse(out(attn_output=padded[0]), out(attn_output=padded[1]),
                           ctx(valid, padding_invariant=True)).item() == pytest.approx(1.0)


def test_every_term_is_zero_for_identical_outputs():
    B, H, S, D = 2, 2, 3, 4
    probs = torch.rand(B, H, S, S).softmax(-1)
    tensors = dict(hidden=torch.rand(B, S, D), scores=torch.rand(B, H, S, S), probs=probs, context=torch.rand(B, H, S, D),
                   value=torch.rand(B, H, S, D), sa_output=torch.rand(B, S, D), attn_output=torch.rand(B, S, D))
    o = EncoderOutput(torch.rand(B, 2), torch.rand(B, S, D), [LayerOutput(**tensors)])
    c = ctx([[True, True, False], [True, True, True]])
    for name, fn in LOSSES.items():
        if name not in ("label_loss", "logits_kd"):
            assert fn(o, o, c).item() == pytest.approx(0, abs=1e-6), name
    p = o.logits.softmax(-1)  # soft CE of identical logits is the teacher's entropy
    assert logits_kd(o, o, c).item() == pytest.approx(-(p * p.log()).sum(-1).mean().item())


def test_distill_loss_weights_terms_and_required_tensors():
    cfg = LossConfig(logits_kd_weight=2.0, hidden_mse_weight=0.0, attn_score_mse_weight=0.0, attn_output_mse_weight=0.5)
    assert required_tensors(cfg) == {"attn_output"}
    s = out(torch.zeros(1, 2), attn_output=torch.zeros(1, 2, 2))
    t = out(torch.tensor([[0.0, math.log(3)]]), attn_output=torch.ones(1, 2, 2))
    total, terms = distill_loss(s, t, ctx(ONE), cfg)
    assert set(terms) == {"logits_kd", "attn_output_mse"}
    assert total.item() == pytest.approx(2 * math.log(2) + 0.5 * 1.0)
    assert required_tensors(LossConfig()) == {"hidden", "scores"}  # TernaryBERT baseline


def test_layer_map_pairs_student_layers_with_teacher_layers():
    z = torch.zeros(1, 2, 2)
    s = EncoderOutput(torch.zeros(1, 2), z, [LayerOutput(attn_output=z)])
    t = EncoderOutput(torch.zeros(1, 2), z, [LayerOutput(attn_output=z + 1), LayerOutput(attn_output=z + 3)])
    c = LossContext(torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, dtype=torch.long), False, layer_map=[1])
    assert attn_output_mse(s, t, c).item() == pytest.approx(9.0)


def test_negative_or_all_zero_coefficients_are_rejected():
    from transformer.config import ConfigError
    with pytest.raises(ConfigError, match="attn_prob_kl_weight"):
        LossConfig(attn_prob_kl_weight=-1)
    with pytest.raises(ConfigError, match="every loss coefficient is 0"):
        LossConfig(logits_kd_weight=0, hidden_mse_weight=0, attn_score_mse_weight=0)


# ---------------------------------------------------------------- custom backwards equal autograd through the formula

def _kl_reference(p_t, p_s, valid):
    """row_kl written with plain autograd ops (the formula of docs/algorithms.md §4)."""
    pair = (valid[:, :, None] & valid[:, None, :])[:, None]
    kl = p_t * (p_t.clamp_min(1e-8).log() - p_s.clamp_min(1e-8).log())
    return (kl * pair).sum((-1, -2)) / valid.sum(-1, keepdim=True)


def test_row_kl_value_and_gradient_equal_autograd_through_the_formula():
    from transformer.losses import row_kl
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    scores = torch.randn(2, 3, 5, 5) * 6
    scores[0, 0, 0, 1] = -40  # a student probability below the 1e-8 floor: no gradient there
    p_t = torch.randn(2, 3, 5, 5).softmax(-1)
    grads = []
    for fn in (row_kl, _kl_reference):
        s = scores.clone().requires_grad_()
        p_s = s.softmax(-1)
        w = torch.arange(6.0).view(2, 3)  # a different upstream gradient per (b, h)
        (fn(p_t, p_s, valid) * w).sum().backward()
        grads.append((fn(p_t, p_s.detach(), valid), s.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)


def test_mse_terms_keep_one_tensor_and_give_the_mse_gradient():
    from transformer.losses import _token_mse
    a, b = torch.randn(2, 4, 3, requires_grad=True), torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)[:, :, None]
    valid = mask[:, :, 0]
    for c, ref in ((ctx(valid), lambda: torch.nn.functional.mse_loss(a, b)),  # published: every entry
                   (ctx(valid, padding_invariant=True), lambda: ((a - b).square() * mask).sum() / (mask.sum() * 3)),
                   (ctx(valid, teacher_padding=False), lambda: ((a - b).square() * mask).sum() / a.numel())):  # cache
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            got = _token_mse(a, b, mask, c)
        assert sum(t.numel() for t in saved if t.dim() == 3) == a.numel()  # the difference only, not a and b
        g_got, = torch.autograd.grad(got, a)
        want = ref()
        g_want, = torch.autograd.grad(want, a)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=0)


def test_a_teacher_without_padding_values_changes_no_gradient_on_real_tokens():
    # the teacher cache's contract: error at padding dropped, denominator kept -> real-token gradients unchanged
    valid = torch.tensor([[True, True, True, False, False]])
    a = torch.randn(1, 5, 4, requires_grad=True)
    t_live = torch.randn(1, 5, 4)
    t_cached = t_live.masked_fill(~valid[:, :, None], 0.0)  # the cache has zeros at padding
    s_out = out(embeddings=a, hidden=a)
    live = hidden_mse(s_out, out(embeddings=t_live, hidden=t_live), ctx(valid))
    cached = hidden_mse(s_out, out(embeddings=t_cached, hidden=t_cached), ctx(valid, teacher_padding=False))
    g_live, = torch.autograd.grad(live, a)
    g_cached, = torch.autograd.grad(cached, a)
    torch.testing.assert_close(g_cached[valid], g_live[valid], rtol=0, atol=0)
    assert (g_cached[~valid] == 0).all()
    pad_error = 2 * ((a - t_live)[~valid].square().sum() / a.numel())  # embeddings + one layer
    torch.testing.assert_close(cached, live - pad_error, rtol=1e-6, atol=1e-7)


def test_a_teacher_tensor_that_requires_grad_is_refused():
    from transformer.losses import _token_mse, row_kl
    with pytest.raises(ValueError, match="teacher"):
        _token_mse(torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True),
                   torch.ones(2, 3, dtype=torch.bool), ctx([[True] * 3] * 2))
    p = torch.randn(1, 1, 3, 3).softmax(-1)
    with pytest.raises(ValueError, match="teacher"):
        row_kl(p.clone().requires_grad_(), p.clone().requires_grad_(), torch.ones(1, 3, dtype=torch.bool))
