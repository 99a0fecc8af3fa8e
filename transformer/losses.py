"""Knowledge-distillation losses (docs/algorithms.md §4): pure functions `<tensor>_<comparison>(s, t, ctx)` + one combiner.

Paper names (TernaryBERT; Kim et al., EMNLP 2022 "KD-QAT"; MiniLM) and ours:

| paper / published flag        | here                | tensor compared                          |
|-------------------------------|---------------------|------------------------------------------|
| pred (P)                      | logits_kd           | logits, soft CE (regression: MSE)        |
| gt                            | label_loss          | logits vs gold label (CE / MSE)          |
| rep (R)                       | hidden_mse          | embeddings + every layer output          |
| attn_score (S)                | attn_score_mse      | pre-softmax scores                       |
| attn_map (M), map_coeff       | attn_prob_kl        | attention probabilities, KL(T‖S)         |
| attn_output (O), output_coeff | attn_output_mse     | post-LayerNorm attention output          |
| sa_output (SA)                | sa_output_mse       | attention-output dense, pre-LayerNorm    |
| context                       | context_mse         | per-head P·V                             |
| value relation (MiniLM)       | value_relation_kl   | softmax(VVᵀ/√d_h), KL(T‖S)               |
| PT, patient KD (PKD)          | cls_norm_mse        | L2-normalised [CLS] hidden state, MSE    |
| logit MSE                     | logits_mse          | logits, MSE (classification too)         |

Layer terms are summed over layers; student layer i is compared with teacher layer `layer_map[i]`. A student of
another hidden size reaches these functions with its hidden states already projected to the teacher's width
(transformer/distill.py `Projections`), so every function here compares tensors of one shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch.nn.functional as F
from torch import Tensor

from transformer import fast
from transformer.config import LossConfig
from transformer.model import EncoderOutput, MASK_VALUE

PROB_FLOOR = 1e-8  # probabilities are clamped here inside the logs of the KL terms (docs/algorithms.md §4)


@dataclass
class LossContext:
    valid: Tensor                 # (B, S) bool, True = real token
    labels: Tensor                # (B,) class index or float score
    regression: bool
    layer_map: list[int]          # student layer i <- teacher layer layer_map[i]
    temperature: float = 1.0
    padding_invariant: bool = False
    teacher_padding: bool = True  # False: the teacher's tensors hold no values at padding positions (teacher cache)


def identity_layer_map(num_layers: int) -> list[int]:
    return list(range(num_layers))


def _layer_pairs(s: EncoderOutput, t: EncoderOutput, ctx: LossContext, name: str):
    for i, j in enumerate(ctx.layer_map):
        yield getattr(s.layers[i], name), getattr(t.layers[j], name)


def _token_mse(a: Tensor, b: Tensor, real: Tensor, ctx: LossContext) -> Tensor:
    """Mean squared error of student a against teacher b; real: bool mask of the real entries, broadcastable to a.
    Published: the mean over every entry, padding included. padding_invariant: the mean over real entries only.
    Teacher without padding values (the teacher cache): no error counted at padding, the denominator still every
    entry, so value = published − the padding entries' error, and the gradient on real entries is the published one."""
    if ctx.padding_invariant:
        return fast.SquaredError.apply(a, b, real) / real.expand_as(a).sum().clamp_min(1)
    return fast.SquaredError.apply(a, b, None if ctx.teacher_padding else real) / a.numel()


def _pair_mask(valid: Tensor) -> Tensor:
    return (valid[:, :, None] & valid[:, None, :])[:, None]  # (B, 1, S, S): valid query and valid key


def logits_kd(s: EncoderOutput, t: EncoderOutput, ctx: LossContext) -> Tensor:
    """pred: −Σ_c softmax(z_T/τ)_c log_softmax(z_S/τ)_c, mean over batch; regression: MSE(z_S, z_T)."""
    if ctx.regression:
        return F.mse_loss(s.logits, t.logits)
    p_t = (t.logits / ctx.temperature).softmax(-1)
    return -(p_t * (s.logits / ctx.temperature).log_softmax(-1)).sum(-1).mean()


