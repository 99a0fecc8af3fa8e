"""Export a trained W2A8 student (docs/algorithms.md §9): a packed safetensors file and an integer ONNX model for onnxruntime.

    python export_student.py RUN_DIR          # writes RUN_DIR/export/
    python quant_task_glue.py --evaluate RUN_DIR/export --data.glue_dir GLUE   # dev metrics through onnxruntime

`RUN_DIR/export/` holds
- `student.w2a8.safetensors`: every quantized weight as int codes packed to its bit width (2 bits: 4 per byte, two's
  complement, first element in the low bits, which is ONNX's INT2 layout; 4 bits: 2 per byte; 8 bits: int8) plus one
  fp32 scale per tensor (per row for the word embeddings); everything the plan keeps FP as fp32; metadata that states
  the plan (which module has which weight / activation quantizer, `quant.quant_plan`) and the activation quantizer.
  `load_student` gives back codes · scale, bit for bit the fake-quant weights of the trained model.
- `model.onnx`: the student with integer matrix multiplies. Each quantized activation is quantized at run time as in
  training (`quant.symmetric_codes_reference`: Δ = max|clamp(x)| / n over the batch tensor or per token, then
  QuantizeLinear = round-half-even(x / Δ)) to uint8 with zero point 128, and every quantized Linear is
  MatMulInteger(uint8 codes, int8 weight codes) · (Δ·α) + bias; with the attention activations quantized, QKᵀ and
  P·V are integer products too (8-bit K and V codes as uint8 + 128: see `U8S8_EXACT_MAX_CODE`). The products of 8-bit codes and ternary codes, summed over at most
  a few thousand terms, are exact integers in int32, so a linear differs from the fake-quant one only by the fp32
  rounding of the final scaling (and the fake-quant's own fp32 summation error). Weights are INT2 (INT4 / INT8)
  initializers, cast to int8 once when onnxruntime constant-folds the graph at load.
- the tokenizer files, `run_config.json` and `export.json` (sizes, compression, parity, versions).

Why the graph is written with `onnx.helper` instead of `torch.onnx.export` + surgery: the graph we want is not the
traced fake-quant graph (float Round/Div chains) but a different, integer one: uint8 activations with zero point 128
(signed int8 × int8 MatMulInteger is ~40× slower on CPU), INT2 initializers, a per-tensor or per-token dynamic scale
computed by ReduceMax, integer attention products whose scales factor per query row / key column. Rewriting a traced
graph into that would be more code than writing it (about 200 lines below), and tracing would tie the export to the
training code's speed paths (`transformer.fast`) and its autograd functions.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from transformer.config import QuantConfig, RunConfig
from transformer.model import BertForGlue, BertShape
from transformer.quant import (ActConfig, TernaryWeightConfig, UniformWeightConfig, quant_plan, symmetric_codes,
                               ternary_codes)

FORMAT = "kdqat-packed/1"
STUDENT_FILE = "student.w2a8.safetensors"
ONNX_FILE = "model.onnx"
OPSET = 25  # INT2 tensors
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # those present
ACT_ROUNDING = ("codes = clamp(round_half_to_even(clamp(x, -clip, clip) / step), -n, n), n = 2^(bits-1) - 1, "
                "step = max(max|clamp(x)|, 1e-30) / n over the tensor (granularity tensor) or the last dim (token), "
                "padding left out of the max when exclude_padding; value = codes * step")


# ---------------------------------------------------------------------------------------------
# Packing int codes

def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """int8 codes (any shape, |c| < 2^(bits-1)) -> uint8 (ceil(numel·bits/8),): two's-complement fields of `bits`
    bits, element i at bits (i·bits mod 8) of byte i·bits // 8 (ONNX INT2 / INT4 layout); 8 bits: the int8 bytes."""
    flat = codes.reshape(-1).to(torch.int8)
    if bits == 8:
        return flat.view(torch.uint8).clone()
    per = 8 // bits
    fields = (flat.to(torch.int16) & ((1 << bits) - 1)).to(torch.uint8)
    fields = torch.cat([fields, fields.new_zeros((-len(fields)) % per)]).view(-1, per)
    out = torch.zeros(fields.shape[0], dtype=torch.uint8)
    for i in range(per):
        out |= fields[:, i] << (i * bits)
    return out


