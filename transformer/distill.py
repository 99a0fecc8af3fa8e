"""General distillation (docs/algorithms.md §7): the student's shape and init, the layer map, the training-only
projections, and the schedule as a choice of phases.

    layer_map("uniform", teacher_layers=6, student_layers=3)   # -> [1, 3, 5]
    student = build_student(cfg.distill, load_bert(cfg.model.teacher_dir, 1))
    phase = phase_of(cfg)          # which parameters train, with which loss weights

Pure functions and two small modules; the training loop (transformer/train.py) only asks them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from transformer.config import ConfigError, DistillConfig, LossConfig, RunConfig, parse_layer_list, resolve
from transformer.losses import active_terms
from transformer.model import BertForGlue, BertShape, EncoderOutput
from transformer.rundir import run_folder

# ---------------------------------------------------------------------------------------------
# Layer maps and init layers

def uniform_layers(source_layers: int, student_layers: int) -> list[int]:
    """Student layer i <- source layer ⌈(i+1)·L/L_S⌉ − 1 (0-based): spread evenly, the top layer always kept."""
    return [math.ceil((i + 1) * source_layers / student_layers) - 1 for i in range(student_layers)]


def _pick(spec: str, source_layers: int, student_layers: int, flag: str, what: str) -> list[int]:
    explicit = parse_layer_list(spec, flag)
    if explicit is None:
        if student_layers > source_layers:
            raise ConfigError(f"{flag} {spec}: the student has {student_layers} layers, more than the {source_layers} of "
                              f"the {what}; give a comma list of {student_layers} {what} layers")
        return {"uniform": uniform_layers(source_layers, student_layers),
                "first": list(range(student_layers)),
                "last": list(range(source_layers - student_layers, source_layers))}[spec]
    if len(explicit) != student_layers:
        raise ConfigError(f"{flag} {spec} names {len(explicit)} layer(s) but the student has {student_layers}")
    bad = [j for j in explicit if not 0 <= j < source_layers]
    if bad:
        raise ConfigError(f"{flag} {spec}: layer {bad[0]} does not exist, the {what} has layers 0..{source_layers - 1}")
    return explicit


def layer_map(spec: str, teacher_layers: int, student_layers: int) -> list[int]:
    """--distill.layer_map -> [teacher layer of student layer i for i < L_S]; checked against both depths."""
    return _pick(spec, teacher_layers, student_layers, "--distill.layer_map", "teacher")


def init_layers(spec: str, source_layers: int, student_layers: int) -> list[int]:
    """--distill.init_layers -> [source layer whose weights student layer i starts from]."""
    return _pick(spec, source_layers, student_layers, "--distill.init_layers", "init source")


# ---------------------------------------------------------------------------------------------
# The student

def student_shape(source: BertShape, d: DistillConfig) -> BertShape:
    """The source checkpoint's shape with the --distill.student_* overrides."""
    return dataclasses.replace(source, num_layers=d.student_layers or source.num_layers,
                               hidden_size=d.student_hidden or source.hidden_size,
                               num_heads=d.student_heads or source.num_heads,
                               intermediate_size=d.student_ffn or source.intermediate_size)


def same_width(a: BertShape, b: BertShape) -> bool:
    return (a.hidden_size, a.num_heads, a.intermediate_size) == (b.hidden_size, b.num_heads, b.intermediate_size)


def random_init_(model: BertForGlue, seed: int) -> BertForGlue:
    """Hugging Face's BERT init: Linear and Embedding weights N(0, initializer_range), biases 0, LayerNorm (1, 0),
    the padding row 0. A private generator, so the run's RNG stream is untouched."""
    g = torch.Generator().manual_seed(seed)
    std = model.shape.initializer_range
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
            if isinstance(m, nn.Linear):
                m.bias.zero_()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
    return model


def build_student(d: DistillConfig, source: BertForGlue, seed: int) -> BertForGlue:
    """The FP student before quantization. Same shape as the source: the source itself (bit for bit, the KD-QAT
    default). Fewer layers, same width: embeddings, pooler and classifier copied, student layer i from source layer
    init_layers[i]. Another hidden/head/FFN size (or init_layers random): Hugging Face's random init."""
    shape = student_shape(source.shape, d)
    if shape == source.shape and d.init_layers == "uniform":
        return source
    if not same_width(shape, source.shape) or d.init_layers == "random":
        if d.init_layers not in ("uniform", "random"):
            raise ConfigError(f"--distill.init_layers {d.init_layers}: the student's width differs from its init source's "
                              "(hidden, heads or FFN), so it starts from a random init: drop the flag")
        return random_init_(BertForGlue(shape), seed)
    picked = init_layers(d.init_layers, source.shape.num_layers, shape.num_layers)
    student = BertForGlue(shape)
    sd = source.state_dict()
    copied = {k: v for k, v in sd.items() if not k.startswith("bert.encoder.layer.")}
    for i, j in enumerate(picked):
        prefix = f"bert.encoder.layer.{j}."
        copied |= {f"bert.encoder.layer.{i}.{k[len(prefix):]}": v for k, v in sd.items() if k.startswith(prefix)}
    student.load_state_dict(copied, strict=True)
    return student


# Terms that compare per-head tensors (B, H, S, ·): they need the teacher's head count (and head size).
HEAD_TERMS = ("attn_score_mse", "attn_prob_kl", "value_relation_kl", "context_mse")
# Terms on (B, S, D) tensors with no projection: they need the teacher's hidden size.
WIDTH_TERMS = ("attn_output_mse", "sa_output_mse")
# Hidden-state terms: a projection takes the student's width to the teacher's when they differ (TinyBERT W_h).
PROJECTED_TERMS = ("hidden_mse", "cls_norm_mse")


