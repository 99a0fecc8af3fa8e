"""Training: teacher fine-tuning (FP, task loss) and the KD-QAT loop (SPEC §5), each one readable function.

    cfg = resolve(parse_config(["--data.task", "rte"]))
    result = train(cfg)          # -> output/rte/<run name>/ with the best student, best.json, logs
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import utils_glue
from transformer.config import OptimConfig, RunConfig, resolve, run_name
from transformer.data import TaskData, eval_batches, load_task_data, steps_per_epoch, train_batches
from transformer.losses import LossContext, distill_loss, identity_layer_map, label_loss, required_tensors
from transformer.model import BertForGlue, CheckpointError, load_bert, save_bert
from transformer.quant import quantize_model

REPO = Path(__file__).resolve().parents[1]


class RunError(RuntimeError):
    """A run folder or training problem the user must act on; the message is one line."""


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule

def _no_decay(name: str) -> bool:
    return name.endswith(".bias") or "LayerNorm" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if not _no_decay(n)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if _no_decay(n)], "weight_decay": 0.0}]


class BertAdam(torch.optim.Optimizer):
    """The published optimizer: Adam with no bias correction, gradient-norm clip per parameter tensor,
    decoupled weight decay (added to the update, scaled by the LR). The LR is set per step by the loop."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
                 max_grad_norm: float = 1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["max_grad_norm"] > 0:  # per tensor, as torch's clip_grad_norm_(p, max) would
                    g = g * (group["max_grad_norm"] / (g.norm() + 1e-6)).clamp(max=1.0)
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                update = m / (v.sqrt() + group["eps"])
                if group["weight_decay"] > 0:
                    update = update + group["weight_decay"] * p
                p.add_(update, alpha=-group["lr"])


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
    groups = param_groups(model, cfg.weight_decay)
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

def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--train.device cuda but no CUDA device is visible (check CUDA_VISIBLE_DEVICES)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    pad_to = cfg.data.max_seq_len if cfg.data.pad_to_max else None
    for i, (split, enc) in enumerate(data.dev.items()):
        preds = predict(model, enc, cfg.train.eval_batch_size, pad_to, device)
        m = utils_glue.compute_metrics(data.task, preds, enc.labels)
        metrics.update(m if i == 0 else {f"mm_{k}": v for k, v in m.items()})
    return metrics


# ---------------------------------------------------------------------------------------------
# Run folder: config, command, logs, best checkpoint

def _git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # readers never see half a file


def run_folder(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_root) / cfg.data.task / (cfg.train.run_name or run_name(cfg))


def check_run_folder(path: Path, overwrite: bool) -> None:
    """Refuse to clobber a finished run unless asked; an unfinished one is started again."""
    if (path / "result.json").exists() and not overwrite:
        raise RunError(f"{path} already holds a finished run (pass --train.overwrite to replace it)")
    probe = path.parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise RunError(f"cannot write under {probe}")


class RunDir:
    """Everything a run writes: run_config.json, command.txt, git_sha.txt, metrics.jsonl, tb/, best.json, result.json,
    and the student (HF format: config.json, model.safetensors, tokenizer files)."""

    def __init__(self, path: Path, cfg: RunConfig, command: list[str]):
        if path.exists():
            shutil.rmtree(path)  # an unfinished or overwritten run: start clean so no stale file survives
        path.mkdir(parents=True)
        self.path = path
        _write_json(path / "run_config.json", cfg.to_dict())
        (path / "command.txt").write_text(" ".join(command) + "\n")
        (path / "git_sha.txt").write_text(_git_sha() + "\n")
        self._jsonl = open(path / "metrics.jsonl", "a")
        self._tb = None
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(path / "tb"))

    def log(self, step: int, values: dict[str, float]) -> None:
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def save_model(self, model: BertForGlue, tokenizer, extra_config: dict) -> None:
        tmp = self.path / ".saving"
        shutil.rmtree(tmp, ignore_errors=True)
        save_bert(model, tmp, extra_config)
        tokenizer.save_pretrained(str(tmp))
        for f in tmp.iterdir():
            os.replace(f, self.path / f.name)
        tmp.rmdir()

    def write(self, name: str, obj) -> None:
        _write_json(self.path / name, obj)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None


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
    total = math.ceil(t.epochs * steps_per_epoch(len(data.train), cfg.train.batch_size))
    if cfg.train.max_steps:  # smoke runs cap the teacher too
        total = min(total, cfg.train.max_steps)
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log = open(tmp / "finetune_log.jsonl", "w")
    pad_to = cfg.data.max_seq_len if cfg.data.pad_to_max else None
    batches = train_batches(data.train, cfg.train.batch_size, cfg.train.seed, pad_to)
    ctx_args = dict(regression=data.task.is_regression, layer_map=[])
    start = time.time()
    for step in tqdm(range(total), desc=f"teacher {data.task.name}", dynamic_ncols=True):
        b = next(batches).to(device)
        out = model(b.input_ids, b.token_type_ids, b.attention_mask)
        loss = label_loss(out, None, LossContext(b.attention_mask, b.labels, **ctx_args))
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
    _write_json(tmp / "finetune.json", {"task": data.task.name, "base_model": str(cfg.model.base_dir), "steps": total,
                                        "dev": metrics, "wall_s": round(time.time() - start, 1),
                                        "teacher": dataclasses.asdict(t), "command": command, "git_sha": _git_sha()})
    if target.exists():  # empty (checked above)
        target.rmdir()
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    print(f"teacher saved to {target} (dev {metrics})")
    return target


# ---------------------------------------------------------------------------------------------
# KD-QAT

