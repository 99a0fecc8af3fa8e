"""Training: teacher fine-tuning (FP, task loss) and the KD-QAT loop (docs/algorithms.md §5), each one readable function.

    cfg = resolve(parse_config(["--data.task", "rte"]))
    result = train(cfg)          # -> output/rte/<run name>/ with the best student, best.json, logs
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import utils_glue
from transformer import distill, distributed, teacher_cache
from transformer.config import ConfigError, OptimConfig, RunConfig, incompatible_fields, resolve
from transformer.data import (Batch, TaskData, eval_batches, eval_pad_to, load_task_data, steps_per_epoch, train_batches,
                              train_padding)
from transformer.distributed import pick_device
from transformer.intervention import MODE_CODE, mode_at
from transformer.losses import LossContext, active_terms, distill_loss, identity_layer_map, label_loss, required_tensors
from transformer.model import TI_TENSOR, BertForGlue, CheckpointError, Intervention, load_bert, read_shape, save_bert
from transformer.fast import compiled_quantizers, saved_activations_as_codes
from transformer.quant import LEARNED_CLIPS, ActFakeQuantizer, load_learned_clips, quantize_model
from transformer.teacher_cache import TeacherCache
from transformer.rundir import (CHECKPOINT, FolderLock, RunDir, RunError, check_run_folder, check_writable, git_sha, load_checkpoint,
                                load_run, load_tokenizer, run_folder, save_checkpoint, write_json)


class RunInterrupted(RunError):
    """SIGINT/SIGTERM: the run stopped at a step boundary after writing its checkpoint."""


class NonFiniteError(RunError):
    """A non-finite loss or gradient under --train.on_nonfinite stop."""


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule

def _no_decay(name: str) -> bool:
    return name.endswith(".bias") or "LayerNorm" in name


def param_groups(model: nn.Module, weight_decay: float, clip_lr_scale: float = 1.0) -> list[dict]:
    """Decayed weights, then biases and LayerNorms (no decay); learned activation clips (PACT), if any, in a third
    group without decay whose LR is clip_lr_scale times the schedule's (`lr_scale`, read where the LR is set)."""
    clips = {id(p) for m in model.modules() if isinstance(m, ActFakeQuantizer) and m.config.learned_clip
             for p in m.parameters(recurse=False)}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in clips]
    groups = [{"params": [p for n, p in named if not _no_decay(n)], "weight_decay": weight_decay},
              {"params": [p for n, p in named if _no_decay(n)], "weight_decay": 0.0}]
    learned = [p for p in model.parameters() if id(p) in clips and p.requires_grad]
    if learned:
        groups.append({"params": learned, "weight_decay": 0.0, "lr_scale": clip_lr_scale})
    return groups


class BertAdam(torch.optim.Optimizer):
    """The published optimizer: Adam with no bias correction, gradient-norm clip per parameter tensor,
    decoupled weight decay (added to the update, scaled by the LR). The LR is set per step by the loop."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
                 max_grad_norm: float = 1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm))

    @torch.no_grad()
    def step(self, closure=None):
        # Multi-tensor (torch._foreach_*) form of, per parameter p with gradient g:
        #   g = g · min(1, max_norm / (‖g‖ + 1e-6));  m = b1·m + (1-b1)·g;  v = b2·v + (1-b2)·g²
        #   p -= lr · (m / (√v + eps) + wd·p)
        # Same operations in the same order as the per-tensor loop, so the same bits, with one dispatch per
        # operation for the whole group instead of one per tensor.
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            b1, b2 = group["betas"]
            grads = [p.grad for p in params]
            if group["max_grad_norm"] > 0:  # per tensor, as torch's clip_grad_norm_(p, max) would
                scale = (group["max_grad_norm"] / (torch.stack(torch._foreach_norm(grads)) + 1e-6)).clamp(max=1.0)
                grads = torch._foreach_mul(grads, scale.unbind())
            for p in params:
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_mul_(m, b1)
            torch._foreach_add_(m, grads, alpha=1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
            del grads
            denom = torch._foreach_sqrt(v)
            torch._foreach_add_(denom, group["eps"])
            update = torch._foreach_div(m, denom)
            del denom
            if group["weight_decay"] > 0:
                torch._foreach_add_(update, torch._foreach_mul(params, group["weight_decay"]))
            torch._foreach_add_(params, update, alpha=-group["lr"])


class ClippedAdamW(torch.optim.AdamW):
    """torch AdamW (with bias correction) after clipping the global gradient norm."""

    def __init__(self, params, max_grad_norm: float, **kw):
        super().__init__(params, **kw)
        self.max_grad_norm = max_grad_norm

    def step(self, closure=None):
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], self.max_grad_norm)
        return super().step(closure)


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.clip_lr / cfg.lr)
    if cfg.optimizer == "bertadam":
        return BertAdam(groups, lr=cfg.lr, eps=cfg.adam_eps, max_grad_norm=cfg.max_grad_norm)
    return ClippedAdamW(groups, cfg.max_grad_norm, lr=cfg.lr, eps=cfg.adam_eps)


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up over the first warmup_ratio·total steps, then linear decay reaching 0 just after the
    last step. `step` is 0-based; no step runs at LR 0."""
    warmup = int(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (total - step) / (total - warmup)


# ---------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def predict(model: BertForGlue, enc: utils_glue.Encoded, batch_size: int, pad_to: int | None,
            device: torch.device) -> np.ndarray:
    """Class indices (or regression scores) for every example, in order; the model runs in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for batch in eval_batches(enc, batch_size, pad_to):
        b = batch.to(device)
        logits = model(b.input_ids, b.token_type_ids, b.attention_mask).logits
        out.append(logits[:, 0] if logits.shape[-1] == 1 else logits.argmax(-1))
    model.train(was_training)
    return torch.cat(out).float().cpu().numpy() if model.shape.num_labels == 1 else torch.cat(out).cpu().numpy()


def evaluate(model: BertForGlue, data: TaskData, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """Dev metrics; MNLI's mismatched set is reported with an `mm_` prefix."""
    metrics = {}
    for i, (split, enc) in enumerate(data.dev.items()):
        preds = predict(model, enc, cfg.train.eval_batch_size, eval_pad_to(cfg.data), device)
        m = utils_glue.compute_metrics(data.task, preds, enc.labels)
        metrics.update(m if i == 0 else {f"mm_{k}": v for k, v in m.items()})
    return metrics