def unpack_codes(packed: Tensor, bits: int, shape: tuple[int, ...]) -> Tensor:
    """Inverse of `pack_codes`: uint8 bytes -> int8 codes of `shape`."""
    n = math.prod(shape)
    if bits == 8:
        return packed[:n].view(torch.int8).reshape(shape).clone()
    per, mask = 8 // bits, (1 << bits) - 1
    fields = torch.stack([(packed >> (i * bits)) & mask for i in range(per)], dim=1).reshape(-1)[:n].to(torch.int16)
    signed = torch.where(fields >= 1 << (bits - 1), fields - (1 << bits), fields)  # two's complement
    return signed.to(torch.int8).reshape(shape)


# ---------------------------------------------------------------------------------------------
# The packed student

@dataclass
class PackedWeight:
    codes: Tensor   # int8, the weight's shape (out, in) or (vocab, D)
    scale: Tensor   # fp32, () per tensor or (rows, 1) per row; value = codes · scale
    bits: int       # 2 = ternary (TWN), 4 / 8 = uniform symmetric

    def value(self) -> Tensor:
        return self.codes.to(torch.float32) * self.scale


def pack_weight(w: Tensor, spec: TernaryWeightConfig | UniformWeightConfig) -> PackedWeight:
    """The quantizer's own codes and scale of a latent weight: codes · scale is its fake-quant value, bit for bit."""
    w = w.detach().float()
    if isinstance(spec, TernaryWeightConfig):
        codes, alpha = ternary_codes(w, spec)
        return PackedWeight(codes, alpha, 2)
    codes, _, step = symmetric_codes(w, spec.bits, spec.clip, (-1,) if spec.granularity == "row" else None)
    return PackedWeight(codes.to(torch.int8), step, spec.bits)


@dataclass
class Student:
    """What the deployable file holds: the architecture, the plan, packed weights and the FP rest."""
    shape: BertShape
    quant: QuantConfig
    weights: dict[str, PackedWeight]    # parameter name (HF) -> codes + scale
    tensors: dict[str, Tensor]          # parameter name -> fp32 (LayerNorms, biases, position / token-type, classifier)
    acts: dict[str, ActConfig]          # activation slot (module name) -> its quantizer; absent = FP

    def fake_quant_state_dict(self) -> dict[str, Tensor]:
        """Every parameter as the fake-quant model uses it (quantized weights: codes · scale)."""
        return {**self.tensors, **{k: w.value() for k, w in self.weights.items()}}


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread inside. α and Δ are means / maxima over a weight, and torch's parallel sum gives a mean whose
    last bit depends on the thread count (26 of MiniLM's 36 encoder weights differ between 1 and 2 threads), so
    the fake-quant model itself is bit-defined only for a given thread count. The export packs with one thread:
    the same bits on every machine, equal to the fake-quant model run with one thread (`--train.threads 1`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def student_from_model(model: BertForGlue, cfg: QuantConfig) -> Student:
    with one_torch_thread():
        return _student_from_model(model, cfg)


def _student_from_model(model: BertForGlue, cfg: QuantConfig) -> Student:
    plan = quant_plan(model.shape.num_layers, cfg)
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    weights = {f"{name}.weight": pack_weight(sd[f"{name}.weight"], spec) for name, spec in plan.items()
               if not isinstance(spec, ActConfig)}
    # a learned (PACT) clip is a constant once trained: the exported quantizer takes it as its fixed clip
    acts = {name: dataclasses.replace(spec, clip=model.get_submodule(name).clip.detach().item(), learned_clip=False)
            if spec.learned_clip else spec for name, spec in plan.items() if isinstance(spec, ActConfig)}
    clips = {f"{name}.clip" for name, spec in plan.items() if isinstance(spec, ActConfig) and spec.learned_clip}
    return Student(model.shape, cfg, weights, {k: v for k, v in sd.items() if k not in weights and k not in clips}, acts)


def save_student(student: Student, path: str | Path) -> None:
    from safetensors.torch import save_file
    tensors = dict(student.tensors)
    layout = {}
    for name, w in student.weights.items():
        tensors[f"{name}.codes"] = pack_codes(w.codes, w.bits)
        tensors[f"{name}.scale"] = w.scale.float().contiguous()
        layout[name] = {"bits": w.bits, "shape": list(w.codes.shape), "scale_shape": list(w.scale.shape),
                        "packing": "two's complement, little-endian fields" if w.bits < 8 else "int8"}
    acts = {name: {**dataclasses.asdict(a), "rounding": "half_to_even"} for name, a in student.acts.items()}
    metadata = {"format": FORMAT, "config": json.dumps(student.shape.to_hf()),
                "quant": json.dumps(dataclasses.asdict(student.quant)), "weights": json.dumps(layout),
                "activations": json.dumps(acts), "activation_quantizer": ACT_ROUNDING}
    save_file(tensors, str(path), metadata=metadata)


def load_student(path: str | Path) -> Student:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format {meta.get('format')!r})")
        raw = {k: f.get_tensor(k) for k in f.keys()}
    layout = json.loads(meta["weights"])
    weights = {name: PackedWeight(unpack_codes(raw.pop(f"{name}.codes"), d["bits"], tuple(d["shape"])),
                                  raw.pop(f"{name}.scale"), d["bits"]) for name, d in layout.items()}
    acts = {name: ActConfig(d["bits"], d["clip"], d["granularity"], d["exclude_padding"])
            for name, d in json.loads(meta["activations"]).items()}
    return Student(BertShape.from_hf(json.loads(meta["config"])), QuantConfig(**json.loads(meta["quant"])),
                   weights, raw, acts)


# ---------------------------------------------------------------------------------------------
# The ONNX graph

class _Graph:
    """A tiny node/initializer accumulator: `g.op("Add", a, b)` returns the name of the new node's output."""

    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value, dtype=np.float32, hint: str = "c") -> str:
        from onnx import numpy_helper
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def tensor(self, t: Tensor, hint: str) -> str:
        return self.const(t.detach().float().numpy(), np.float32, hint)

    def packed(self, codes: Tensor, bits: int, hint: str) -> str:
        """int8 codes as an INT2 / INT4 / INT8 initializer (raw data = `pack_codes`)."""
        from onnx import TensorProto, helper
        name = self.name(hint)
        dtype = {2: TensorProto.INT2, 4: TensorProto.INT4, 8: TensorProto.INT8}[bits]
        self.inits.append(helper.make_tensor(name, dtype, list(codes.shape), pack_codes(codes, bits).numpy().tobytes(),
                                             raw=True))
        return name

    def op(self, kind: str, *inputs: str, hint: str | None = None, **attrs) -> str:
        from onnx import helper
        out = self.name(hint or kind.lower())
        self.nodes.append(helper.make_node(kind, list(inputs), [out], name=out, **attrs))
        return out