def label_loss(s: EncoderOutput, t: EncoderOutput, ctx: LossContext) -> Tensor:
    """gt: cross-entropy to the gold label, mean over batch; regression: MSE to the gold score."""
    if ctx.regression:
        return F.mse_loss(s.logits.squeeze(-1), ctx.labels.to(s.logits.dtype))
    return F.cross_entropy(s.logits, ctx.labels)


def logits_mse(s: EncoderOutput, t: EncoderOutput, ctx: LossContext) -> Tensor:
    """MSE(z_S, z_T), mean over batch and classes (the logit regression of Ba & Caruana 2014; regression: = logits_kd)."""
    return F.mse_loss(s.logits, t.logits)


def cls_norm_mse(s: EncoderOutput, t: EncoderOutput, ctx: LossContext) -> Tensor:
    """PKD "PT": Σ_l mean_b ‖h_S[l]/‖h_S[l]‖₂ − h_T[map(l)]/‖h_T[map(l)]‖₂‖²₂ of the [CLS] layer outputs, (B, D) per layer.
    Summed over the hidden dimension (PKD's squared L2 distance), not averaged."""
    total = 0.0
    for a, b in _layer_pairs(s, t, ctx, "hidden"):
        a, b = F.normalize(a[:, 0].float(), dim=-1), F.normalize(b[:, 0].float(), dim=-1)
        total = total + (a - b).pow(2).sum(-1).mean()
    return total


def hidden_mse(s: EncoderOutput, t: EncoderOutput, ctx: LossContext) -> Tensor:
    """rep: Σ_{l=0..L} MSE(hidden_S[l], hidden_T[map(l)]), embedding output paired with embedding output."""
    mask = ctx.valid[:, :, None]
    hs, ht = s.hidden_states(), t.hidden_states()
    pairs = [(hs[0], ht[0])] + [(hs[i + 1], ht[j + 1]) for i, j in enumerate(ctx.layer_map)]
    return sum(_token_mse(a, b, mask, ctx) for a, b in pairs)


def attn_score_mse(s: EncoderOutput, t: EncoderOutput, ctx: LossContext) -> Tensor:
    """attn_score: Σ_l MSE of pre-softmax scores (B, H, S, S); entries ≤ −100 (masked) zeroed on both sides."""
    # zero masked entries: otherwise the large negative mask constant would dominate the MSE
    mask = _pair_mask(ctx.valid)
    total = 0.0
    for a, b in _layer_pairs(s, t, ctx, "scores"):
        total = total + _token_mse(a.masked_fill(a <= -100, 0), b.masked_fill(b <= -100, 0), mask, ctx)
    return total


def row_kl(p_t: Tensor, p_s: Tensor, valid: Tensor) -> Tensor:
    """(1/s_b) Σ_{i,j<s_b} p_T (log p_T − log p_S) over each sample's valid s_b×s_b block: (B, H, S, S) -> (B, H).
    Probabilities are clamped at PROB_FLOOR inside the logs. Shared by the attn_map loss and the attention-map analysis."""
    per_sample = fast.PairKL.apply(p_t, p_s, _pair_mask(valid), PROB_FLOOR)  # (B, H)
    return per_sample / valid.sum(-1, keepdim=True).to(per_sample.dtype)


def _masked_kl(p_t: Tensor, p_s: Tensor, valid: Tensor) -> Tensor:
    """mean_{b,h} of row_kl."""
    return row_kl(p_t, p_s, valid).mean()


def attn_prob_kl(s: EncoderOutput, t: EncoderOutput, ctx: LossContext) -> Tensor:
    """attn_map: Σ_l KL(T‖S) of attention probabilities, row-wise, averaged over valid query rows, then b and h."""
    return sum(_masked_kl(b, a, ctx.valid) for a, b in _layer_pairs(s, t, ctx, "probs"))