# ---------------------------------------------------------------------------------------------
# Tokenizer and saved-student helpers

def _student_extra_config(cfg: RunConfig, task: utils_glue.TaskSpec) -> dict:
    extra = {"kdqat": {"task": task.name, "quant": dataclasses.asdict(cfg.quant)}}
    if task.labels is not None:
        extra["id2label"] = {str(i): l for i, l in enumerate(task.labels)}
        extra["label2id"] = {l: i for i, l in enumerate(task.labels)}
    return extra


def _log_line(step: int, values: dict[str, float]) -> str:
    return f"step {step} | " + " | ".join(f"{k} {v:.4g}" for k, v in values.items())


# ---------------------------------------------------------------------------------------------
# Teacher fine-tuning (FP, task loss), only when models/<task> holds no teacher

def has_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "config.json").is_file() and any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))


def finetune_teacher(cfg: RunConfig, command: list[str]) -> Path:
    """Fine-tune model.base_dir on the task (CE / MSE, AdamW, linear schedule) and save the final model as
    the teacher in HF format. Written to a temporary folder and renamed, so a crash leaves no half-teacher."""
    cfg = resolve(cfg)
    device = pick_device(cfg.train.device)
    if cfg.train.threads:  # also when called alone (--teacher-only), not only from prepare
        torch.set_num_threads(cfg.train.threads)
    target = Path(cfg.model.teacher_dir)
    if target.exists() and any(target.iterdir()):
        raise CheckpointError(f"{target} holds files but no model checkpoint; remove it or choose another --model.teacher_dir")
    if not has_checkpoint(cfg.model.base_dir):
        raise CheckpointError(f"{cfg.model.base_dir}: base model not found (install it with `bash setup.sh`)")
    tokenizer = load_tokenizer(cfg.model.base_dir)
    data = load_task_data(cfg.data, tokenizer)
    torch.manual_seed(cfg.train.seed)
    model = load_bert(cfg.model.base_dir, num_labels=data.task.num_labels, new_classifier=True).to(device).train()
    t = cfg.teacher
    optim = OptimConfig(optimizer="adamw", lr=t.lr, warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay)
    opt = make_optimizer(model, optim)
    total = t.max_steps or math.ceil(t.epochs * steps_per_epoch(len(data.train), cfg.train.batch_size))
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log = open(tmp / "finetune_log.jsonl", "w")
    batches = train_batches(data.train, cfg.train.batch_size, cfg.train.seed, **train_padding(cfg.data))
    start = time.time()
    for step in tqdm(range(total), desc=f"teacher {data.task.name}", dynamic_ncols=True):
        b = next(batches)[0][0].to(device)  # one process, no accumulation: one micro-batch with share 1
        out = model(b.input_ids, b.token_type_ids, b.attention_mask)
        loss = label_loss(out, None, LossContext(b.attention_mask, b.labels, data.task.is_regression, layer_map=[]))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, optim.lr, optim.warmup_ratio)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == total:
            log.write(json.dumps({"step": step + 1, "loss/label_loss": loss.item()}) + "\n")
        if (step + 1) % cfg.train.eval_every == 0 or step + 1 == total:
            metrics = evaluate(model, data, cfg, device)
            log.write(json.dumps({"step": step + 1, **{f"eval/{k}": v for k, v in metrics.items()}}) + "\n")
            tqdm.write(_log_line(step + 1, metrics))
        log.flush()
    log.close()
    save_bert(model, tmp, _student_extra_config(dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, enabled=False)), data.task))
    tokenizer.save_pretrained(str(tmp))
    write_json(tmp / "finetune.json", {"task": data.task.name, "base_model": str(cfg.model.base_dir), "steps": total,
                                        "dev": metrics, "wall_s": round(time.time() - start, 1),
                                        "teacher": dataclasses.asdict(t), "command": command, "git_sha": git_sha()})
    if target.exists():  # empty (checked above)
        target.rmdir()
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    print(f"teacher saved to {target} (dev {metrics})")
    return target