@dataclass
class _Act:
    """An activation in the graph: float, or int codes with their step (value = (codes − zero point) · step)."""
    value: str | None = None   # float tensor
    codes: str | None = None   # uint8 (zero point 128) or int8 (zero point 0)
    step: str | None = None    # () per tensor, (..., 1) per token
    codes_unsigned: bool = True  # uint8 codes + 128 (else int8)
    per_token: bool = False      # step (B, S, 1) / (B, H, S, 1) instead of ()


# onnxruntime's u8·s8 integer GEMM on x86 CPUs without VNNI (AVX2 only) multiplies with VPMADDUBSW, which adds
# pairs of u8·s8 products in int16 and saturates: exact only while 2 · 255 · |b| ≤ 32767, i.e. |b| ≤ 64. The B
# side of a product (weights, K and V codes) is int8 only when its codes stay within that (ternary, 4-bit, ≤7-bit);
# 8-bit B codes go as uint8 + 128 (the u8·u8 kernel, exact everywhere). Measured: 8-bit int8 K codes were off by
# up to 62,583 in the int32 sum on an AVX2-only EPYC; exact with AVX512-VNNI.
U8S8_EXACT_MAX_CODE = 64


def u8s8_exact(bits: int) -> bool:
    """Can int8 B codes of `bits` bits meet uint8 A codes in onnxruntime's u8·s8 kernel without int16 saturation?"""
    return 2 ** (bits - 1) - 1 <= U8S8_EXACT_MAX_CODE


