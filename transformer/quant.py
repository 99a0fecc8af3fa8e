"""Fake quantization for W2A8 students (docs/algorithms.md §2): ternary / uniform weights, symmetric dynamic activations.

Layout (torchao QAT style): small frozen configs -> pure functions -> thin modules with an `enabled`
switch -> one `quantize_model` entry point that swaps modules in place and shares the Parameters.
Every quantizer keeps the latent FP value and trains it through a clipped straight-through estimator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer import fast
from transformer.config import QuantConfig
from transformer.model import ActSlot, BertForGlue


class _STE(torch.autograd.Function):
    """Forward returns exactly `q`; backward passes the gradient to `x`, zeroed where the bool mask `inside`
    (|x| < clip, made in the forward) is False; no mask: identity. The backward keeps 1 byte per element alive
    (or nothing) instead of the full-precision input."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, inside: Tensor | None) -> Tensor:
        ctx.masked = inside is not None
        if ctx.masked:
            ctx.save_for_backward(inside)
        return q

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.masked:
            (inside,) = ctx.saved_tensors
            grad = grad * inside  # a NaN gradient stays NaN (the loop's non-finite guard sees it)
        return grad, None, None


def clipped_ste(x: Tensor, q: Tensor, inside: Tensor | None) -> Tensor:
    """Value of `q`, gradient of identity into `x` where the bool mask `inside` is True (None: nothing clipped)."""
    return _STE.apply(x, q, inside)


# ---------------------------------------------------------------------------------------------
# Weights

@dataclass(frozen=True)
class TernaryWeightConfig:
    granularity: Literal["tensor", "row"] = "tensor"  # row: one Δ, α per output row (word embeddings)
    threshold_ratio: float = 0.7                       # Δ = ratio · mean|w|  (TWN, Li et al. 2016)
    clip: float = 2.5                                  # clamp w to ±clip first


@dataclass(frozen=True)
class UniformWeightConfig:
    bits: int = 8                                      # symmetric: levels -(2^(b-1)-1) .. 2^(b-1)-1, scale from max|w|
    granularity: Literal["tensor", "row"] = "tensor"
    clip: float = 2.5


def _mean(x: Tensor, per_row: bool) -> Tensor:
    return x.mean(dim=-1, keepdim=True) if per_row else x.mean()


def _sum(x: Tensor, per_row: bool) -> Tensor:
    return x.sum(dim=-1, keepdim=True) if per_row else x.sum()


@torch.no_grad()
def _ternary(w: Tensor, cfg: TernaryWeightConfig) -> tuple[Tensor, Tensor, Tensor]:
    per_row = cfg.granularity == "row"
    a = w.abs().clamp_max_(cfg.clip)  # |clamp(w, ±clip)|
    keep = a > cfg.threshold_ratio * _mean(a, per_row)
    kept = keep.to(w.dtype)
    alpha = _sum(a * kept, per_row) / _sum(kept, per_row).clamp_min(1)  # nothing kept -> α = 0, not NaN
    return torch.sign(w).to(torch.int8) * keep, alpha, a


@torch.no_grad()
def ternary_codes(w: Tensor, cfg: TernaryWeightConfig) -> tuple[Tensor, Tensor]:
    """TWN codes sign(w)·[|w| > Δ] on clamped w (int8 in {-1, 0, 1}, w's shape; Δ = t·mean|w|) and the scale α, the
    mean |w| over kept entries (w's dtype; () per tensor, (..., 1) per row = last dim). The fake-quant value is
    codes·α (`ternary_values`); the exporter stores exactly these two. No grad."""
    codes, alpha, _ = _ternary(w, cfg)
    return codes, alpha


@torch.no_grad()
def ternary_values(w: Tensor, cfg: TernaryWeightConfig) -> tuple[Tensor, Tensor | None]:
    """The TWN fake-quant value codes·α of `ternary_codes` ({-α, 0, +α}: the products are exact, and zeros are +0),
    and the STE mask |w| < clip (bool; None when no entry reaches ±clip). No grad."""
    codes, alpha, a = _ternary(w, cfg)
    return codes.to(w.dtype) * alpha, fast.ste_mask(a, cfg.clip)  # |clamp(w)| < clip <=> |w| < clip


def ternarize(w: Tensor, cfg: TernaryWeightConfig) -> Tensor:
    """Ternary fake-quant of w (any shape; per row = last dim) with the clipped STE."""
    return clipped_ste(w, *ternary_values(w, cfg))