def load_student_init(cfg: RunConfig, num_labels: int) -> BertForGlue:
    """Student = a copy of the teacher's weights (SPEC §1), or model.student_init_dir if given."""
    return load_bert(cfg.model.student_init_dir or cfg.model.teacher_dir, num_labels=num_labels)


def train(cfg: RunConfig, command: list[str] | None = None) -> dict:
    """KD-QAT: FP teacher (eval, no grad) + fake-quantized student (train) -> distill_loss -> optimizer.
    Dev evaluation every eval_every steps and at the last step; the best student is kept. Returns result.json."""
    command = command or [sys.executable, *sys.argv]
    cfg = resolve(cfg)
    device = pick_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    path = run_folder(cfg)
    check_run_folder(path, cfg.train.overwrite)
    if not has_checkpoint(cfg.model.teacher_dir):
        print(f"no teacher in {cfg.model.teacher_dir}: fine-tuning one from {cfg.model.base_dir}")
        finetune_teacher(cfg, command)
    tokenizer = load_tokenizer(cfg.model.teacher_dir)
    data = load_task_data(cfg.data, tokenizer)
    teacher = load_bert(cfg.model.teacher_dir, num_labels=data.task.num_labels).to(device).eval().requires_grad_(False)
    student = quantize_model(load_student_init(cfg, data.task.num_labels), cfg.quant).to(device).train()
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch(len(data.train), cfg.train.batch_size))

    run = RunDir(path, cfg, command)
    print(f"run folder: {path}  ({total} steps, device {device})")
    teacher_metrics = evaluate(teacher, data, cfg, device)
    run.write("teacher_eval.json", {"teacher_dir": str(cfg.model.teacher_dir), "dev": teacher_metrics})
    run.log(0, {f"teacher/{k}": v for k, v in teacher_metrics.items()})
    print(_log_line(0, {f"teacher {k}": v for k, v in teacher_metrics.items()}))

    torch.manual_seed(cfg.train.seed)
    opt = make_optimizer(student, cfg.optim)
    keep = required_tensors(cfg.loss)
    layer_map = identity_layer_map(student.shape.num_layers)
    pad_to = cfg.data.max_seq_len if cfg.data.pad_to_max else None
    batches = train_batches(data.train, cfg.train.batch_size, cfg.train.seed, pad_to)
    select = data.task.select_metric
    best: dict | None = None
    start = last = time.time()
    bar = tqdm(range(total), desc=f"kd-qat {data.task.name}", dynamic_ncols=True)
    for step in bar:
        b = next(batches).to(device)
        with torch.no_grad():
            t_out = teacher(b.input_ids, b.token_type_ids, b.attention_mask, keep=keep)
        s_out = student(b.input_ids, b.token_type_ids, b.attention_mask, keep=keep)
        ctx = LossContext(b.attention_mask, b.labels, data.task.is_regression, layer_map,
                          cfg.loss.temperature, cfg.loss.padding_invariant)
        loss, terms = distill_loss(s_out, t_out, ctx, cfg.loss)
        lr = lr_at(step, total, cfg.optim.lr, cfg.optim.warmup_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        if (step + 1) % cfg.train.log_every == 0 or step + 1 == total:
            values = {"loss/total": loss.item(), **{f"loss/{k}": v.item() for k, v in terms.items()}, "lr": lr}
            if not math.isfinite(values["loss/total"]):
                raise RunError(f"non-finite loss at step {step + 1}: {values}")
            now = time.time()
            values["ms_per_step"] = 1000 * (now - last) / ((step + 1) % cfg.train.log_every or cfg.train.log_every)
            last = now
            run.log(step + 1, values)
            bar.set_postfix(loss=f"{values['loss/total']:.4f}")
        if (step + 1) % cfg.train.eval_every == 0 or step + 1 == total:
            metrics = evaluate(student, data, cfg, device)
            run.log(step + 1, {f"eval/{k}": v for k, v in metrics.items()})
            tqdm.write(_log_line(step + 1, metrics))
            if best is None or metrics[select] > best["metrics"][select]:
                best = {"step": step + 1, "metrics": metrics, "select_metric": select}
                run.save_model(student, tokenizer, _student_extra_config(cfg, data.task))
                run.write("best.json", best)

    result = {"run": str(path), "task": data.task.name, "steps": total, "teacher": teacher_metrics, "best": best,
              "final": metrics, "wall_s": round(time.time() - start, 1)}
    run.write("result.json", result)
    run.close()
    print(f"best dev {select} {best['metrics'][select]:.4f} at step {best['step']} (teacher {teacher_metrics[select]:.4f}); "
          f"student saved in {path}")
    return result


def load_run(path: str | Path) -> tuple[BertForGlue, RunConfig]:
    """A saved student with its quantizers, as trained (latent FP weights + run_config.json)."""
    path = Path(path)
    if not (path / "run_config.json").is_file():
        raise RunError(f"{path}: no run_config.json (not a run folder of quant_task_glue.py)")
    cfg = RunConfig.from_dict(json.loads((path / "run_config.json").read_text()))
    model = quantize_model(load_bert(path), cfg.quant)
    return model, cfg


def evaluate_run(path: str | Path, glue_dir: str | None = None) -> dict[str, float]:
    """Re-evaluate a saved student on its task's dev set (same quantizers, same padding)."""
    model, cfg = load_run(path)
    if glue_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, glue_dir=glue_dir))
    device = pick_device(cfg.train.device)
    data = load_task_data(cfg.data, load_tokenizer(path), with_train=False)
    return evaluate(model.to(device), data, cfg, device)
