"""Speed-only code, each piece beside the plain definition it must equal (tests compare the two).

Nothing here changes what is computed, only how: hand-written backward passes that keep less for the backward,
a CPU dropout with a bool mask, a one-pass CPU path of the activation quantizer, and the store that keeps saved
8-bit activations as int8 codes during the student's forward. The maths lives in `quant.py`, `losses.py` and
`model.py`; this file imports only torch, so every layer above may use it.

| here                               | must equal (plain definition)                              | test                    |
|------------------------------------|------------------------------------------------------------|-------------------------|
| `ste_mask`                         | `a < clip` (None = all True)                               | test_quant              |
| `symmetric_codes_cpu`              | `quant.symmetric_codes_reference` without `valid`          | test_quant              |
| `symmetric_codes_compiled`         | the same, fused by torch.compile (`--train.compile`)       | test_quant              |
| `SquaredError`                     | `Σ m·(a − b)²` through autograd                            | test_losses             |
| `PairKL`                           | `Σ pair·p_T (log p_T − log p_S)` through autograd          | test_losses             |
| `Dropout`                          | `F.dropout` (same keep rate and scaling, other RNG draws)  | test_model              |
| `saved_activations_as_codes`       | no hook: bit-identical gradients                           | test_quant              |
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ---------------------------------------------------------------------------------------------
# Quantizers: skip work that cannot change the result

def ste_mask(a: Tensor, clip: float | None) -> Tensor | None:
    """The clipped-STE mask `a < clip` for a = |clamp(x, ±clip)|, or None (= all True, the STE is the identity) when
    no entry reaches the clip. Only asked on a CPU, where reading max(a) costs no device sync; a NaN gives the mask."""
    if clip is None:
        return None
    if a.device.type == "cpu" and bool(a.max() < clip):
        return None
    return a < clip


def cpu_codes_apply(x: Tensor, max_dims: tuple[int, ...] | None) -> bool:
    """Whether `symmetric_codes_cpu` handles this call (CPU, a max over the whole tensor or one dim)."""
    return x.device.type == "cpu" and (max_dims is None or len(max_dims) == 1)


def symmetric_codes_cpu(x: Tensor, levels: int, clip: float | None,
                        max_dims: tuple[int, ...] | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """`quant.symmetric_codes_reference(x, bits, clip, max_dims)` in fewer passes: max|x| from one aminmax read, and
    when it is below the clip (attention probabilities, small activations) no clamp, no |x| and no STE mask."""
    lo, hi = torch.aminmax(x) if max_dims is None else torch.aminmax(x, dim=max_dims[0], keepdim=True)
    m = torch.maximum(hi, -lo)  # max|x|
    if clip is None or bool(m.max() < clip):  # a NaN answers False: the full path keeps its NaN semantics
        step = m.clamp_min(1e-30) / levels
        return (x / step).round_(), None, step
    m = m.clamp_max(clip)  # = max|clamp(x)|
    c = x.clamp(-clip, clip)
    inside = c.abs() < clip  # |clamp(x)| < clip  <=>  -clip < x < clip (NaN: False)
    step = m.clamp_min(1e-30) / levels
    return c.div_(step).round_(), inside, step


def _codes_formula(x: Tensor, levels: float, clip: float | None, per_token: bool):
    # the plain formula of quant.symmetric_codes_reference (no padding mask), written for torch.compile to fuse
    c = x.clamp(-clip, clip) if clip is not None else x
    a = c.abs()
    m = a.amax(dim=-1, keepdim=True) if per_token else a.amax()
    step = m.clamp_min(1e-30) / levels
    return (c / step).round(), (a < clip) if clip is not None else None, step


_COMPILED: dict[str, object] = {}
_USE_COMPILED = False


@contextlib.contextmanager
def compiled_quantizers(on: bool = True):
    """While active (and `on`), activation quantizers without a padding mask run `_codes_formula` compiled by
    torch.compile (Inductor fuses the clamp, |x|, max, scale and rounding into two kernels); dynamic shapes, since
    length-bucketed batches change S every step. Same values, mask and scale as the eager path (tested)."""
    global _USE_COMPILED
    previous, _USE_COMPILED = _USE_COMPILED, on
    try:
        yield
    finally:
        _USE_COMPILED = previous


def compiled_codes_apply(x: Tensor, valid, max_dims) -> bool:
    return _USE_COMPILED and valid is None and (max_dims is None or tuple(max_dims) == (-1,))


def symmetric_codes_compiled(x: Tensor, levels: int, clip: float | None, max_dims) -> tuple[Tensor, Tensor | None, Tensor]:
    if "codes" not in _COMPILED:
        _COMPILED["codes"] = torch.compile(_codes_formula, dynamic=True)
    return _COMPILED["codes"](x, float(levels), clip, max_dims is not None)


# ---------------------------------------------------------------------------------------------
# Losses: exact gradients that keep less for the backward

def batch_slices(x: Tensor) -> list[slice]:
    """Slices of dim 0 with about 2^18 elements each on a CPU (temporaries stay in cache and small), the whole
    tensor elsewhere (a GPU wants few large kernels)."""
    if x.device.type != "cpu":
        return [slice(None)]
    step = max(1, (1 << 18) // max(1, x[0].numel()))
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


def _no_teacher_grad(ctx, index: int, what: str) -> None:
    if ctx.needs_input_grad[index]:
        raise ValueError(f"{what}: the teacher's tensor must not require grad (run the teacher under torch.no_grad)")


class SquaredError(torch.autograd.Function):
    """Σ m·(a − b)² for a student tensor a and a constant teacher target b (m: 0/1 mask broadcastable to a, or None).
    Keeps only the masked difference for the backward (F.mse_loss keeps both a and b)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, mask: Tensor | None) -> Tensor:
        _no_teacher_grad(ctx, 1, "an MSE loss")
        d = a - b
        if mask is not None:
            d.mul_(mask)
        ctx.save_for_backward(d)
        flat = d.reshape(-1).float()
        return torch.dot(flat, flat)  # fp32 even for bf16 inputs (autocast)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (d,) = ctx.saved_tensors
        return (d * (2 * grad)).to(d.dtype), None, None