def ensure_teacher(cfg: RunConfig, command: list[str]) -> Path:
    """model.teacher_dir, fine-tuned first when it holds no checkpoint (one process; a concurrent launch waits)."""
    cfg = resolve(cfg)
    with FolderLock(Path(cfg.model.teacher_dir), "teacher folder", inside=False).acquire(wait=True):  # another run may be making it
        if not has_checkpoint(cfg.model.teacher_dir):
            print(f"no teacher in {cfg.model.teacher_dir}: fine-tuning one from {cfg.model.base_dir}")
            finetune_teacher(cfg, command)
    return Path(cfg.model.teacher_dir)


# ---------------------------------------------------------------------------------------------
# KD-QAT

STEP1_STUDENT = "last"  # TI and two-step step 1 save their latest evaluated student here; step 2 starts from it


def step1_folder(cfg: RunConfig) -> Path:
    """The TI step-1 run a step-2 config continues: --ti.step1_run, or by default the run of the same config with
    ti.step 1, found by its default name."""
    cfg = resolve(cfg)
    if cfg.ti.step1_run:
        return Path(cfg.ti.step1_run)
    return run_folder(dataclasses.replace(cfg, ti=dataclasses.replace(cfg.ti, step=1),
                                          train=dataclasses.replace(cfg.train, run_name=None)))


def student_init_folder(cfg: RunConfig) -> Path:
    """Where the student's weights come from: the teacher (docs/algorithms.md §1), model.student_init_dir if given,
    or for TI step 2 the final student of its step-1 run (`<step-1 run>/last`). Checked before any work starts."""
    if cfg.ti.mode != "off" and cfg.ti.step == 2:
        if cfg.model.student_init_dir:
            raise ConfigError("--ti.step 2 starts from its step-1 run; do not also give --model.student_init_dir")
        step1 = step1_folder(cfg)
        if not (step1 / "result.json").is_file() or not has_checkpoint(step1 / STEP1_STUDENT):
            how = ("pass the step-1 run folder with --ti.step1_run" if cfg.ti.step1_run else
                   f"run `bash run_TI_step_1.sh {cfg.data.task} --ti.mode {cfg.ti.mode}` with the same flags first, "
                   "or pass its folder with --ti.step1_run")
            raise RunError(f"TI step 2 continues the finished step-1 run {step1}, which is missing or unfinished: {how}")
        _warn_step1_drift(step1, cfg)
        return step1 / STEP1_STUDENT
    if cfg.distill.schedule == "two_step" and cfg.distill.step == "2":
        if cfg.model.student_init_dir:
            raise ConfigError("two-step step 2 starts from its step-1 run; do not also give --model.student_init_dir")
        step1 = distill.step1_folder(cfg)
        if not (step1 / "result.json").is_file() or not has_checkpoint(step1 / STEP1_STUDENT):
            raise RunError(f"two-step step 2 continues the finished step-1 run {step1}, which is missing or unfinished: "
                           "run the same command with --distill.step 1 (or all) first, or pass its folder with --distill.step1_run")
        return step1 / STEP1_STUDENT
    return Path(cfg.model.student_init_dir or cfg.model.teacher_dir)


def _warn_step1_drift(step1: Path, cfg: RunConfig) -> None:
    """One line when step 2 computes with other settings than its step-1 run did (allowed: it may be on purpose)."""
    try:
        saved = RunConfig.from_dict(json.loads((step1 / "run_config.json").read_text()))
    except (OSError, ValueError, TypeError, ConfigError):
        return
    ignore = {"ti.step", "ti.step1_run", "train.run_name", "train.eval_every"}
    diff = [f for f in incompatible_fields(saved, cfg) if f not in ignore]
    if diff:
        print(f"note: TI step 2 differs from its step-1 run {step1} in {', '.join(diff)}")


