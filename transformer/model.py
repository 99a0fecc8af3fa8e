"""BERT encoder for GLUE with named per-layer tensors (docs/algorithms.md §3) and Hugging Face checkpoint I/O.

Module and parameter names are Hugging Face's (`bert.encoder.layer.0.attention.self.query`, ...), so
the key table below is short and a saved student loads in `BertForSequenceClassification`.
Activation-quantization points are explicit `ActSlot` modules (identity here); `transformer.quant`
swaps them for fake quantizers, so this file knows *where* activations are quantized, not *how*.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.fast import Dropout

# Tensors a caller may ask the forward to keep (docs/algorithms.md §3). "hidden" also keeps the embedding output.
KEEPABLE = frozenset({"scores", "probs", "context", "value", "sa_output", "attn_output", "hidden"})
MASK_VALUE = -10000.0  # additive attention mask of the published code; attn_score_mse zeroes entries <= -100


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used; the message is one line naming the folder."""


@dataclass(frozen=True)
class BertShape:
    """The architecture fields of an HF `BertConfig` that this model uses."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attn_dropout: float = 0.1
    pad_token_id: int = 0
    num_labels: int = 2
    initializer_range: float = 0.02  # std of HF's normal init, used for heads a base checkpoint lacks

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> BertShape:
        if d.get("model_type") != "bert":
            raise CheckpointError(f"{where}: not a BERT checkpoint (model_type is {d.get('model_type')!r}, expected 'bert')")
        if d.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{where}: hidden_act {d.get('hidden_act')!r} is not supported (only exact 'gelu')")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{where}: only absolute position embeddings are supported")
        num_labels = d.get("num_labels", len(d["id2label"]) if "id2label" in d else 2)
        try:
            return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
                       num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
                       max_position=d.get("max_position_embeddings", 512), type_vocab_size=d.get("type_vocab_size", 2),
                       layer_norm_eps=d.get("layer_norm_eps", 1e-12), hidden_dropout=d.get("hidden_dropout_prob", 0.1),
                       attn_dropout=d.get("attention_probs_dropout_prob", 0.1), pad_token_id=d.get("pad_token_id", 0),
                       num_labels=num_labels, initializer_range=d.get("initializer_range", 0.02))
        except KeyError as e:
            raise CheckpointError(f"{where}: missing BERT config field {e}") from None

    def to_hf(self) -> dict:
        return {"model_type": "bert", "architectures": ["BertForSequenceClassification"],
                "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "intermediate_size": self.intermediate_size,
                "max_position_embeddings": self.max_position, "type_vocab_size": self.type_vocab_size,
                "layer_norm_eps": self.layer_norm_eps, "hidden_dropout_prob": self.hidden_dropout,
                "attention_probs_dropout_prob": self.attn_dropout, "pad_token_id": self.pad_token_id,
                "hidden_act": "gelu", "position_embedding_type": "absolute", "num_labels": self.num_labels,
                "initializer_range": self.initializer_range,
                **({"problem_type": "regression"} if self.num_labels == 1 else {})}


@dataclass
class LayerOutput:
    """One encoder layer's tensors; each is None unless asked for (see KEEPABLE)."""
    hidden: Tensor | None = None       # (B, S, D) layer output
    scores: Tensor | None = None       # (B, H, S, S) QKᵀ/√d_h + additive mask, pre-softmax
    probs: Tensor | None = None        # (B, H, S, S) softmax(scores), before dropout and quantization
    context: Tensor | None = None      # (B, H, S, d_h) per-head P·V
    value: Tensor | None = None        # (B, H, S, d_h) V per head
    sa_output: Tensor | None = None    # (B, S, D) attention-output dense result, before dropout/residual/LayerNorm
    attn_output: Tensor | None = None  # (B, S, D) LayerNorm(dropout(sa_output) + h_in), the FFN input


@dataclass
class EncoderOutput:
    logits: Tensor                                   # (B, C)
    embeddings: Tensor | None = None                 # (B, S, D) embedding output = hidden[0]; kept with "hidden"
    layers: list[LayerOutput] = field(default_factory=list)

    def hidden_states(self) -> list[Tensor]:
        """[embeddings, layer 1 output, ..., layer L output] (needs keep ⊇ {"hidden"})."""
        return [self.embeddings] + [layer.hidden for layer in self.layers]


# Teacher Intervention modes (docs/algorithms.md §6): which teacher tensor replaces the student's own in every layer.
TI_TENSOR = {"map": "probs", "context": "context", "output": "sa_output"}