class PairKL(torch.autograd.Function):
    """Σ_{i,j} pair·p_T (log max(p_T, ε) − log max(p_S, ε)) per (b, h): (B, H, S, S) -> (B, H).

    Computed slice by slice, with the exact gradient of that formula in p_S (−pair·p_T / p_S where p_S ≥ ε, else 0,
    as autograd gives through clamp_min and log). The backward keeps only p_T and p_S, which the teacher output and
    the student's softmax hold anyway; autograd through the formula would keep a clamped copy of p_S per layer.
    """

    @staticmethod
    def forward(ctx, p_t: Tensor, p_s: Tensor, pair: Tensor, floor: float) -> Tensor:
        _no_teacher_grad(ctx, 0, "the attention-map KL")
        out = p_s.new_empty(p_s.shape[:2])
        for sl in batch_slices(p_s):
            t = p_t[sl]
            kl = t.clamp_min(floor).log_().sub_(p_s[sl].clamp_min(floor).log_()).mul_(t).mul_(pair[sl])
            out[sl] = kl.sum(dim=(-1, -2))
        ctx.save_for_backward(p_t, p_s, pair)
        ctx.floor = floor
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        p_t, p_s, pair = ctx.saved_tensors
        grad_s = torch.empty_like(p_s)
        for sl in batch_slices(p_s):
            s = p_s[sl]
            g = torch.div(p_t[sl], s.clamp_min(ctx.floor), out=grad_s[sl])
            g.mul_(s >= ctx.floor).mul_(pair[sl]).mul_(-grad[sl][..., None, None])
        return None, grad_s, None, None


# ---------------------------------------------------------------------------------------------
# Dropout with a bool mask on CPU