def step_budget(cfg: RunConfig, train_examples: int) -> tuple[int, int]:
    """(optimizer steps of this run, steps that came before it). The budget N_total is train.max_steps or
    epochs × steps per epoch; TI step 1 runs N1 = ti.steps of it and step 2 the remaining N_total − N1."""
    n_total = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch(train_examples, cfg.train.batch_size))
    if cfg.distill.schedule == "two_step":  # step 2 (head only) takes head_ratio of the budget, step 1 the rest
        n2 = max(1, round(cfg.distill.head_ratio * n_total))
        if n2 >= n_total:
            raise ConfigError(f"a budget of {n_total} step(s) cannot be split into two-step's two steps")
        return (n_total - n2, 0) if cfg.distill.step == "1" else (n2, n_total - n2)
    if cfg.ti.mode == "off":
        return n_total, 0
    n1 = cfg.ti.steps
    if n1 >= n_total:
        raise ConfigError(f"--ti.steps {n1} leaves no steps for TI step 2 within the budget of {n_total} steps")
    return (n1, 0) if cfg.ti.step == 1 else (n_total - n1, n1)


def teacher_tensors(cfg: RunConfig) -> frozenset[str]:
    """What the teacher must return for a run: the enabled losses' tensors and, in TI step 1, those its schedule hands
    to the student."""
    keep = required_tensors(cfg.loss)
    if cfg.ti.mode == "off" or cfg.ti.step != 1:
        return keep
    modes = [cfg.ti.mode] if cfg.ti.mode in TI_TENSOR else list(TI_TENSOR)
    return keep | {TI_TENSOR[m] for m in modes}


def kd_forward(student: nn.Module, teacher: BertForGlue, b: Batch, cfg: RunConfig, ti_mode: str | None = None,
               layer_map: list[int] | None = None, cache: TeacherCache | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One KD-QAT forward: teacher (no grad) and student on the same batch -> (total loss, loss terms).

    ti_mode ("map", "context", "output" or None): Teacher Intervention of this step; the teacher then also
    keeps the tensor it hands to the student. cache: the teacher's tensors of these examples come from it instead
    of a teacher forward (padding positions hold no teacher values; the losses know). layer_map: student layer i <-
    teacher layer layer_map[i]; default the identity. `student` may be wrapped in DDP (or be a
    distill.TrainedStudent, whose outputs come with their hidden states projected).
    """
    keep = required_tensors(cfg.loss)
    t_keep = keep | {TI_TENSOR[ti_mode]} if ti_mode else keep
    with autocast(b.input_ids.device, cfg.train.precision):
        with torch.no_grad():
            t_out = (cache.batch(b.index, b.input_ids.shape[1], t_keep, b.input_ids.device) if cache is not None else
                     teacher(b.input_ids, b.token_type_ids, b.attention_mask, keep=t_keep))
        intervene = Intervention(ti_mode, t_out) if ti_mode else None
        # the backward keeps 8-bit activations as int8 codes, not fp32; --train.compile fuses the quantizers
        with saved_activations_as_codes(), compiled_quantizers(cfg.train.compile):
            s_out = student(b.input_ids, b.token_type_ids, b.attention_mask, keep=keep, intervene=intervene)
            ctx = LossContext(b.attention_mask, b.labels, teacher.shape.num_labels == 1,
                              layer_map or identity_layer_map(teacher.shape.num_layers), cfg.loss.temperature,
                              cfg.loss.padding_invariant, teacher_padding=cache is None)
            return distill_loss(s_out, t_out, ctx, cfg.loss)


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast for precision "bf16" (matmuls in bf16; softmax, LayerNorm and the quantizers stay fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def slow_bf16_note(device: torch.device, precision: str) -> str | None:
    """A warning when bf16 would be slower than fp32: a CPU without AVX512-BF16 or AMX runs bf16 matmuls in torch's
    fallback GEMM (measured ~7× slower than fp32 on an AVX2-only EPYC)."""
    if precision != "bf16" or device.type != "cpu":
        return None
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return None
    return ("note: this CPU has no AVX512-BF16 or AMX, so bf16 matmuls use a slow fallback; "
            "--train.precision fp32 is several times faster here")


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop stops at the next step boundary, after a checkpoint. A second
    Ctrl-C stops at once."""

    def __init__(self):
        self.requested, self._old = False, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. some test runners)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step, writing a checkpoint first")

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class Loop:
    """What the KD-QAT loop works with, built once by `prepare` (rank 0 alone holds `run`, the run folder writer)."""
    cfg: RunConfig
    dist: distributed.Dist
    path: Path
    run: RunDir | None
    data: TaskData
    tokenizer: object
    teacher: BertForGlue
    student: BertForGlue
    model: nn.Module                  # the student, wrapped in DDP when there are several processes
    opt: torch.optim.Optimizer
    batches: Iterator
    total: int                        # optimizer steps of this run
    before: int                       # steps of an earlier run this one continues (TI step 2: N1)
    start: int                        # first step (a resumed run starts after its checkpoint)
    teacher_metrics: dict
    phase: distill.Phase              # which parameters train, with which loss weights (mix, or a two-step step)
    layer_map: list[int]              # student layer i <- teacher layer layer_map[i]
    projections: distill.Projections  # training-only; in checkpoint.pt, never in the saved student
    cache: TeacherCache | None = None  # the teacher's tensors, computed once (None: the live teacher every step)
    best: dict | None = None
    last_metrics: dict | None = None
    skipped: int = 0
    train_s: float = 0.0              # time in training steps since the last log line (not eval, not checkpoints)
    t0: float = field(default_factory=time.time)  # when this process started the run
    wall_before: float | None = 0.0   # wall seconds of the earlier processes a resumed run continues (None: unknown)
    terms: list[str] = field(default_factory=list)

    def wall_s(self) -> float | None:
        """The run's wall time so far, over every process that worked on it (a run resumed in a later session
        included); None when a checkpoint from before this record was resumed."""
        return None if self.wall_before is None else self.wall_before + time.time() - self.t0

    @property
    def ti_step1(self) -> bool:
        return self.cfg.ti.mode != "off" and self.cfg.ti.step == 1

    @property
    def step1(self) -> bool:
        """A first step whose final student the next step continues (TI step 1, two-step step 1)."""
        return self.ti_step1 or (self.cfg.distill.schedule == "two_step" and self.cfg.distill.step == "1")

    @property
    def phase_cfg(self) -> RunConfig:
        """The config the loss sees: the run's, with this phase's loss weights."""
        return dataclasses.replace(self.cfg, loss=self.phase.loss)