@dataclass
class Intervention:
    """Teacher Intervention for one student forward (docs/algorithms.md §6): in every layer l, the teacher's tensor of
    `mode` (map: probs, context: per-head context, output: sa_output; see TI_TENSOR) from a teacher forward
    on the same batch replaces the student's own downstream; the student's own tensors are still returned."""
    mode: str
    teacher: EncoderOutput

    def tensor(self, layer: int, shape: tuple[int, ...]) -> Tensor:
        """The teacher's replacement tensor for student layer `layer`; it must match the student's shape."""
        name = TI_TENSOR[self.mode]
        if layer >= len(self.teacher.layers) or getattr(self.teacher.layers[layer], name) is None:
            raise ValueError(f"Teacher Intervention '{self.mode}' needs the teacher's {name!r} of layer {layer}: "
                             f"run the teacher with keep ⊇ {{'{name}'}} on the same batch")
        t = getattr(self.teacher.layers[layer], name)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"Teacher Intervention '{self.mode}': teacher {name} of layer {layer} has shape "
                             f"{tuple(t.shape)}, the student's is {tuple(shape)} (not the same batch or architecture?)")
        return t


class ActSlot(nn.Module):
    """A point where the student's activations are fake-quantized; identity until `quantize_model` swaps it.

    `valid` (B, S) bool marks real tokens, for quantizers that exclude padding from their scale.
    """

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        return x


class Embeddings(nn.Module):
    def __init__(self, c: BertShape):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))  # (B, S, D)