class _Builder:
    def __init__(self, st: Student):
        from onnx import TensorProto
        self.st, self.g, self.T = st, _Graph(), TensorProto
        self.zp_u8 = self.g.const(128, np.uint8, "zp128")
        self.zp_i8 = self.g.const(0, np.int8, "zp0")
        self.one = self.g.const(1.0, hint="one")
        self.floor = self.g.const(1e-30, hint="floor")

    # -- activations -------------------------------------------------------------------------
    def quantize(self, x: str, spec: ActConfig, mask: str | None, signed: bool, nonneg: bool = False) -> _Act:
        """`quant.symmetric_codes_reference` in ONNX ops. signed: int8 codes (the B side of a MatMulInteger);
        otherwise uint8 codes + 128 (the A side: onnxruntime's fast u8·s8 kernel). mask: (B, S, 1) or (B, 1, S, S)
        0/1 float for exclude_padding. nonneg: x ≥ 0 and ≤ 1 (softmax output), so |x| = x and a clip ≥ 1 is a no-op."""
        g, per_token = self.g, spec.granularity == "token"
        a = x if nonneg else g.op("Abs", x)
        if mask is not None:
            a = g.op("Mul", a, mask)
        if per_token:
            m = g.op("ReduceMax", a, g.const([-1], np.int64), keepdims=1)
        else:
            m = g.op("ReduceMax", a, keepdims=0)
        clip = spec.clip if not (nonneg and spec.clip is not None and spec.clip >= 1 and mask is None) else None
        # max|clamp(x, ±clip)| = min(max|x|, clip), floored at 1e-30 (no NaN for an all-zero slice): one scalar op
        m = g.op("Clip", m, self.floor, *([g.const(clip)] if clip is not None else []))
        n = 2 ** (spec.bits - 1) - 1
        step = g.op("Div", m, g.const(n), hint="step")
        zp, zero = (self.zp_i8, 0) if signed else (self.zp_u8, 128)
        if per_token:  # QuantizeLinear takes a scalar or 1-D scale: divide here, then quantize with scale 1 (exact)
            codes = g.op("QuantizeLinear", g.op("Div", x, step), self.one, zp, hint="codes")
        else:
            codes = g.op("QuantizeLinear", x, step, zp, hint="codes")
        if clip is not None or mask is not None:
            # Entries beyond the clip (or padding beyond the valid max) quantize past ±n; QuantizeLinear saturates
            # them at the integer type's ends, and this clamps the codes to ±n, so every such entry gets ±n, the code
            # training gives it (round(clip / Δ) = n; padding codes are clamped to ±n). On the int codes: 1 byte per
            # element instead of a float clamp of x before quantizing. For 8 bits only -128 lies beyond -n = -127.
            dtype = np.int8 if signed else np.uint8
            hi = [] if spec.bits == 8 else [g.const(zero + n, dtype)]
            codes = g.op("Clip", codes, g.const(zero - n, dtype), *hi)
        return _Act(codes=codes, step=step, codes_unsigned=not signed, per_token=per_token)

    def value(self, a: _Act) -> str:
        """The float value (codes − zero point) · step, bit for bit the fake-quant activation."""
        if a.value is not None:
            return a.value
        g = self.g
        f = g.op("Cast", a.codes, to=self.T.FLOAT)
        if a.codes_unsigned:
            f = g.op("Sub", f, g.const(128.0))
        return g.op("Mul", f, a.step)

    def act(self, x: str, slot: str, mask: str | None, signed: bool = False, nonneg: bool = False) -> _Act:
        spec = self.st.acts.get(slot)
        if spec is None:
            return _Act(value=x)
        return self.quantize(x, spec, mask if spec.exclude_padding else None, signed, nonneg)

    # -- linears -----------------------------------------------------------------------------
    def linear(self, x: _Act, name: str) -> str:
        """y = x Wᵀ + b of Linear `name`: integer when its weight and input are quantized, else fp32."""
        g, st = self.g, self.st
        packed, bias = st.weights.get(f"{name}.weight"), g.tensor(st.tensors[f"{name}.bias"], "bias")
        if x.codes is not None and packed is not None:
            w = g.op("Cast", g.packed(packed.codes.t().contiguous(), packed.bits, "w"), to=self.T.INT8)  # (in, out),
            if u8s8_exact(packed.bits):  # cast to an int8 constant when onnxruntime loads it
                acc = g.op("MatMulInteger", x.codes, w, self.zp_u8)
            else:  # uint8 = code + 128 (see U8S8_EXACT_MAX_CODE), also folded to a constant at load
                w = g.op("Cast", g.op("Add", g.op("Cast", w, to=self.T.INT32), g.const(128, np.int32)), to=self.T.UINT8)
                acc = g.op("MatMulInteger", x.codes, w, self.zp_u8, self.zp_u8)
            # the fake-quant linear is (codes·Δ)(w·α) summed in fp32; here the exact integer sum times Δ·α
            y = self.scaled(acc, x.step, g.tensor(packed.scale.reshape(()), "alpha"), x.per_token)
        else:
            w = packed.value() if packed is not None else st.tensors[f"{name}.weight"]
            y = g.op("MatMul", self.value(x), g.tensor(w.t().contiguous(), "w"))
        return g.op("Add", y, bias)

    # -- the model ---------------------------------------------------------------------------
    def build(self):
        from onnx import helper
        g, st, c, T = self.g, self.st, self.st.shape, self.T
        t = st.tensors
        ids, types, mask = "input_ids", "token_type_ids", "attention_mask"
        maskf = g.op("Cast", mask, to=T.FLOAT)
        add_mask = g.op("Unsqueeze", g.op("Mul", g.op("Sub", self.one, maskf), g.const(-10000.0)),
                        g.const([1, 2], np.int64))  # (B, 1, 1, S), as model.MASK_VALUE
        tok_mask = g.op("Unsqueeze", maskf, g.const([2], np.int64))  # (B, S, 1)
        pair_mask = g.op("Mul", g.op("Unsqueeze", maskf, g.const([1, 3], np.int64)),
                         g.op("Unsqueeze", maskf, g.const([1, 2], np.int64)))  # (B, 1, S, S) valid query ∧ key

        # embeddings: word (ternary per row: int8 rows · α of the row) + position + token type, LayerNorm
        we = st.weights.get("bert.embeddings.word_embeddings.weight")
        if we is not None:
            table = g.op("Cast", g.packed(we.codes, we.bits, "word_codes"), to=T.INT8)
            rows = g.op("Cast", g.op("Gather", table, ids), to=T.FLOAT)
            word = g.op("Mul", rows, g.op("Gather", g.tensor(we.scale.reshape(-1, 1), "word_alpha"), ids))
        else:
            word = g.op("Gather", g.tensor(t["bert.embeddings.word_embeddings.weight"], "word"), ids)
        seq = g.op("Shape", ids, start=1, end=2)
        pos = g.op("Slice", g.tensor(t["bert.embeddings.position_embeddings.weight"], "pos"),
                   g.const([0], np.int64), seq, g.const([0], np.int64))  # (S, D)
        typ = g.op("Gather", g.tensor(t["bert.embeddings.token_type_embeddings.weight"], "types"), types)
        h = self.layer_norm(g.op("Add", g.op("Add", word, pos), typ), "bert.embeddings.LayerNorm")

        H, dh, D = c.num_heads, c.head_dim, c.hidden_size
        heads = g.const([0, 0, H, dh], np.int64)
        for i in range(c.num_layers):
            p = f"bert.encoder.layer.{i}"
            sa, so = f"{p}.attention.self", f"{p}.attention.output"
            x = self.act(h, f"{sa}.act_in", tok_mask)
            # three products of one quantized input: faster in onnxruntime than one fused QKV product and a Split
            q, k, v = (self.linear(x, f"{sa}.{n}") for n in ("query", "key", "value"))
            qa = self.act(q, f"{sa}.act_q", tok_mask)
            ka = self.act(k, f"{sa}.act_k", tok_mask, signed=self.b_side_signed(f"{sa}.act_k"))
            va = self.act(v, f"{sa}.act_v", tok_mask, signed=self.b_side_signed(f"{sa}.act_v"))
            to_heads = lambda z, perm: g.op("Transpose", g.op("Reshape", z, heads), perm=perm)  # (B, S, D) -> (B, H, ., .)
            inv_sqrt = g.const(1 / math.sqrt(dh))
            if qa.codes is not None and ka.codes is not None:  # Δ_q of query i and Δ_k of key j leave the sum over d
                acc = g.op("MatMulInteger", to_heads(qa.codes, [0, 2, 1, 3]), to_heads(ka.codes, [0, 2, 3, 1]),
                           *self.zero_points(ka))
                if qa.per_token or ka.per_token:
                    scale = g.op("Mul", self.head_step(qa, rows=True), self.head_step(ka, rows=False))
                    scores = self.scaled(acc, scale, inv_sqrt, True)
                else:
                    scores = self.scaled(acc, g.op("Mul", qa.step, inv_sqrt), ka.step, False)
            else:
                qs = g.op("Mul", to_heads(self.value(qa), [0, 2, 1, 3]), inv_sqrt)
                scores = g.op("MatMul", qs, to_heads(self.value(ka), [0, 2, 3, 1]))
            probs = g.op("Softmax", g.op("Add", scores, add_mask), axis=-1)  # (B, H, S, S)
            pa = self.act(probs, f"{sa}.act_probs", pair_mask, nonneg=True)
            # integer P·V needs one Δ_v for all keys j (the summed index): a per-token V scale stays a float product
            if pa.codes is not None and va.codes is not None and not va.per_token:
                acc = g.op("MatMulInteger", pa.codes, to_heads(va.codes, [0, 2, 1, 3]), *self.zero_points(va))
                ctx = self.scaled(acc, pa.step, va.step, pa.per_token)
            else:
                ctx = g.op("MatMul", self.value(pa), to_heads(self.value(va), [0, 2, 1, 3]))
            ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), g.const([0, 0, D], np.int64))  # (B, S, D)
            sa_out = self.linear(self.act(ctx, f"{so}.act_in", tok_mask), f"{so}.dense")
            attn_output = self.layer_norm(g.op("Add", sa_out, h), f"{so}.LayerNorm")
            inter = self.linear(self.act(attn_output, f"{p}.intermediate.act_in", tok_mask), f"{p}.intermediate.dense")
            inter = g.op("Gelu", inter)  # exact (erf) GELU, as F.gelu
            out = self.linear(self.act(inter, f"{p}.output.act_in", tok_mask), f"{p}.output.dense")
            h = self.layer_norm(g.op("Add", out, attn_output), f"{p}.output.LayerNorm")

        cls = g.op("Gather", h, g.const(0, np.int64), axis=1)  # (B, D) [CLS]
        pooled = g.op("Tanh", self.linear(self.act(cls, "bert.pooler.act_in", None), "bert.pooler.dense"))
        logits = g.op("Add", g.op("MatMul", pooled, g.tensor(t["classifier.weight"].t().contiguous(), "cls_w")),
                      g.tensor(t["classifier.bias"], "cls_b"), hint="logits")
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
        inputs = [helper.make_tensor_value_info(n, T.INT64, ["batch", "seq"]) for n in (ids, types, mask)]
        outputs = [helper.make_tensor_value_info("logits", T.FLOAT, ["batch", c.num_labels])]
        graph = helper.make_graph(g.nodes, "kdqat_student", inputs, outputs, g.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="kdqat-export")
        return model

    def b_side_signed(self, slot: str) -> bool:
        """int8 codes for the B side of an integer product where the u8·s8 kernel is exact, else uint8 + 128."""
        spec = self.st.acts.get(slot)
        return spec is not None and u8s8_exact(spec.bits)

    def zero_points(self, b: _Act) -> list[str]:
        """MatMulInteger zero points for uint8 A codes (128) and B: int8 (0, the default) or uint8 (128)."""
        return [self.zp_u8, self.zp_u8] if b.codes_unsigned else [self.zp_u8]

    def scaled(self, acc: str, step: str, factor: str, per_token: bool) -> str:
        """float(acc) · (step · factor); factor is a constant or a scalar. Per token (step (B, S, 1) or wider) as
        (float(acc) · factor) · step: onnxruntime 1.32 fuses MatMulInteger → Cast → Mul into MatMulIntegerToFloat
        and then broadcasts a non-scalar scale wrongly (wrong logits); a scalar `factor` in that Mul is fused right."""
        f = self.g.op("Cast", acc, to=self.T.FLOAT)
        if per_token:
            return self.g.op("Mul", self.g.op("Mul", f, factor), step)
        return self.g.op("Mul", f, self.g.op("Mul", step, factor))

    def head_step(self, a: _Act, rows: bool) -> str:
        """A per-token step (B, S, 1) as the (B, 1, S, 1) row factor or (B, 1, 1, S) column factor of a (B, H, S, S)
        product; a per-tensor step as it is."""
        if not a.per_token:
            return a.step
        col = self.g.op("Unsqueeze", a.step, self.g.const([1], np.int64))  # (B, 1, S, 1)
        return col if rows else self.g.op("Transpose", col, perm=[0, 1, 3, 2])

    def layer_norm(self, x: str, name: str) -> str:
        t = self.st.tensors
        return self.g.op("LayerNormalization", x, self.g.tensor(t[f"{name}.weight"], "ln_w"),
                         self.g.tensor(t[f"{name}.bias"], "ln_b"), axis=-1, epsilon=self.st.shape.layer_norm_eps)