@torch.no_grad()
def symmetric_codes(x: Tensor, bits: int, clip: float | None, max_dims: tuple[int, ...] | None = None,
                    valid: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """`symmetric_codes_reference`, through a faster form of it where one applies (`transformer/fast.py`)."""
    if fast.compiled_codes_apply(x, valid, max_dims):
        return fast.symmetric_codes_compiled(x, 2 ** (bits - 1) - 1, clip, max_dims)
    if valid is None and fast.cpu_codes_apply(x, max_dims):
        return fast.symmetric_codes_cpu(x, 2 ** (bits - 1) - 1, clip, max_dims)
    return symmetric_codes_reference(x, bits, clip, max_dims, valid)


@torch.no_grad()
def symmetric_codes_reference(x: Tensor, bits: int, clip: float | None, max_dims: tuple[int, ...] | None = None,
                              valid: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """The integer codes round(x / Δ) (as floats, |codes| ≤ n = 2^(b-1)−1) with the step Δ = max|x| / n after clamping
    to ±clip, the STE mask (bool; None = all True), and Δ; the fake-quantized value is codes · Δ. No grad.

    The division by Δ (not a multiplication by n / max|x|, which rounds differently on ~1 value in 3 million) is
    ONNX QuantizeLinear's definition, so the exported model (`transformer.export`) runs this quantizer bit for bit.
    max_dims: dims reduced for the max (None = whole tensor); valid: bool mask broadcastable to x, False entries
    (padding) are left out of the max. Such an entry can lie beyond the valid max: its code saturates at ±n,
    as an 8-bit integer would, and it counts as clipped for the STE. max|x| = 0 gives zeros, not NaN.
    """
    levels = 2 ** (bits - 1) - 1
    c = x.clamp(-clip, clip) if clip is not None else x.clone()  # a fresh tensor: quantized in place below
    a = c.abs()
    masked = a if valid is None else a.masked_fill(~valid, 0)
    m = masked.amax() if max_dims is None else masked.amax(dim=max_dims, keepdim=True)
    inside = fast.ste_mask(a, clip)  # |clamp(x)| < clip  <=>  -clip < x < clip (NaN: False)
    step = m.clamp_min(1e-30) / levels
    codes = c.div_(step).round_()
    if valid is not None:  # only padding entries can exceed the valid max
        codes.clamp_(-levels, levels)
        within = a <= m
        inside = within if inside is None else inside & within
    return codes, inside, step


def uniform_quantize(w: Tensor, cfg: UniformWeightConfig) -> Tensor:
    """Symmetric uniform fake-quant of a weight tensor (one scale per tensor or per row), clipped STE."""
    dims = (-1,) if cfg.granularity == "row" else None
    codes, inside, step = symmetric_codes(w, cfg.bits, cfg.clip, dims)
    return clipped_ste(w, codes.mul_(step), inside)


class WeightFakeQuantizer(nn.Module):
    def __init__(self, config: TernaryWeightConfig | UniformWeightConfig):
        super().__init__()
        self.config, self.enabled = config, True

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        if isinstance(self.config, TernaryWeightConfig):
            return ternarize(w, self.config)
        return uniform_quantize(w, self.config)

    def extra_repr(self) -> str:
        return f"{self.config}, enabled={self.enabled}"


# ---------------------------------------------------------------------------------------------
# Activations

@dataclass(frozen=True)
class ActConfig:
    bits: int = 8
    clip: float | None = 2.5                        # None: no clamp
    granularity: Literal["tensor", "token"] = "tensor"  # token: one scale per token (per attention row for probs)
    exclude_padding: bool = False                   # padding positions do not enter the max
    learned_clip: bool = False                      # clip is a trained Parameter's starting value (PACT)


def _valid_mask(x: Tensor, valid: Tensor | None) -> Tensor | None:
    """Broadcast the (B, S) token mask to x: (B, S, D) tokens, (B, H, S, S) query rows and keys, (B, D) [CLS]."""
    if valid is None or x.dim() == 2:
        return None
    if x.dim() == 3:
        return valid[:, :, None]
    return valid[:, None, :, None] & valid[:, None, None, :]


def quantize_activation(x: Tensor, cfg: ActConfig, valid: Tensor | None = None) -> Tensor:
    """Symmetric dynamic fake-quant of an activation (docs/algorithms.md §2), clipped STE."""
    mask = _valid_mask(x, valid) if cfg.exclude_padding else None
    dims = None if cfg.granularity == "tensor" else (-1,)
    codes, inside, step = symmetric_codes(x, cfg.bits, cfg.clip, dims, mask)
    store = fast.code_store()  # saved for the backward as int8 codes (speed only; see fast.saved_activations_as_codes)
    int_codes = codes.to(torch.int8) if store is not None and step.numel() == 1 else None  # |codes| ≤ 127
    out = clipped_ste(x, codes.mul_(step), inside)
    if int_codes is not None:
        store.register(out, int_codes, step)
    return out


def quantize_activation_learned_clip(x: Tensor, clip: Tensor, cfg: ActConfig, valid: Tensor | None = None) -> Tensor:
    """PACT (Choi et al., 2018), symmetric: clamp x to ±clip with `clip` a trained scalar, then the same dynamic
    quantizer (scale max|clamped x| / n). Gradients: to x where |x| < clip (straight through the rounding), to clip
    +1 / −1 from each entry above +clip / below −clip (d clamp / d clip)."""
    clip = clip.to(x.dtype)
    c = torch.minimum(torch.maximum(x, -clip), clip)
    mask = _valid_mask(x, valid) if cfg.exclude_padding else None
    codes, inside, step = symmetric_codes(c.detach(), cfg.bits, None, None if cfg.granularity == "tensor" else (-1,), mask)
    return clipped_ste(c, codes.mul_(step), inside)


class ActFakeQuantizer(nn.Module):
    """Drop-in for the model's `ActSlot`: same (x, valid) signature. With config.learned_clip it owns the Parameter
    `clip` (PACT), started at config.clip."""

    def __init__(self, config: ActConfig):
        super().__init__()
        self.config, self.enabled = config, True
        if config.learned_clip:
            self.clip = nn.Parameter(torch.tensor(float(config.clip)))

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        # .float(): under bf16 autocast the scale and the rounding are still computed in fp32 (a no-op for fp32 input);
        # fp64 stays fp64 (the export's parity reference runs the fake-quant model in float64)
        if not self.enabled:
            return x
        x = x if x.dtype == torch.float64 else x.float()
        if self.config.learned_clip:
            return quantize_activation_learned_clip(x, self.clip, self.config, valid)
        return quantize_activation(x, self.config, valid)

    def extra_repr(self) -> str:
        return f"{self.config}, enabled={self.enabled}"


# ---------------------------------------------------------------------------------------------
# Modules and the swap

class QuantLinear(nn.Linear):
    """nn.Linear whose weight is fake-quantized on every forward; the latent FP weight is the Parameter."""

    weight_quantizer: WeightFakeQuantizer

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config) -> QuantLinear:
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.weight, q.bias = linear.weight, linear.bias  # shared Parameters: optimizer and state_dict unchanged
        q.weight_quantizer = WeightFakeQuantizer(config)
        return q


class QuantEmbedding(nn.Embedding):
    """Word embeddings with one ternary scale per row (TernaryBERT). Rows are independent, so the
    looked-up rows are quantized instead of the whole table: same values and gradients, far cheaper."""

    weight_quantizer: WeightFakeQuantizer

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.weight, self.padding_idx)  # (B, S, D)
        return self.weight_quantizer(rows)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, config: TernaryWeightConfig | UniformWeightConfig) -> QuantEmbedding:
        if config.granularity != "row":
            raise ValueError("QuantEmbedding quantizes looked-up rows, so it needs per-row granularity")
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(q, attr, getattr(emb, attr))
        q.weight = emb.weight
        q.weight_quantizer = WeightFakeQuantizer(config)
        return q