def train(cfg: RunConfig, command: list[str] | None = None) -> dict:
    """KD-QAT: FP teacher (eval, no grad) + fake-quantized student (train) -> distill_loss -> optimizer.

    Dev evaluation every eval_every steps and at the last step; the best student is kept; a checkpoint
    (model, optimizer, step, RNG, best) at every evaluation lets a rerun of the same command resume
    exactly. The run folder is locked while this process trains in it. Under torchrun each rank takes its
    share of every global batch (DDP); rank 0 logs, evaluates and saves. Returns result.json (on rank 0).
    """
    command = command or [sys.executable, *sys.argv]
    cfg = resolve(cfg)
    steps = distill.steps_of(cfg)
    # one process group for the whole command: a gloo group destroyed and made again in the same processes reuses
    # its store keys and can hang at the next collective
    dist = distributed.setup(cfg.train.device)
    try:
        if len(steps) > 1:  # two_step, both steps: one run folder each, step 2 continuing step 1
            _train_step1_once(steps[0], dist, command)
        return train_run(steps[-1], dist, command)
    finally:
        dist.close()


def train_run(cfg: RunConfig, dist: distributed.Dist, command: list[str]) -> dict:
    """One run folder: prepare, the step loop (train step, evaluate and keep best, checkpoint or stop), finish."""
    t0 = time.time()
    lock = FolderLock(run_folder(cfg)) if dist.is_main else None
    loop = None
    try:
        if lock is not None:
            check_writable(lock.folder)
            lock.acquire()
        loop = prepare(cfg, dist, command, t0)
        with StopRequest() as stop:
            for step in tqdm(range(loop.start, loop.total), initial=loop.start, total=loop.total, dynamic_ncols=True,
                             desc=f"kd-qat {loop.data.task.name}", disable=not dist.is_main):
                terms, lr, grad_norm, stop_now = train_step(loop, step, stop)
                log_step(loop, step + 1, terms, lr, grad_norm)
                if (step + 1) % cfg.train.eval_every == 0 or step + 1 == loop.total:
                    evaluate_and_keep_best(loop, step + 1)
                checkpoint_or_stop(loop, step + 1, stop_now)
        result = finish(loop)
        dist.barrier()  # no rank moves on before rank 0 has written result.json (two-step step 2 reads it)
        return result
    finally:  # every exit: logs closed, lock released
        if loop is not None and loop.run is not None:
            loop.run.close()
        if lock is not None:
            lock.release()


def _train_step1_once(cfg: RunConfig, dist: distributed.Dist, command: list[str]) -> dict | None:
    """Step 1 of a two-step command; when rerun after step 2 was interrupted, a finished step 1 of the same config is
    kept (not refused as a finished run), so rerunning the command resumes where it stopped."""
    path = run_folder(cfg)
    if (path / "result.json").is_file() and not cfg.train.overwrite:
        try:
            saved = RunConfig.from_dict(json.loads((path / "run_config.json").read_text()))
        except (OSError, ValueError, TypeError, ConfigError):
            saved = None
        if saved is not None and not incompatible_fields(saved, cfg):
            print(f"two-step step 1 already finished in {path}; continuing with step 2")
            return json.loads((path / "result.json").read_text())
    return train_run(cfg, dist, command)  # (another config in that folder: refused there as a finished run)