def build_onnx(student: Student):
    """The student as an onnx.ModelProto: inputs input_ids, token_type_ids, attention_mask (B, S) int64;
    output logits (B, C) float."""
    return _Builder(student).build()


def build_linear_onnx(weight: PackedWeight, bias: Tensor, act: ActConfig | None, in_dims: int = 3):
    """One quantized Linear (input quantizer + integer product) as an ONNX model: x (..., in) -> y (..., out)."""
    from onnx import TensorProto, helper
    st = Student(None, None, {"linear.weight": weight}, {"linear.bias": bias}, {"linear.act_in": act} if act else {})
    b = _Builder(st)
    y = b.linear(b.act("x", "linear.act_in", None), "linear")
    b.g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    dims = [f"d{i}" for i in range(in_dims - 1)]
    out_features, in_features = weight.codes.shape
    graph = helper.make_graph(b.g.nodes, "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*dims, in_features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims, out_features])], b.g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def build_act_onnx(spec: ActConfig, signed: bool = False):
    """One activation quantizer as an ONNX model: x (B, S, D) float and mask (B, S, 1) 0/1 float (read only under
    exclude_padding) -> codes (uint8 = code + 128, or int8 when signed) and step."""
    from onnx import TensorProto, helper
    b = _Builder(Student(None, None, {}, {}, {"q": spec}))
    a = b.act("x", "q", "mask", signed=signed)
    b.g.nodes += [helper.make_node("Identity", [a.codes], ["codes"]), helper.make_node("Identity", [a.step], ["step"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", "D"]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", "S", 1])]
    outputs = [helper.make_tensor_value_info("codes", TensorProto.INT8 if signed else TensorProto.UINT8, None),
               helper.make_tensor_value_info("step", TensorProto.FLOAT, None)]
    graph = helper.make_graph(b.g.nodes, "act", inputs, outputs, b.g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


# ---------------------------------------------------------------------------------------------
# Running it

def onnx_session(model: str | Path | bytes, threads: int = 1):
    """An onnxruntime CPU session of a model file (or serialized bytes), `threads` intra-op threads."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # no warnings about constants a small graph leaves unused
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=["CPUExecutionProvider"])


def onnx_logits(session, input_ids: Tensor, token_type_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, S) int tensors -> (B, C) fp32 logits through onnxruntime."""
    feed = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
    out = session.run(["logits"], {k: v.to(torch.int64).numpy() for k, v in feed.items()})[0]
    return torch.from_numpy(out)


def is_export_folder(path: str | Path) -> bool:
    return (Path(path) / ONNX_FILE).is_file() and (Path(path) / "export.json").is_file()


def _run_config(folder: Path, glue_dir: str | None) -> RunConfig:
    cfg = RunConfig.from_dict(json.loads((folder / "run_config.json").read_text()))
    if glue_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, glue_dir=glue_dir))
    return cfg