def weight_config(cfg: QuantConfig, per_row: bool = False, bits: int | None = None) -> TernaryWeightConfig | UniformWeightConfig:
    granularity, bits = ("row" if per_row else "tensor"), bits or cfg.weight_bits
    if bits == 2:
        return TernaryWeightConfig(granularity, cfg.threshold_ratio, cfg.clip_val)
    return UniformWeightConfig(bits, granularity, cfg.clip_val)


def act_config(cfg: QuantConfig) -> ActConfig:
    return ActConfig(cfg.input_bits, cfg.clip_val if cfg.act_clip else None, cfg.act_granularity, cfg.act_exclude_padding,
                     cfg.act_learned_clip)


QuantSpec = TernaryWeightConfig | UniformWeightConfig | ActConfig


def quant_plan(num_layers: int, cfg: QuantConfig) -> dict[str, QuantSpec]:
    """What is quantized, and how: qualified module name -> the weight config (Linears, the word embeddings) or the
    activation config (`ActSlot`s) of its fake quantizer, as selected by the component switches of `cfg` (docs/algorithms.md §2.4).
    A module not named stays full precision. `quantize_model` and the exporter both read this, so they cannot drift."""
    if not cfg.enabled:
        return {}
    w, act = weight_config(cfg), act_config(cfg)
    plan: dict[str, QuantSpec] = {}
    if cfg.embeddings:
        plan["bert.embeddings.word_embeddings"] = weight_config(cfg, per_row=True, bits=cfg.embedding_bits)
    for i in range(num_layers):
        sa, so, p = f"bert.encoder.layer.{i}.attention.self", f"bert.encoder.layer.{i}.attention.output", f"bert.encoder.layer.{i}"
        for name, on, spec in ((f"{sa}.query", cfg.qkv, w), (f"{sa}.key", cfg.qkv, w), (f"{sa}.value", cfg.qkv, w),
                               (f"{sa}.act_in", cfg.qkv, act),
                               (f"{sa}.act_q", cfg.attn_acts, act), (f"{sa}.act_k", cfg.attn_acts, act),
                               (f"{sa}.act_v", cfg.attn_acts, act), (f"{sa}.act_probs", cfg.attn_acts, act),
                               (f"{so}.dense", cfg.attn_out, w), (f"{so}.act_in", cfg.attn_out, act),
                               (f"{p}.intermediate.dense", cfg.ffn1, w), (f"{p}.intermediate.act_in", cfg.ffn1, act),
                               (f"{p}.output.dense", cfg.ffn2, w), (f"{p}.output.act_in", cfg.ffn2, act)):
            if on:
                plan[name] = spec
    if cfg.pooler:
        plan["bert.pooler.dense"], plan["bert.pooler.act_in"] = w, act
    return plan