class SelfAttention(nn.Module):
    def __init__(self, c: BertShape):
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout = Dropout(c.attn_dropout)
        self.act_in, self.act_q, self.act_k, self.act_v, self.act_probs = (ActSlot() for _ in range(5))

    def _heads(self, x: Tensor) -> Tensor:
        B, S, _ = x.shape
        return x.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # (B, S, D) -> (B, H, S, d_h)

    def forward(self, h: Tensor, add_mask: Tensor, valid: Tensor, teacher_probs: Tensor | None = None,
                stop_qk: bool = False, stop_v: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns scores, probs (B, H, S, S), value and context (B, H, S, d_h).

        teacher_probs (MI): multiplied with V in place of the student's probs (after the student's dropout and
        quantization); the returned scores/probs stay the student's. stop_qk / stop_v: no gradient flows into
        the layer input through the Q, K / V projections (TI, docs/algorithms.md §6).
        """
        x = self.act_in(h, valid)  # one quantized input shared by Q, K and V (same tensor, same scale)
        x_qk = x.detach() if stop_qk else x
        q = self._heads(self.act_q(self.query(x_qk), valid))
        k = self._heads(self.act_k(self.key(x_qk), valid))
        v = self._heads(self.act_v(self.value(x.detach() if stop_v else x), valid))
        # scale the (B, H, S, d_h) query, not the (B, H, S, S) product, and add the mask in place: two fewer S×S passes
        scores = (q * (1 / math.sqrt(self.head_dim)) @ k.transpose(-1, -2)).add_(add_mask)  # (B, H, S, S)
        probs = scores.softmax(dim=-1)
        mixing = probs if teacher_probs is None else teacher_probs
        context = self.act_probs(self.dropout(mixing), valid) @ v  # (B, H, S, d_h)
        return scores, probs, v, context


class SelfOutput(nn.Module):
    def __init__(self, c: BertShape):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout)
        self.act_in = ActSlot()


class Attention(nn.Module):
    def __init__(self, c: BertShape):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = SelfOutput(c)


class Intermediate(nn.Module):
    def __init__(self, c: BertShape):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act_in = ActSlot()


class Output(nn.Module):
    def __init__(self, c: BertShape):
        super().__init__()
        self.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout)
        self.act_in = ActSlot()


class Layer(nn.Module):
    def __init__(self, c: BertShape):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = Output(c)

    def forward(self, h: Tensor, add_mask: Tensor, valid: Tensor, keep: frozenset[str],
                intervene: Intervention | None = None, index: int = 0) -> LayerOutput:
        B, S, D = h.shape
        mode = intervene.mode if intervene is not None else None
        t_probs = intervene.tensor(index, (B, self.attention.self.num_heads, S, S)) if mode == "map" else None
        # docs/algorithms.md §6: MI stops the gradient into h through Q and K; CI and OI through Q, K and V
        scores, probs, value, context = self.attention.self(h, add_mask, valid, t_probs, stop_qk=mode is not None,
                                                            stop_v=mode in ("context", "output"))
        so = self.attention.output
        mixed = context if mode != "context" else intervene.tensor(index, context.shape)
        if mode == "output":  # the student's own dense result is computed only if a loss or analysis asks for it
            sa_output = so.dense(so.act_in(context.transpose(1, 2).reshape(B, S, D), valid)) if "sa_output" in keep else None
            downstream = intervene.tensor(index, (B, S, D))
        else:
            sa_output = so.dense(so.act_in(mixed.transpose(1, 2).reshape(B, S, D), valid))  # (B, H, S, d_h) -> (B, S, D)
            downstream = sa_output
        attn_output = so.LayerNorm(so.dropout(downstream) + h)
        inter = F.gelu(self.intermediate.dense(self.intermediate.act_in(attn_output, valid)))
        out = self.output.dense(self.output.act_in(inter, valid))
        hidden = self.output.LayerNorm(self.output.dropout(out) + attn_output)
        named = {"hidden": hidden, "scores": scores, "probs": probs, "context": context, "value": value,
                 "sa_output": sa_output, "attn_output": attn_output}
        result = LayerOutput(**{k: v for k, v in named.items() if k in keep})
        result.hidden = hidden  # always handed to the next layer; the model drops it unless kept
        return result


class Pooler(nn.Module):
    def __init__(self, c: BertShape):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.act_in = ActSlot()

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(self.dense(self.act_in(h[:, 0])))  # [CLS] token, (B, D)


class BertBody(nn.Module):
    def __init__(self, c: BertShape):
        super().__init__()
        self.embeddings = Embeddings(c)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Layer(c) for _ in range(c.num_layers))
        self.pooler = Pooler(c)


class BertForGlue(nn.Module):
    """BERT + pooler + linear classifier, as HF `BertForSequenceClassification` (num_labels=1: regression)."""

    def __init__(self, shape: BertShape):
        super().__init__()
        self.shape = shape
        self.bert = BertBody(shape)
        self.dropout = Dropout(shape.hidden_dropout)
        self.classifier = nn.Linear(shape.hidden_size, shape.num_labels)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, attention_mask: Tensor,
                keep: frozenset[str] = frozenset(), intervene: Intervention | None = None) -> EncoderOutput:
        """input_ids, token_type_ids: (B, S) int; attention_mask: (B, S) bool or 0/1, True = real token.

        intervene: Teacher Intervention (docs/algorithms.md §6) with the teacher's outputs on this same batch; None = off.
        """
        unknown = set(keep) - KEEPABLE
        if unknown:
            raise ValueError(f"cannot keep {sorted(unknown)}; choose from {sorted(KEEPABLE)}")
        if intervene is not None:
            if intervene.mode not in TI_TENSOR:
                raise ValueError(f"unknown Teacher Intervention mode {intervene.mode!r}; choose from {sorted(TI_TENSOR)}")
            if len(intervene.teacher.layers) != self.shape.num_layers:
                raise ValueError(f"Teacher Intervention needs a teacher with the student's {self.shape.num_layers} layers, "
                                 f"got {len(intervene.teacher.layers)} teacher layer outputs")
        valid = attention_mask.bool()
        h = self.bert.embeddings(input_ids, token_type_ids)
        add_mask = (~valid)[:, None, None, :].to(h.dtype) * MASK_VALUE  # (B, 1, 1, S)
        out = EncoderOutput(logits=h.new_empty(0), embeddings=h if "hidden" in keep else None)
        for i, layer in enumerate(self.bert.encoder.layer):
            lo = layer(h, add_mask, valid, keep, intervene, i)
            h = lo.hidden
            if "hidden" not in keep:
                lo.hidden = None
            out.layers.append(lo)
        out.logits = self.classifier(self.dropout(self.bert.pooler(h)))
        return out


# ---------------------------------------------------------------------------------------------
# Checkpoint I/O: an explicit key table and a strict load

_LAYER_KEYS = [
    "attention.self.query.weight", "attention.self.query.bias",
    "attention.self.key.weight", "attention.self.key.bias",
    "attention.self.value.weight", "attention.self.value.bias",
    "attention.output.dense.weight", "attention.output.dense.bias",
    "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias",
    "intermediate.dense.weight", "intermediate.dense.bias",
    "output.dense.weight", "output.dense.bias",
    "output.LayerNorm.weight", "output.LayerNorm.bias",
]
_TOP_KEYS = [
    "bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight",
    "bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias",
    "bert.pooler.dense.weight", "bert.pooler.dense.bias",
    "classifier.weight", "classifier.bias",
]
# Tensors of HF checkpoints we drop on purpose: a buffer, and the pre-training heads (MLM, NSP).
_DROPPED = [
    "bert.embeddings.position_ids",
    "cls.predictions.bias", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
    "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
    "cls.seq_relationship.weight", "cls.seq_relationship.bias",
]


def hf_key_table(num_layers: int) -> dict[str, str | None]:
    """HF `BertFor*` tensor name -> our parameter name (None = dropped on purpose). Ours equal HF's."""
    table: dict[str, str | None] = {k: k for k in _TOP_KEYS}
    for i in range(num_layers):
        for k in _LAYER_KEYS:
            name = f"bert.encoder.layer.{i}.{k}"
            table[name] = name
    table.update({k: None for k in _DROPPED})
    return table