def _outputs(logits: Tensor) -> Tensor:
    """Class index, or the score of a regression head, as `train.predict` reports it."""
    return logits[:, 0] if logits.shape[-1] == 1 else logits.argmax(-1)


def evaluate_export(folder: str | Path, glue_dir: str | None = None, threads: int = 1) -> dict[str, float]:
    """Dev metrics of an export folder through onnxruntime: the same batches (eval_batch_size, padding) and metrics
    as `train.evaluate` on the PyTorch student, so the two are comparable number for number."""
    import utils_glue
    from transformer.data import eval_batches, eval_pad_to, load_task_data
    from transformer.train import load_tokenizer
    folder = Path(folder)
    cfg = _run_config(folder, glue_dir)
    session = onnx_session(folder / ONNX_FILE, threads)
    data = load_task_data(cfg.data, load_tokenizer(folder), with_train=False)
    metrics = {}
    for i, (split, enc) in enumerate(data.dev.items()):
        preds = torch.cat([_outputs(onnx_logits(session, b.input_ids, b.token_type_ids, b.attention_mask))
                           for b in eval_batches(enc, cfg.train.eval_batch_size, eval_pad_to(cfg.data))])
        m = utils_glue.compute_metrics(data.task, preds.float().numpy() if data.task.num_labels == 1 else preds.numpy(),
                                       enc.labels)
        metrics.update(m if i == 0 else {f"mm_{k}": v for k, v in m.items()})
    return metrics