def quantize_model(model: BertForGlue, cfg: QuantConfig) -> BertForGlue:
    """Swap the modules named by `quant_plan` (encoder Linears, pooler, word embeddings, activation slots) for fake
    quantizers. In place; returns the same object. The classifier, position/token-type embeddings, LayerNorms,
    softmax and GELU stay FP (docs/algorithms.md §2)."""
    for name, spec in quant_plan(model.shape.num_layers, cfg).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        if isinstance(spec, ActConfig):
            assert isinstance(old, ActSlot), name
            new = ActFakeQuantizer(spec)
        elif isinstance(old, nn.Embedding):
            new = QuantEmbedding.from_embedding(old, spec)
        else:
            new = QuantLinear.from_linear(old, spec)
        setattr(parent, attr, new)  # same key in _modules: the module order (and state_dict order) is unchanged
    return model


def set_quant_enabled(model: nn.Module, enabled: bool) -> None:
    """Flip every weight and activation fake quantizer of `model` (the only runtime switch)."""
    for m in model.modules():
        if isinstance(m, (WeightFakeQuantizer, ActFakeQuantizer)):
            m.enabled = enabled


# ---------------------------------------------------------------------------------------------
# Learned activation clips (PACT): kept beside the HF-format weights, loaded through the plan's names

LEARNED_CLIPS = "act_clips.json"  # run-folder file: activation slot name -> its trained clip


def learned_clips(model: nn.Module) -> dict[str, float]:
    """Every learned activation clip of `model`, by activation-slot name ({} when none is learned)."""
    return {name: m.clip.detach().item() for name, m in model.named_modules()
            if isinstance(m, ActFakeQuantizer) and m.config.learned_clip}


@torch.no_grad()
def load_learned_clips(model: nn.Module, clips: dict[str, float], where: str = "") -> None:
    """Set the learned clips from `learned_clips` output; the names must be exactly the model's learned slots."""
    want = {name: m for name, m in model.named_modules() if isinstance(m, ActFakeQuantizer) and m.config.learned_clip}
    if set(clips) != set(want):
        extra, missing = sorted(set(clips) - set(want)), sorted(set(want) - set(clips))
        raise ValueError(f"{where}learned activation clips do not match the model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for name, value in clips.items():
        want[name].clip.fill_(value)