def _canonical(key: str) -> str:
    # `BertModel` checkpoints (like all-MiniLM-L6-v2) store the body without the "bert." prefix.
    return key if key.startswith(("bert.", "cls.", "classifier.")) else "bert." + key


def _read_state_dict(folder: Path) -> dict[str, Tensor]:
    st, binf = folder / "model.safetensors", folder / "pytorch_model.bin"
    try:
        if st.exists():
            from safetensors.torch import load_file
            return load_file(str(st))
        if binf.exists():
            return torch.load(binf, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated file: report which, not a library traceback
        raise CheckpointError(f"{folder}: cannot read the weights file: {type(e).__name__}: {e}".splitlines()[0]) from None
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin (not a Hugging Face checkpoint folder)")


def read_shape(folder: str | Path) -> BertShape:
    folder = Path(folder)
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    try:
        d = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: invalid JSON ({e})") from None
    return BertShape.from_hf(d, where=str(cfg))


def load_bert(folder: str | Path, num_labels: int | None = None, new_classifier: bool = False) -> BertForGlue:
    """Load an HF BERT checkpoint folder (safetensors or bin) strictly through `hf_key_table`.

    new_classifier: the checkpoint is a base model (no `classifier.*`, perhaps no pooler either); a fresh head with
    `num_labels` outputs (and a pooler, if missing) is initialised as HF does: N(0, initializer_range), zero bias.
    Otherwise (teachers and students) the load is strict and the classifier must have `num_labels`.
    """
    folder = Path(folder)
    shape = read_shape(folder)
    sd = _read_state_dict(folder)
    table = hf_key_table(shape.num_layers)
    converted: dict[str, Tensor] = {}
    for key, tensor in sd.items():
        canon = _canonical(key)
        if canon not in table:
            raise CheckpointError(f"{folder}: unexpected tensor {key!r} (not a BERT-for-classification checkpoint?)")
        if table[canon] is not None:
            converted[table[canon]] = tensor
    if new_classifier:
        if num_labels is None:
            raise ValueError("new_classifier needs num_labels")
        shape = dataclasses.replace(shape, num_labels=num_labels)
        model = BertForGlue(shape)
        fresh = ["classifier"]
        if not any(k.startswith("bert.pooler.") for k in converted):  # e.g. sentence-embedding checkpoints
            fresh.append("bert.pooler.dense")
            print(f"{folder}: no pooler weights; a new pooler is initialised as Hugging Face does")
        for prefix in fresh:  # HF's init of a fresh head: N(0, initializer_range), zero bias
            head = model.get_submodule(prefix)
            nn.init.normal_(head.weight, std=shape.initializer_range)
            nn.init.zeros_(head.bias)
            converted[f"{prefix}.weight"] = head.weight.detach().clone()
            converted[f"{prefix}.bias"] = head.bias.detach().clone()
    else:
        if "classifier.weight" not in converted:
            raise CheckpointError(f"{folder}: has no classifier (a base model, not a fine-tuned one)")
        got = converted["classifier.weight"].shape[0]
        if num_labels is not None and got != num_labels:
            raise CheckpointError(f"{folder}: classifier has num_labels={got} but the task needs {num_labels}")
        shape = dataclasses.replace(shape, num_labels=got)
        model = BertForGlue(shape)
    missing = set(model.state_dict()) - set(converted)
    if missing:
        raise CheckpointError(f"{folder}: missing tensor(s) {sorted(missing)[:3]}{' ...' if len(missing) > 3 else ''}")
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as e:  # shape mismatch between config.json and the weights
        raise CheckpointError(f"{folder}: weights do not match config.json: {str(e).splitlines()[-1].strip()}") from None
    return model


def save_bert(model: BertForGlue, folder: str | Path, extra_config: dict | None = None,
              saved_elsewhere: frozenset[str] = frozenset()) -> None:
    """Write config.json + model.safetensors under HF names (latent FP weights), loadable by HF and `load_bert`.
    saved_elsewhere: state_dict keys outside the HF key table that the caller stores itself (learned clips)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    inverse = {ours: hf for hf, ours in hf_key_table(model.shape.num_layers).items() if ours is not None}
    state = model.state_dict()
    unknown = set(state) - set(inverse) - saved_elsewhere
    if unknown:
        raise CheckpointError(f"cannot save {sorted(unknown)[:3]}: not in the Hugging Face key table")
    sd = {inverse[k]: v.detach().contiguous().cpu() for k, v in state.items() if k in inverse}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.shape.to_hf()
    cfg.update(extra_config or {})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