def _value_relation(v: Tensor, valid: Tensor) -> Tensor:
    """softmax(V Vᵀ/√d_h + key mask): (B, H, S, d_h) -> (B, H, S, S)."""
    rel = v @ v.transpose(-1, -2) / math.sqrt(v.shape[-1])
    return (rel + (~valid)[:, None, None, :].to(rel.dtype) * MASK_VALUE).softmax(-1)


def value_relation_kl(s: EncoderOutput, t: EncoderOutput, ctx: LossContext) -> Tensor:
    """MiniLM value relation: Σ_l KL(T‖S) of softmax(VVᵀ/√d_h), masked like attn_prob_kl."""
    return sum(_masked_kl(_value_relation(b, ctx.valid), _value_relation(a, ctx.valid), ctx.valid)
               for a, b in _layer_pairs(s, t, ctx, "value"))


def attn_output_mse(s: EncoderOutput, t: EncoderOutput, ctx: LossContext) -> Tensor:
    """attn_output: Σ_l MSE of LayerNorm(dropout(sa_output) + h_in), (B, S, D)."""
    mask = ctx.valid[:, :, None]
    return sum(_token_mse(a, b, mask, ctx) for a, b in _layer_pairs(s, t, ctx, "attn_output"))


def sa_output_mse(s: EncoderOutput, t: EncoderOutput, ctx: LossContext) -> Tensor:
    """sa_output: Σ_l MSE of the attention-output dense result, before dropout/residual/LayerNorm, (B, S, D)."""
    mask = ctx.valid[:, :, None]
    return sum(_token_mse(a, b, mask, ctx) for a, b in _layer_pairs(s, t, ctx, "sa_output"))


def context_mse(s: EncoderOutput, t: EncoderOutput, ctx: LossContext) -> Tensor:
    """context: Σ_l MSE of per-head P·V, (B, H, S, d_h); padding-invariant: valid query rows only."""
    mask = ctx.valid[:, None, :, None]
    return sum(_token_mse(a, b, mask, ctx) for a, b in _layer_pairs(s, t, ctx, "context"))


LOSSES = {"logits_kd": logits_kd, "label_loss": label_loss, "hidden_mse": hidden_mse,
          "attn_score_mse": attn_score_mse, "attn_prob_kl": attn_prob_kl, "attn_output_mse": attn_output_mse,
          "sa_output_mse": sa_output_mse, "context_mse": context_mse, "value_relation_kl": value_relation_kl,
          "cls_norm_mse": cls_norm_mse, "logits_mse": logits_mse}

# The per-layer tensors (model.KEEPABLE) each term reads.
REQUIRES = {"logits_kd": set(), "label_loss": set(), "hidden_mse": {"hidden"}, "attn_score_mse": {"scores"},
            "attn_prob_kl": {"probs"}, "attn_output_mse": {"attn_output"}, "sa_output_mse": {"sa_output"},
            "context_mse": {"context"}, "value_relation_kl": {"value"}, "cls_norm_mse": {"hidden"}, "logits_mse": set()}


def active_terms(cfg: LossConfig) -> dict[str, float]:
    """Loss name -> coefficient, for the terms with a non-zero coefficient."""
    weights = {f.name[: -len("_weight")]: getattr(cfg, f.name) for f in fields(cfg) if f.name.endswith("_weight")}
    assert set(weights) == set(LOSSES), "LossConfig and LOSSES must name the same terms"
    return {n: w for n, w in weights.items() if w != 0}


def required_tensors(cfg: LossConfig) -> frozenset[str]:
    """What the student and teacher forwards must keep for the enabled terms (nothing else is stored)."""
    return frozenset().union(*(REQUIRES[n] for n in active_terms(cfg)))


def distill_loss(s: EncoderOutput, t: EncoderOutput, ctx: LossContext, cfg: LossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Σ_term coefficient · term; also returns each unweighted term (for logging)."""
    weights = active_terms(cfg)
    if not weights:
        raise ValueError("every loss coefficient is 0: nothing to train")
    terms = {n: LOSSES[n](s, t, ctx) for n in weights}
    return sum(weights[n] * v for n, v in terms.items()), terms