FLIP = 1e-5  # a logit difference above this is an activation code that rounded the other way, not fp32 summation noise


@torch.no_grad()
def parity(model: BertForGlue, model64: BertForGlue, session, batches) -> dict:
    """Logit differences over `batches`: ONNX vs the fp32 fake-quant model, and the fp32 fake-quant model vs itself in
    float64 (the yardstick: what fp32 rounding alone does to it). Both come in two sizes: fp32 noise (~1e-7), and
    now and then an activation code one step off where a float op (GELU, LayerNorm, softmax, a sum) put a value next
    to a rounding boundary; examples with such a flip (max |Δ| > FLIP) are counted. Argmax agreement for classifiers."""
    d_onnx = d_64 = d_onnx64 = 0.0
    agree = n = flips_onnx = flips_64 = 0
    noise_onnx = noise_64 = 0.0  # largest difference among examples without a flip
    for b in batches:
        ref = model(b.input_ids, b.token_type_ids, b.attention_mask).logits
        r64 = model64(b.input_ids, b.token_type_ids, b.attention_mask).logits
        got = onnx_logits(session, b.input_ids, b.token_type_ids, b.attention_mask)
        e_onnx, e_64 = (got - ref).abs().amax(-1), (r64 - ref.double()).abs().amax(-1)
        d_onnx, d_64 = max(d_onnx, e_onnx.max().item()), max(d_64, e_64.max().item())
        d_onnx64 = max(d_onnx64, (r64 - got.double()).abs().max().item())
        flips_onnx, flips_64 = flips_onnx + int((e_onnx > FLIP).sum()), flips_64 + int((e_64 > FLIP).sum())
        noise_onnx = max(noise_onnx, e_onnx[e_onnx <= FLIP].max().item() if (e_onnx <= FLIP).any() else 0.0)
        noise_64 = max(noise_64, e_64[e_64 <= FLIP].max().item() if (e_64 <= FLIP).any() else 0.0)
        agree += int((_outputs(got) == _outputs(ref)).sum()) if ref.shape[-1] > 1 else 0
        n += len(ref)
    out = {"examples": n, "max_abs_logit_diff_onnx_vs_torch": d_onnx, "max_abs_logit_diff_torch_fp64_vs_fp32": d_64,
           "max_abs_logit_diff_onnx_vs_torch_fp64": d_onnx64,
           "examples_with_a_code_flip_onnx_vs_torch": flips_onnx, "examples_with_a_code_flip_torch_fp64_vs_fp32": flips_64,
           "max_abs_logit_diff_without_flip_onnx_vs_torch": noise_onnx,
           "max_abs_logit_diff_without_flip_torch_fp64_vs_fp32": noise_64}
    if model.shape.num_labels > 1:
        out["argmax_agreement"] = agree / max(n, 1)
    return out