def prepare(cfg: RunConfig, dist: distributed.Dist, command: list[str], t0: float) -> Loop:
    """Teacher (fine-tuned first if missing), student, optimizer, batch stream; a resumed run's saved state."""
    device = dist.device
    if device.type == "cpu":
        distributed.keep_freed_memory()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    path = run_folder(cfg)
    state = load_checkpoint(path) if check_run_folder(path, cfg) else None
    init_dir = student_init_folder(cfg)
    if not has_checkpoint(cfg.model.teacher_dir):
        if dist.world > 1:
            raise RunError(f"no teacher in {cfg.model.teacher_dir}: make it first with one process (the same command without torchrun)")
        ensure_teacher(cfg, command)
    phase = distill.phase_of(cfg)
    student, layer_map, projections = make_student(cfg, init_dir, phase)  # shapes and map checked before any work
    tokenizer = load_tokenizer(cfg.model.teacher_dir)
    data = load_task_data(cfg.data, tokenizer)
    teacher = load_bert(cfg.model.teacher_dir, num_labels=data.task.num_labels).to(device).eval().requires_grad_(False)
    student = quantize_model(student, cfg.quant).to(device).train()
    if cfg.quant.act_learned_clip and (init_dir / LEARNED_CLIPS).is_file():  # TI step 2 continues step 1's clips
        load_learned_clips(student, json.loads((init_dir / LEARNED_CLIPS).read_text()), f"{init_dir}: ")
    trained = distill.TrainedStudent(student, projections.to(device))
    total, before = step_budget(cfg, len(data.train))
    start = state["step"] if state else 0
    cache = teacher_cache.open_or_build(cfg, teacher, data.task, data.train,
                                        teacher_tensors(dataclasses.replace(cfg, loss=phase.loss)), dist,
                                        lambda: autocast(device, cfg.train.precision))

    run = RunDir(path, cfg, command, resume_step=start if state else None) if dist.is_main else None
    teacher_metrics = state["teacher"] if state else {}
    if state:
        student.load_state_dict(state["model"])
        projections.load_state_dict(state.get("projections", {}))
    elif dist.is_main:
        t = time.time()
        teacher_metrics = evaluate(teacher, data, cfg, device)
        speed = sum(len(enc.labels) for enc in data.dev.values()) / max(time.time() - t, 1e-9)
        run.write("teacher_eval.json", {"teacher_dir": str(cfg.model.teacher_dir), "dev": teacher_metrics})
        run.log(0, {f"teacher/{k}": v for k, v in teacher_metrics.items()} | {"teacher_examples_per_s": speed})
        print(_log_line(0, {f"teacher {k}": v for k, v in teacher_metrics.items()}))
    if dist.is_main and (note := slow_bf16_note(device, cfg.train.precision)):
        print(note)
    if dist.is_main:
        print(f"run folder: {path}  ({total} steps{f', resuming after step {start}' if state else ''}, "
              f"device {device}, {dist.world} process(es))")

    torch.manual_seed(cfg.train.seed + dist.rank)  # dropout masks differ across ranks
    model = trained
    ti_step1 = cfg.ti.mode != "off" and cfg.ti.step == 1
    if dist.world > 1:  # parameters unused without a logits term (the head under attention-only losses) or under TI
        unused = not set(distill.LOGIT_TERMS) & set(active_terms(phase.loss)) or ti_step1
        model = nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=unused)
    opt = make_optimizer(trained, cfg.optim)  # the phase's trainable parameters and the projections
    if state:
        opt.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"][dist.rank], device)
    # TI step 2 continues the batch stream where step 1 stopped: together they see the baseline's batches
    batches = train_batches(data.train, cfg.train.batch_size, cfg.train.seed, start_step=before + start, rank=dist.rank,
                            world=dist.world, micro_batch_size=cfg.train.micro_batch_size, **train_padding(cfg.data))
    return Loop(cfg, dist, path, run, data, tokenizer, teacher, student, model, opt, batches, total, before, start,
                teacher_metrics, phase, layer_map, projections, cache, best=state["best"] if state else None,
                terms=["total", *active_terms(phase.loss)], t0=t0,
                wall_before=state.get("wall_s") if state else 0.0)