def check_shapes(student: BertShape, teacher: BertShape, loss: LossConfig) -> None:
    """Refuse, in one line, loss terms that cannot compare this student with this teacher."""
    on = active_terms(loss)
    heads = [n for n in HEAD_TERMS if n in on]
    if heads and (student.num_heads, student.head_dim) != (teacher.num_heads, teacher.head_dim):
        raise ConfigError(f"{', '.join(heads)} compare attention heads one to one: the student has {student.num_heads} "
                          f"heads of size {student.head_dim}, the teacher {teacher.num_heads} of size {teacher.head_dim}; "
                          "set those weights to 0 or give the student the teacher's heads")
    width = [n for n in WIDTH_TERMS if n in on]
    if width and student.hidden_size != teacher.hidden_size:
        raise ConfigError(f"{', '.join(width)} need the teacher's hidden size {teacher.hidden_size} "
                          f"(the student's is {student.hidden_size}); set those weights to 0")


# ---------------------------------------------------------------------------------------------
# Projections: training-only parameters between the named outputs and the pure losses

class Projections(nn.Module):
    """TinyBERT's W_h: hidden states (B, S, d_S) -> (B, S, d_T), one nn.Linear per compared pair (embeddings + each
    student layer; TinyBERT shares one W_h across layers). Empty, an exact identity, when widths are equal. Part of
    the optimizer and checkpoint.pt, never of the saved student."""

    def __init__(self, d_student: int, d_teacher: int, num_layers: int, initializer_range: float, seed: int):
        super().__init__()
        n = num_layers + 1 if d_student != d_teacher else 0
        self.maps = nn.ModuleList(nn.Linear(d_student, d_teacher) for _ in range(n))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in self.maps:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * initializer_range)
                m.bias.zero_()

    def forward(self, out: EncoderOutput) -> EncoderOutput:
        if not len(self.maps) or out.embeddings is None:  # no hidden states kept: nothing to project
            return out
        layers = [dataclasses.replace(lo, hidden=self.maps[i + 1](lo.hidden)) for i, lo in enumerate(out.layers)]
        return dataclasses.replace(out, embeddings=self.maps[0](out.embeddings), layers=layers)


class TrainedStudent(nn.Module):
    """What the optimizer (and DDP) sees: the student and its projections; forward = student, then projections.
    With no projections its parameters are the student's, in the same order."""

    def __init__(self, student: BertForGlue, projections: Projections):
        super().__init__()
        self.student, self.projections = student, projections

    def forward(self, *args, **kwargs) -> EncoderOutput:
        return self.projections(self.student(*args, **kwargs))


# ---------------------------------------------------------------------------------------------
# Schedules: a choice of phases

LOGIT_TERMS = ("logits_kd", "logits_mse", "label_loss")
HEAD = ("bert.pooler.", "classifier.")  # the prediction head two-step's step 2 trains


@dataclass(frozen=True)
class Phase:
    """One run's share of a schedule: which student parameters train (by HF name) and with which loss weights."""
    name: str
    trains: Callable[[str], bool]
    loss: LossConfig


def _only(loss: LossConfig, keep: Callable[[str], bool], what: str) -> LossConfig:
    weights = {f"{n}_weight": 0.0 for n in active_terms(loss) if not keep(n)}
    if len(weights) == len(active_terms(loss)):
        raise ConfigError(f"two-step {what} has no loss term: every one of its coefficients is 0")
    return dataclasses.replace(loss, **weights)


def _in_head(name: str) -> bool:
    return name.startswith(HEAD)


def phase_of(cfg: RunConfig) -> Phase:
    """mix: everything with every term. two_step step 1: the encoder (embeddings + layers, and the projections)
    with the intermediate terms; step 2: the head (pooler + classifier) with the logit terms."""
    d = cfg.distill
    if d.schedule == "mix":
        return Phase("mix", lambda name: True, cfg.loss)
    if d.step == "1":
        return Phase("encoder", lambda name: not _in_head(name),
                     _only(cfg.loss, lambda n: n not in LOGIT_TERMS, "step 1 (encoder, intermediate terms)"))
    if d.step == "2":
        return Phase("head", _in_head, _only(cfg.loss, lambda n: n in LOGIT_TERMS, "step 2 (head, logit terms)"))
    raise ValueError("--distill.step all is run as step 1 then step 2 (see steps_of)")


def steps_of(cfg: RunConfig) -> list[RunConfig]:
    """The runs one command makes: itself, or for two_step with step all, step 1 then step 2 (a given run_name gets
    -step1 / -step2)."""
    d = cfg.distill
    if d.schedule != "two_step" or d.step != "all":
        return [cfg]
    name = cfg.train.run_name
    return [dataclasses.replace(cfg, distill=dataclasses.replace(d, step=s),
                                train=dataclasses.replace(cfg.train, run_name=name and f"{name}-step{s}"))
            for s in ("1", "2")]


def step1_folder(cfg: RunConfig) -> Path:
    """The two-step step-1 run a step-2 config continues: --distill.step1_run, or the run of the same config with
    distill.step 1, found by its name (a given run_name ending in -step2 -> -step1)."""
    cfg = resolve(cfg)
    if cfg.distill.step1_run:
        return Path(cfg.distill.step1_run)
    name = cfg.train.run_name
    name = name[: -len("-step2")] + "-step1" if name and name.endswith("-step2") else None
    return run_folder(dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, step="1"),
                                          train=dataclasses.replace(cfg.train, run_name=name)))