class _BoolMaskDropout(torch.autograd.Function):
    """x · keep / (1 − p) with keep = [U(0, 1) ≥ p] from `torch.rand`; the backward keeps the bool mask only."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        keep = torch.rand(x.shape, device=x.device) >= p
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return (x * keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None


class Dropout(nn.Dropout):
    """nn.Dropout. On a CPU, torch's dropout draws with `bernoulli_` and keeps a float mask for the backward; here the
    mask is drawn with `torch.rand` (cheaper there) and kept as bool: 3 bytes less per element of every dropout input
    (MiniLM at 32 × 128: 110 MiB less for the attention probabilities alone). Elsewhere (CUDA: a fused kernel that
    keeps a bool mask already) it is F.dropout."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.device.type != "cpu" or not 0 < self.p < 1:
            return F.dropout(x, self.p, self.training)
        return _BoolMaskDropout.apply(x, self.p)


# ---------------------------------------------------------------------------------------------
# Saved fake-quantized activations as integer codes

class Codes:
    """A saved fake-quantized activation as a view of its int8 codes round(x / Δ) and its step Δ."""

    def __init__(self, codes: Tensor, scale: Tensor):
        self.codes, self.scale = codes, scale


class CodeStore:
    """The per-tensor-scale activation quantizer outputs of one forward with their int8 codes, by storage address."""

    @dataclass
    class Entry:
        ref: weakref.ref   # the quantizer output (weak: the store must not keep activations alive)
        version: int       # its version counter when made: an in-place write since then disqualifies it
        codes: Tensor      # int8, the output's shape, contiguous like it
        scale: Tensor

    def __init__(self):
        self.outputs: dict[int, CodeStore.Entry] = {}

    def register(self, q: Tensor, codes: Tensor, scale: Tensor) -> None:
        """q = codes · scale (the step Δ) exactly, codes int8 (|codes| ≤ 127: the quantizer saturates them)."""
        if q.is_contiguous():  # a new output at a freed output's address replaces that entry
            self.outputs[q.untyped_storage().data_ptr()] = self.Entry(weakref.ref(q), q._version, codes, scale)

    def pack(self, t: Tensor):
        e = self.outputs.get(t.untyped_storage().data_ptr()) if t.dtype == torch.float32 else None
        q = e.ref() if e is not None else None
        # a view of a live quantizer output's storage, unwritten since: its values are exactly codes · Δ
        if q is None or q.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() or t._version != e.version:
            # detach(): the same storage without the autograd history; holding t itself would tie a saved output
            # (e.g. softmax's) to its own graph node, a cycle that outlives a branch the backward never reaches
            return t.detach()
        # the same view of the codes (several saves of one output share them)
        return Codes(e.codes.as_strided(t.shape, t.stride(), t.storage_offset() - q.storage_offset()), e.scale)

    @staticmethod
    def unpack(p):
        # the quantizer computed codes · Δ in fp32; the same product of the same codes gives the same bits
        return torch.mul(p.codes, p.scale) if isinstance(p, Codes) else p


_STORE: CodeStore | None = None


def code_store() -> CodeStore | None:
    """The store of the active `saved_activations_as_codes` block, or None."""
    return _STORE


def _pack_saved(t: Tensor):
    # a module-level function, not the bound _STORE.pack: autograd keeps the pack hook with every saved tensor, and a
    # bound method would tie the store (and through it every packed view) to each graph
    return _STORE.pack(t) if _STORE is not None else t.detach()


@contextlib.contextmanager
def saved_activations_as_codes():
    """While active, a tensor autograd saves for the backward that is (a view of) the output of a per-tensor activation
    quantizer (8 or 4 bits, fp32) is kept as int8 codes and its scale, and restored bit for bit when the backward uses
    it: 1 byte per element instead of 4 for the inputs of the quantized Linears and the quantized attention
    probabilities. Copies (e.g. the reshaped per-head Q, K, V) and bf16 casts are kept as they are."""
    global _STORE
    previous, _STORE = _STORE, CodeStore()
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack_saved, CodeStore.unpack):
            yield
    finally:
        _STORE = previous