def make_student(cfg: RunConfig, init_dir: Path, phase: distill.Phase) -> tuple[BertForGlue, list[int], distill.Projections]:
    """The FP student of --distill.* shape (docs/algorithms.md §7), its layer map to the teacher and its projections;
    parameters outside the phase are frozen. Two-step step 2 continues its step-1 student as it is."""
    t_shape = read_shape(cfg.model.teacher_dir)
    source = load_bert(init_dir, num_labels=t_shape.num_labels)
    continues = cfg.distill.schedule == "two_step" and cfg.distill.step == "2"
    student = source if continues else distill.build_student(cfg.distill, source, cfg.train.seed)
    s_shape = student.shape
    distill.check_shapes(s_shape, t_shape, phase.loss)
    layer_map = distill.layer_map(cfg.distill.layer_map, t_shape.num_layers, s_shape.num_layers)
    projected = any(n in distill.PROJECTED_TERMS for n in active_terms(phase.loss))
    projections = distill.Projections(s_shape.hidden_size, t_shape.hidden_size if projected else s_shape.hidden_size,
                                      s_shape.num_layers, s_shape.initializer_range, cfg.train.seed)
    for name, p in student.named_parameters():
        p.requires_grad_(phase.trains(name))
    return student, layer_map, projections


def train_step(loop: Loop, step: int, stop: StopRequest) -> tuple[torch.Tensor, float, torch.Tensor, bool]:
    """One optimizer step over this rank's micro-batches -> (batch-mean loss terms, lr, grad norm, stop requested)."""
    t = time.time()
    cfg, dist, device = loop.cfg, loop.dist, loop.dist.device
    loop.opt.zero_grad(set_to_none=True)
    logged = torch.zeros(len(loop.terms), device=device)  # this rank's share of the batch-mean loss terms
    micro = next(loop.batches)
    ti_mode = mode_at(cfg.ti.mode, step, loop.total, cfg.train.seed) if loop.ti_step1 else None
    for k, (batch, share) in enumerate(micro):
        b = batch.to(device)
        no_sync = loop.model.no_sync() if dist.world > 1 and k < len(micro) - 1 else contextlib.nullcontext()
        with no_sync:
            loss, terms = kd_forward(loop.model, loop.teacher, b, loop.phase_cfg, ti_mode, loop.layer_map, loop.cache)
            # share·world: DDP averages gradients over ranks, so the sum over ranks and micro-batches
            # is exactly the gradient of the global batch mean
            (loss * share * dist.world).backward()
        logged += share * torch.stack([loss, *terms.values()]).detach()
    lr = lr_at(step, loop.total, cfg.optim.lr, cfg.optim.warmup_ratio)
    for g in loop.opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in loop.model.parameters() if p.grad is not None])
    flags = dist.all_reduce_sum(torch.stack([(torch.isfinite(logged).all() & torch.isfinite(grad_norm)).float(),
                                             torch.tensor(float(stop.requested), device=device)]))
    if flags[0].item() == dist.world:
        loop.opt.step()
    elif cfg.train.on_nonfinite == "skip":
        loop.skipped += 1
    else:
        raise NonFiniteError(_dump_nonfinite(loop.path, step, loop.terms, logged, micro, loop.student, dist))
    if cfg.ti.mode != "off" and dist.is_main:  # the mode in force at every step of both TI steps
        loop.run.log(step + 1, {"ti/mode": ti_mode or "off", "ti/mode_code": MODE_CODE[ti_mode]})
    loop.train_s += time.time() - t
    return logged, lr, grad_norm, flags[1].item() > 0


def log_step(loop: Loop, done: int, logged: torch.Tensor, lr: float, grad_norm: torch.Tensor) -> None:
    """Every log_every steps and at the last: each loss term, LR, grad norm and ms per training step."""
    every = loop.cfg.train.log_every
    if done % every and done != loop.total:
        return
    loop.dist.all_reduce_sum(logged)
    if loop.dist.is_main:
        values = {f"loss/{n}": v for n, v in zip(loop.terms, logged.tolist())}
        values |= {"lr": lr, "grad_norm": grad_norm.item(), "skipped_nonfinite": loop.skipped,
                   "ms_per_step": 1000 * loop.train_s / (done % every or every)}
        loop.run.log(done, values)
    loop.train_s = 0.0


def better(new: float, best: float | None) -> bool:
    """Whether a dev score replaces the best so far: the first one always; a NaN (e.g. Pearson of constant predictions)
    never replaces a number, and any number replaces a NaN."""
    if best is None:
        return True
    if math.isnan(new):
        return False
    return math.isnan(best) or new > best