def _versions() -> dict:
    import onnx
    import onnxruntime
    from transformer.rundir import git_sha
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "opset": OPSET, "git_sha": git_sha()}


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, glue_dir: str | None = None,
               parity_examples: int = 256) -> dict:
    """Write RUN_DIR/export/ (see the module docstring) and return what export.json holds. The parity figures use the
    first `parity_examples` dev examples in the evaluation's batches (random tokens when the GLUE data is absent)."""
    with one_torch_thread():  # the parity figures compare with the fake-quant model at the export's thread count
        return _export_run(Path(run_dir), Path(out_dir) if out_dir is not None else Path(run_dir) / "export",
                           glue_dir, parity_examples)


def _export_run(run_dir: Path, out: Path, glue_dir: str | None, parity_examples: int) -> dict:
    import onnx
    import utils_glue
    from transformer.data import Batch, eval_batches, eval_pad_to, load_task_data
    from transformer.train import load_run, load_tokenizer
    out.mkdir(parents=True, exist_ok=True)
    model, cfg = load_run(run_dir)
    model.eval()
    if glue_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, glue_dir=glue_dir))
    save_student(student_from_model(model, cfg.quant), out / STUDENT_FILE)
    student = load_student(out / STUDENT_FILE)  # the graph is built from what the file holds
    onnx.save(build_onnx(student), str(out / ONNX_FILE))
    for name in (*TOKENIZER_FILES, "run_config.json", "config.json"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / name)

    t0 = time.perf_counter()
    session = onnx_session(out / ONNX_FILE)
    model64 = load_run(run_dir)[0].eval().double()
    try:
        enc = next(iter(load_task_data(cfg.data, load_tokenizer(run_dir), with_train=False).dev.values()))
        batches, seen = [], 0
        for b in eval_batches(enc, cfg.train.eval_batch_size, eval_pad_to(cfg.data)):  # whole evaluation batches:
            if seen >= parity_examples:                                               # the per-tensor scales see
                break                                                                 # what the evaluation sees
            batches.append(b)
            seen += len(b.input_ids)
        source = "dev"
    except (utils_glue.DataError, OSError) as e:  # no GLUE data here: random tokens still check the graph
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, model.shape.vocab_size, (8, 64), generator=g)
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[1:, 40:] = False
        batches, source = [Batch(ids, torch.zeros_like(ids), mask, torch.zeros(8))], f"random tokens ({type(e).__name__})"
    report = parity(model, model64, session, batches)
    fp32_bytes = sum(v.numel() * 4 for v in model.state_dict().values())
    sizes = {"fp32_state_dict_bytes": fp32_bytes,
             "run_model_safetensors_bytes": (run_dir / "model.safetensors").stat().st_size,
             "student_w2a8_bytes": (out / STUDENT_FILE).stat().st_size,
             "onnx_bytes": (out / ONNX_FILE).stat().st_size}
    sizes["compression_vs_fp32"] = fp32_bytes / sizes["student_w2a8_bytes"]
    info = {"run_dir": str(run_dir), "task": cfg.data.task, "quant": dataclasses.asdict(cfg.quant),
            "activation_quantizer": ACT_ROUNDING, "sizes": sizes, "parity": {**report, "source": source,
            "seconds": round(time.perf_counter() - t0, 1)}, "versions": _versions()}
    (out / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return info