def evaluate_and_keep_best(loop: Loop, done: int) -> None:
    """Dev metrics of the student alone (no intervention); the best student so far is saved in the run folder."""
    if not loop.dist.is_main:
        return
    cfg, data, run = loop.cfg, loop.data, loop.run
    t = time.time()
    metrics = loop.last_metrics = evaluate(loop.student, data, cfg, loop.dist.device)
    speed = sum(len(enc.labels) for enc in data.dev.values()) / max(time.time() - t, 1e-9)
    select = data.task.select_metric
    nan = [k for k, v in metrics.items() if math.isnan(v)]
    run.log(done, {f"eval/{k}": v for k, v in metrics.items()} | ({"eval/nan_metrics": nan} if nan else {})
            | {"eval_examples_per_s": speed})
    tqdm.write(_log_line(done, metrics) + (f" | NaN {', '.join(nan)} (constant predictions?)" if nan else ""))
    extra = _student_extra_config(cfg, data.task)
    if better(metrics[select], loop.best["metrics"][select] if loop.best else None):
        loop.best = {"step": done, "metrics": metrics, "select_metric": select}
        run.save_model(loop.student, loop.tokenizer, extra)
        run.write("best.json", loop.best)
    if loop.step1:  # step 2 starts from the latest student, not the best
        run.save_model(loop.student, loop.tokenizer, extra, STEP1_STUDENT)
        run.write(f"{STEP1_STUDENT}.json", {"step": done, "metrics": metrics})


def checkpoint_or_stop(loop: Loop, done: int, stop_now: bool) -> None:
    """A checkpoint at every evaluation and on a stop request (not after the last step); then stop if asked."""
    if done == loop.total:
        return
    if done % loop.cfg.train.eval_every == 0 or stop_now:
        rng = loop.dist.gather(_rng_state(loop.dist.device))
        if loop.dist.is_main:
            save_checkpoint(loop.path, {"step": done, "model": loop.student.state_dict(), "optimizer": loop.opt.state_dict(),
                                        "rng": rng, "best": loop.best, "teacher": loop.teacher_metrics,
                                        "projections": loop.projections.state_dict(), "wall_s": loop.wall_s()})
    if stop_now:
        raise RunInterrupted(f"stopped after step {done}; checkpoint saved in {loop.path} "
                             "(run the same command again to resume)")


def finish(loop: Loop) -> dict | None:
    """result.json (its presence marks the run finished); the checkpoint is removed unless kept."""
    if not loop.dist.is_main:
        return None
    cfg, best, select = loop.cfg, loop.best, loop.data.task.select_metric
    wall = loop.wall_s()  # every session's share of a resumed run; None: resumed from a checkpoint without that record
    result = {"run": str(loop.path), "task": loop.data.task.name, "steps": loop.total, "teacher": loop.teacher_metrics,
              "best": best, "final": loop.last_metrics, "skipped_nonfinite": loop.skipped,
              "wall_s": None if wall is None else round(wall, 1)}
    if cfg.ti.mode != "off":  # step numbers in the logs are this run's own; global step = steps_before + step
        result["ti"] = {"mode": cfg.ti.mode, "step": cfg.ti.step, "steps_before": loop.before,
                        **({"step1_run": str(step1_folder(cfg))} if cfg.ti.step == 2 else {})}
    if cfg.distill.general:
        result["distill"] = {"phase": loop.phase.name, "layer_map": loop.layer_map, "steps_before": loop.before,
                             **({"step1_run": str(distill.step1_folder(cfg))} if loop.phase.name == "head" else {})}
    result["student"] = {"layers": loop.student.shape.num_layers, "hidden": loop.student.shape.hidden_size,
                         "parameters": sum(p.numel() for p in loop.student.parameters()),
                         "file_bytes": (loop.path / "model.safetensors").stat().st_size}
    loop.run.write("result.json", result)
    if not cfg.train.keep_checkpoint:
        (loop.path / CHECKPOINT).unlink(missing_ok=True)
    print(f"best dev {select} {best['metrics'][select]:.4f} at step {best['step']} "
          f"(teacher {loop.teacher_metrics[select]:.4f}); student saved in {loop.path}")
    return result


def _dump_nonfinite(path: Path, step: int, names: list[str], logged: torch.Tensor, micro, student: BertForGlue,
                    dist: distributed.Dist) -> str:
    """Save the batch, the loss terms and the weights before the bad step; return the message for the user."""
    terms = dict(zip(names, logged.tolist()))
    where = path / f"nonfinite_step{step + 1}.pt"
    if dist.is_main:
        torch.save({"step": step + 1, "terms": terms, "batches": [dataclasses.asdict(b) for b, _ in micro],
                    "model": student.state_dict()}, where)
    return (f"non-finite loss or gradient at step {step + 1} (loss terms {terms}); batch and weights saved to {where}; "
            "--train.on_nonfinite skip skips such batches")


def evaluate_run(path: str | Path, glue_dir: str | None = None) -> dict[str, float]:
    """Re-evaluate a saved student on its task's dev set (same quantizers, same padding)."""
    model, cfg = load_run(path)
    if glue_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, glue_dir=glue_dir))
    device = pick_device(cfg.train.device)
    data = load_task_data(cfg.data, load_tokenizer(path), with_train=False)
    return evaluate(model.to(device), data, cfg, device)
