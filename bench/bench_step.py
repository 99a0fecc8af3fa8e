"""Training-step benchmark: Hugging Face FP fine-tuning (the floor), our FP fine-tuning, the KD-QAT recipes and a
Teacher Intervention step-1 step at one batch shape; then training epochs on real GLUE data under each batching
(--data.batching): the published fixed 128-token padding, the plain shuffle padded per batch, and length buckets
(our default).

    python bench/bench_step.py --threads 1 --out results/bench/cpu_minilm_fp32.json          # CPU: MiniLM, batch 32 × 128
    python bench/bench_step.py --threads 1 --bf16 --tasks --out results/bench/cpu_minilm_bf16.json   # bf16 rows (CPU)
    python bench/bench_step.py --device cuda --bf16 --out results/bench/gpu.json              # + random BERT-base, MFU
    python bench/bench_step.py --quick --model CKPT --out /tmp/bench.json                      # smoke run (tests/test_bench.py)

Every step is the real training code: models from `load_bert` (+ `quantize_model`), the KD forward of the training
loop (`transformer.train.kd_forward`), `make_optimizer` (BertAdam for KD-QAT; AdamW as in our teacher fine-tune for the
FP rows, HF's included), and each recipe is `parse_config(<its launcher's flags>)`. Step times are interleaved over
configurations (rotating order) and repeated; the table gives medians, of wall time and (CPU) of process CPU time.
Peak memory is measured for each configuration in a fresh subprocess (a high-water mark never goes down): on CPU the
peak RSS (VmHWM) above the process's RSS after its imports, so weights, optimizer state, activations and allocator
slack (the absolute peak is in the JSON); on CUDA torch.cuda.max_memory_allocated. --allocator picks the CPU allocator
(default: the training loop's, `transformer.distributed.keep_freed_memory`); minor page faults per step are reported.
--bf16: every row under bf16 autocast (KD rows through --train.precision bf16, as a training run would).
Timings taken while other jobs use the CPU are unreliable: the header prints the load average; use --threads.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from transformers import BertForSequenceClassification  # noqa: E402  (imported by every process: equal RSS baselines)
from transformers.utils import logging as hf_logging  # noqa: E402

import utils_glue  # noqa: E402

from transformer.config import OptimConfig, RunConfig, default_base_model, parse_config, resolve  # noqa: E402
from transformer.data import Batch, load_task_data, steps_per_epoch, train_batches, train_padding  # noqa: E402
from transformer.distributed import keep_freed_memory  # noqa: E402
from transformer.losses import LossContext, label_loss  # noqa: E402
from transformer.model import BertForGlue, BertShape, load_bert, read_shape, save_bert  # noqa: E402
from transformer.quant import quantize_model  # noqa: E402
from transformer.rundir import git_sha  # noqa: E402
from transformer.teacher_cache import CacheKey, TeacherCache  # noqa: E402
from transformer.train import autocast, kd_forward, load_tokenizer, make_optimizer, teacher_tensors  # noqa: E402

# name -> (launcher, its flags). tests/test_bench.py checks that each launcher sets exactly these.
# kd_unified: run_kd_qat_exploration.sh TASK base 1 0.5 (γ does not change the work done).
RECIPES = {
    "kd_baseline": ("run_kd_qat_baseline.sh", []),
    "kd_map": ("run_kd_qat_map.sh", ["--loss.attn_score_mse_weight", "0", "--loss.attn_prob_kl_weight", "1"]),
    "kd_output": ("run_kd_qat_output.sh", ["--loss.attn_score_mse_weight", "0", "--loss.attn_output_mse_weight", "1"]),
    "kd_unified": ("run_kd_qat_exploration.sh", ["--loss.attn_score_mse_weight", "0", "--loss.attn_prob_kl_weight", "1",
                                                 "--loss.attn_output_mse_weight", "0.5"]),
    "ti_step1": ("run_TI_step_1.sh", ["--loss.attn_output_mse_weight", "1", "--ti.mode", "gradual", "--ti.step", "1"]),
}
# TI step 1 under the default schedule (gradual) runs MI for its last 2/3 of steps; --ti-modes adds CI / OI rows.
FP_ROWS = ("hf_fp", "fp")
# The same recipes with the teacher's tensors read from a teacher cache (--teacher.cache) instead of a teacher forward.
CACHED = ("kd_baseline", "kd_map", "ti_step1_map")
BERT_BASE = BertShape(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
# Dense peak TFLOP/s (bf16, tf32, fp32) for MFU; --peak-tflops overrides. Matched on torch.cuda.get_device_name().
PEAK_TFLOPS = [("H100 PCIe", (756.0, 378.0, 51.2)), ("H100", (989.4, 494.7, 66.9)), ("H200", (989.4, 494.7, 66.9)),
               ("A100", (312.0, 156.0, 19.5))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the base model, MiniLM)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds over all configurations (medians reported)")
    p.add_argument("--steps", type=int, default=2, help="steps per configuration and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="JSON output (default: results/bench/step_<device>.json)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 rounds of 1 step, 1 warm-up step, 64-example epochs, BERT-base rows at 2 × 16")
    p.add_argument("--configs", nargs="+", default=None, help="only these rows (hf_fp fp kd_baseline kd_map ... ti_step1_map)")
    p.add_argument("--ti-modes", nargs="+", default=["map"], choices=["map", "context", "output"],
                   help="TI step-1 rows, one per intervention mode")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for forward and loss (GPUs; CPUs with AVX512-BF16/AMX)")
    p.add_argument("--gpu-batches", nargs="+", type=int, default=[32, 256], help="batches of the random BERT-base rows (CUDA only)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: table by GPU name)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory subprocesses")
    p.add_argument("--allocator", choices=["tuned", "glibc", "jemalloc"], default="tuned",
                   help="CPU memory allocator: tuned = glibc as the training loop sets it (keep_freed_memory: mmap threshold "
                        "32 MiB, no trimming); glibc = glibc's adaptive defaults; jemalloc (preloaded, no decay)")
    p.add_argument("--tasks", nargs="*", default=["rte", "sst-2"], help="real-data epoch tasks (none: skip epochs)")
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", str(REPO.parent / "shared" / "data" / "glue")))
    p.add_argument("--epoch-examples", type=int, default=None,
                   help="time epochs over the first N training examples (default: the whole set; --quick: 64)")
    p.add_argument("--epoch-repeats", type=int, default=1, help="interleaved rounds of the epoch variants")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.warmup = 2, 1, 1
        args.epoch_examples = args.epoch_examples or 64
    return args


# ---------------------------------------------------------------------------------------------
# Shapes, batches, configurations

@dataclass
class Shape:
    label: str     # "minilm", "bert-base-random", ...
    ckpt: str      # checkpoint folder every model of this shape loads from
    batch: int
    seq: int


def synthetic_batch(shape: BertShape, batch: int, seq: int, device: torch.device) -> Batch:
    """Sentence pairs filling all `seq` tokens (no padding): random ids, segment 0 then 1, random binary labels."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, shape.vocab_size // 2), shape.vocab_size, (batch, seq), generator=g)
    types = torch.zeros(batch, seq, dtype=torch.long)
    types[:, seq // 2:] = 1
    return Batch(ids, types, torch.ones(batch, seq, dtype=torch.bool), torch.randint(0, 2, (batch,), generator=g)).to(device)


def random_checkpoint(shape: BertShape, folder: Path) -> str:
    """A BERT checkpoint with HF's init (N(0, 0.02) weights, zero biases), standing in for a real one of that shape."""
    torch.manual_seed(0)
    model = BertForGlue(shape)
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.zeros_(m.bias)
    save_bert(model, folder)
    return str(folder)


def row_names(args: argparse.Namespace) -> list[str]:
    names = [*FP_ROWS, *(n for n in RECIPES if n != "ti_step1"), *(f"ti_step1_{m}" for m in args.ti_modes)]
    names += [f"{n}_cached" for n in CACHED if n in names]
    if "kd_map" in names and shutil.which("g++"):  # torch.compile of the quantizers needs a C++ compiler on CPU
        names.append("kd_map_cached_compiled")
    if args.configs:
        unknown = set(args.configs) - set(names)
        if unknown:
            raise SystemExit(f"unknown --configs {sorted(unknown)}; choose from {names}")
        names = [n for n in names if n in args.configs]
    return names


def recipe(name: str, task: str = "rte", extra: list[str] | None = None) -> tuple[RunConfig, str | None]:
    """(resolved config of a row's launcher flags, TI mode of its steps)."""
    key, ti_mode = ("ti_step1", name.removeprefix("ti_step1_")) if name.startswith("ti_step1_") else (name, None)
    return resolve(parse_config([*RECIPES[key][1], "--data.task", task, *(extra or [])])), ti_mode


def fp_optim() -> OptimConfig:
    """The optimizer of our teacher fine-tune (transformer.train.finetune_teacher): AdamW with the teacher LR."""
    t = RunConfig().teacher
    return OptimConfig(optimizer="adamw", lr=t.lr, warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay)


def kd_step(student: BertForGlue, teacher: BertForGlue, opt: torch.optim.Optimizer, cfg: RunConfig, b: Batch,
            ti_mode: str | None, cache: TeacherCache | None = None) -> None:
    """One KD-QAT optimizer step as the training loop takes it (one process, one micro-batch; precision from cfg)."""
    opt.zero_grad(set_to_none=True)
    loss, terms = kd_forward(student, teacher, b, cfg, ti_mode, cache=cache)
    loss.backward()
    logged = torch.stack([loss, *terms.values()]).detach()
    for g in opt.param_groups:
        g["lr"] = cfg.optim.lr
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in student.parameters() if p.grad is not None])
    if (torch.isfinite(logged).all() & torch.isfinite(grad_norm)).item():  # the loop's non-finite guard (a sync)
        opt.step()


@dataclass
class Case:
    name: str
    step: Callable[[], None]
    flops_mult: int  # forward-matmul FLOPs per step, in forwards: FP 3 (forward + backward), KD 4 (+ teacher forward)


def build_case(name: str, shape: Shape, device: torch.device, args: argparse.Namespace,
               init: BertForGlue, teacher: BertForGlue | None) -> Case:
    """One row: its models, optimizer and a closure running one step on a fixed synthetic batch."""
    b = synthetic_batch(init.shape, shape.batch, shape.seq, device)
    amp = autocast(device, "bf16" if args.bf16 else "fp32")  # the training loop's autocast, for the FP rows
    if name == "hf_fp":
        model = BertForSequenceClassification.from_pretrained(shape.ckpt, num_labels=2, dtype=torch.float32,
                                                              ignore_mismatched_sizes=True).to(device).train()
        opt = make_optimizer(model, fp_optim())
        mask = b.attention_mask.long()

        def step():
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = model(input_ids=b.input_ids, token_type_ids=b.token_type_ids, attention_mask=mask, labels=b.labels).loss
            loss.backward()
            opt.step()
        return Case(name, step, 3)
    if name == "fp":
        model = copy.deepcopy(init).to(device).train()
        opt = make_optimizer(model, fp_optim())
        ctx = LossContext(b.attention_mask, b.labels, False, [])

        def step():
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = label_loss(model(b.input_ids, b.token_type_ids, b.attention_mask), None, ctx)
            loss.backward()
            opt.step()
        return Case(name, step, 3)
    compiled = name.endswith("_compiled")
    name = name.removesuffix("_compiled")
    cached = name.endswith("_cached")
    extra = (["--train.precision", "bf16"] if args.bf16 else []) + (["--train.compile"] if compiled else [])
    cfg, ti_mode = recipe(name.removesuffix("_cached"), extra=extra)
    student = quantize_model(copy.deepcopy(init), cfg.quant).to(device).train()
    opt = make_optimizer(student, cfg.optim)
    cache = None
    if cached:  # the batch's teacher tensors, computed once, as the training loop's cache holds them (in RAM)
        enc = utils_glue.Encoded(b.input_ids.cpu().tolist(), b.token_type_ids.cpu().tolist(), b.labels.cpu().numpy())
        key = CacheKey("bench", "bench", "bench", shape.seq, None, cfg.train.precision, "fp32")
        cache = TeacherCache.build(teacher, enc, teacher_tensors(cfg), key, None, device,
                                   lambda: autocast(device, cfg.train.precision))
        b = replace(b, index=torch.arange(shape.batch))
    return Case(name + ("_compiled" if compiled else ""), lambda: kd_step(student, teacher, opt, cfg, b, ti_mode, cache),
                3 if cached else 4)


def load_init(shape: Shape) -> BertForGlue:
    torch.manual_seed(0)  # the fresh classifier head
    return load_bert(shape.ckpt, num_labels=2, new_classifier=True)


def make_teacher(init: BertForGlue, device: torch.device) -> BertForGlue:
    return copy.deepcopy(init).to(device).eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Timing (one process, interleaved) and memory (one subprocess per row)

def time_cases(cases: list[Case], device: torch.device, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU ms/step and minor page faults per step of every round for every case; round r starts at
    case r mod n, so no case always runs first. With one thread, CPU time hardly counts the time other jobs hold the core."""
    for c in cases:
        for _ in range(args.warmup):
            c.step()
    sync(device)
    ms: dict[str, dict[str, list[float]]] = {c.name: {"wall": [], "cpu": [], "faults": []} for c in cases}
    for r in range(args.repeats):
        for c in cases[r % len(cases):] + cases[:r % len(cases)]:
            sync(device)
            t0, c0, f0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(args.steps):
                c.step()
            sync(device)
            ms[c.name]["wall"].append(1000 * (time.perf_counter() - t0) / args.steps)
            ms[c.name]["cpu"].append(1000 * (time.process_time() - c0) / args.steps)
            ms[c.name]["faults"].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / args.steps)
        print(f"  round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {v['wall'][-1]:.0f}" for n, v in ms.items()) + " ms/step",
              flush=True)
    return ms


JEMALLOC = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2",
            "/usr/local/lib/libjemalloc.so.2")


def preload_jemalloc(argv: list[str]) -> None:
    """Run this script again with jemalloc preloaded, its freed pages kept mapped (no decay), unless it already is."""
    if "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = next((p for p in JEMALLOC if Path(p).exists()), None)
    if lib is None:
        raise SystemExit("--allocator jemalloc: libjemalloc.so.2 not found (Debian/Ubuntu: apt-get install libjemalloc2)")
    env = {**os.environ, "LD_PRELOAD": lib, "MALLOC_CONF": os.environ.get("MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1")}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (kB) in MiB: VmRSS now, VmHWM the peak of this process image. Unlike
    ru_maxrss, VmHWM starts afresh at exec, so a child does not inherit its parent's high-water mark."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (needs Linux)")


def memory_child(args: argparse.Namespace) -> None:
    """Internal (--memory-of ROW): build one row in this fresh process, take warm-up + steps, print one JSON line."""
    device = torch.device(args.device)
    spec = json.loads(args.memory_of)
    shape = Shape(**spec["shape"])
    base = _status_mib("VmRSS") if device.type == "cpu" else 0.0
    init = load_init(shape)
    teacher = make_teacher(init, device) if spec["row"] not in FP_ROWS else None
    case = build_case(spec["row"], shape, device, args, init, teacher)
    del init  # as in a run: an FP row holds one model, a KD row a teacher and a student
    for _ in range(args.warmup + args.steps):
        case.step()
    sync(device)
    if device.type == "cuda":
        out = {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20, "measure": "torch.cuda.max_memory_allocated"}
    else:
        peak = _status_mib("VmHWM")
        out = {"peak_mib": peak - base, "peak_rss_mib": peak, "baseline_rss_mib": base,
               "measure": "peak RSS (VmHWM) above the RSS after imports"}
    print(json.dumps(out))


def measure_memory(row: str, shape: Shape, device: torch.device, args: argparse.Namespace) -> dict:
    spec = json.dumps({"row": row, "shape": vars(shape)})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-of", spec, "--device", device.type,
           "--warmup", str(args.warmup), "--steps", str(args.steps), *(["--threads", str(args.threads)] if args.threads else []),
           *(["--bf16"] if args.bf16 else []), "--allocator", args.allocator]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"memory measurement of {row} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU

def forward_matmul_flops(s: BertShape, seq: int) -> int:
    """Matmul FLOPs of one forward per example: Q/K/V/output projections, QKᵀ and PV, FFN; pooler and classifier."""
    D, I = s.hidden_size, s.intermediate_size
    per_layer = 2 * seq * D * 3 * D + 2 * 2 * seq * seq * D + 2 * seq * D * D + 2 * 2 * seq * D * I
    return s.num_layers * per_layer + 2 * D * D + 2 * D * s.num_labels


def peak_flops(device: torch.device, args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32, fp32) in PEAK_TFLOPS:
        if key in name:
            return 1e12 * (bf16 if args.bf16 else tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32)
    return None


# ---------------------------------------------------------------------------------------------
# Real GLUE data: a training epoch of the KD-QAT map step under each batching

def run_epochs(ckpt: str, device: torch.device, args: argparse.Namespace) -> list[dict]:
    tokenizer = load_tokenizer(ckpt)
    max_pos = read_shape(ckpt).max_position
    results = []
    for task in args.tasks:
        extra = ["--data.glue_dir", args.glue_dir]
        if args.epoch_examples:
            extra += ["--data.limit_train", str(args.epoch_examples)]
        cfg, _ = recipe("kd_map", task, extra + (["--train.precision", "bf16"] if args.bf16 else []))
        if cfg.data.max_seq_len > max_pos:  # small test checkpoints
            cfg = replace(cfg, data=replace(cfg.data, max_seq_len=max_pos))
        data = load_task_data(cfg.data, tokenizer)
        full = len(utils_glue.read_examples(utils_glue.task_dir(Path(args.glue_dir), data.task), data.task, "train"))
        torch.manual_seed(0)
        init = load_bert(ckpt, num_labels=data.task.num_labels, new_classifier=True)
        teacher = make_teacher(init, device)
        # --data.batching: fixed (published), shuffle (per-batch padding of the plain shuffle), length (our default)
        variants = {v: train_padding(replace(cfg.data, batching=v)) for v in ("fixed", "shuffle", "length")}
        n_steps = steps_per_epoch(len(data.train), cfg.train.batch_size)
        real_tokens = sum(len(ids) for ids in data.train.input_ids)
        secs: dict[str, list[float]] = {v: [] for v in variants}
        tokens: dict[str, int] = {}
        print(f"epoch {task}: {len(data.train)} examples ({full} in train), {n_steps} steps of batch {cfg.train.batch_size}, "
              f"max_seq_len {cfg.data.max_seq_len}", flush=True)
        for r in range(args.epoch_repeats):
            for v, kw in variants.items():
                student = quantize_model(copy.deepcopy(init), cfg.quant).to(device).train()
                opt = make_optimizer(student, cfg.optim)
                stream = train_batches(data.train, cfg.train.batch_size, cfg.train.seed, **kw)
                padded = 0
                sync(device)
                t0 = time.perf_counter()
                for _ in range(n_steps):
                    for batch, _share in next(stream):  # one process, no micro-batches: one batch with share 1
                        padded += batch.input_ids.numel()
                        kd_step(student, teacher, opt, cfg, batch.to(device), None)
                sync(device)
                secs[v].append(time.perf_counter() - t0)
                tokens[v] = padded
                print(f"  {task} {v}: {secs[v][-1]:.1f} s", flush=True)
        for v in variants:
            sec = statistics.median(secs[v])
            results.append({"task": task, "variant": v, "examples": len(data.train), "train_examples": full, "steps": n_steps,
                            "seconds": sec, "seconds_all": secs[v], "examples_per_s": len(data.train) / sec,
                            "projected_full_epoch_s": sec * full / len(data.train), "padded_tokens": tokens[v],
                            "real_tokens": real_tokens, "padding_overhead": tokens[v] / real_tokens,
                            "speedup_vs_fixed": statistics.median(secs["fixed"]) / sec})
    return results


# ---------------------------------------------------------------------------------------------
# Report

def _num(row: dict, key: str, f: str) -> str:
    return f.format(row[key]) if row.get(key) is not None else "–"


def fmt_table(rows: list[dict], with_mfu: bool) -> str:
    """The issue's columns; then on a GPU TFLOP/s and MFU, on a CPU the process-CPU time per step (see time_cases)."""
    head = "| config | ms/step (median) | examples/s | peak mem (MiB) | ratio vs HF (time) | ratio vs HF (mem) |"
    sep = "|---|---|---|---|---|---|"
    head, sep = head + (" TFLOP/s | MFU |" if with_mfu else " CPU ms/step | CPU-time ratio vs HF | page faults/step |"), \
        sep + ("---|---|" if with_mfu else "---|---|---|")
    lines = [head, sep]
    for r in rows:
        line = (f"| {r['config']} | {r['ms_per_step']:.1f} | {r['examples_per_s']:.1f} | {_num(r, 'peak_mib', '{:.0f}')} | "
                f"{_num(r, 'time_ratio_vs_hf', '{:.2f}')} | {_num(r, 'mem_ratio_vs_hf', '{:.2f}')} |")
        if with_mfu:
            line += f" {r['tflops']:.1f} | {_num(r, 'mfu', '{:.1%}')} |"
        else:
            line += f" {r['cpu_ms_per_step']:.1f} | {_num(r, 'cpu_time_ratio_vs_hf', '{:.2f}')} | {r['page_faults_per_step']:.0f} |"
        lines.append(line)
    return "\n".join(lines)


def targets(rows: list[dict], epochs: list[dict]) -> list[dict]:
    """The issue's targets, as ratios from this run."""
    by = {r["config"]: r for r in rows}
    out = []

    def add(name, value, op, bound):
        if value is not None:
            out.append({"target": f"{name} {op} {bound}", "value": round(value, 3),
                        "met": value <= bound if op == "<=" else value >= bound})
    if "kd_map" in by:
        add("kd_map / hf_fp step time", by["kd_map"].get("time_ratio_vs_hf"), "<=", 1.4)
    for name in ("kd_map_cached", "kd_map_cached_compiled"):
        if name in by:
            add(f"{name} / hf_fp step time", by[name].get("time_ratio_vs_hf"), "<=", 1.05)
    if "fp" in by:
        add("fp / hf_fp step time", by["fp"].get("time_ratio_vs_hf"), "<=", 1.0)
    for r in rows:
        if r["config"] not in FP_ROWS:
            add(f"{r['config']} / hf_fp peak memory", r.get("mem_ratio_vs_hf"), "<=", 1.5)
    for e in epochs:
        if e["variant"] == "length":  # the default batching
            add(f"{e['task']} epoch: fixed / length (default) time", e["speedup_vs_fixed"], ">=", 2.0)
    return out


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), which changes what a ratio means: where matmuls are faster, element-wise
    work weighs more."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.allocator == "jemalloc":
        preload_jemalloc(sys.argv[1:] if argv is None else argv)  # runs this script again, once; children inherit it
    elif args.allocator == "tuned" and not keep_freed_memory():
        print("--allocator tuned: not glibc, the allocator is left as it is")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.memory_of:
        memory_child(args)
        return 0
    device = torch.device(args.device)
    ckpt = args.model or default_base_model()
    out_path = Path(args.out or REPO / "results" / "bench" / f"step_{device.type}.json")
    load_before = os.getloadavg()
    cpu = f"cpu ({cpu_model()}, {os.cpu_count()} cores)"
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": sys.modules["transformers"].__version__, "git_sha": git_sha(), "model": ckpt,
            "bf16_autocast": args.bf16, "allocator": args.allocator,
            "allocator_env": {k: os.environ[k] for k in ("LD_PRELOAD", "MALLOC_CONF") if k in os.environ},
            "repeats": args.repeats, "steps_per_repeat": args.steps, "warmup": args.warmup,
            "loadavg_start": load_before, "command": [sys.executable, *sys.argv]}
    print(f"device {meta['device']}, torch {torch.__version__}, {meta['torch_threads']} thread(s), "
          f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    if load_before[0] > (args.threads or torch.get_num_threads()) and device.type == "cpu":
        print("  warning: other jobs are using the CPU; timings are unreliable (ratios from one interleaved run less so)")
    shapes = [Shape("minilm" if args.model is None else Path(ckpt).name, ckpt, args.batch, args.seq)]
    tmp = tempfile.TemporaryDirectory(prefix="bench_step_")
    if device.type == "cuda":
        base = random_checkpoint(BERT_BASE, Path(tmp.name) / "bert_base")
        gpu_shapes = [(2, 16)] if args.quick else [(bs, 128) for bs in args.gpu_batches]
        shapes += [Shape("bert-base-random", base, bs, seq) for bs, seq in gpu_shapes]
    else:
        print("no CUDA device: the GPU rows (random BERT-base 12 × 768, batch "
              f"{' and '.join(map(str, args.gpu_batches))} × 128, --bf16, MFU) are not run in this session")
    names = row_names(args)
    result = {"meta": meta, "shapes": [], "epochs": []}
    for shape in shapes:
        print(f"\n## {shape.label}: batch {shape.batch} × seq {shape.seq} on {device.type}", flush=True)
        init = load_init(shape)
        teacher = make_teacher(init, device)
        cases = [build_case(n, shape, device, args, init, teacher) for n in names]
        ms = time_cases(cases, device, args)
        mults = {c.name: c.flops_mult for c in cases}
        del cases
        fwd = forward_matmul_flops(init.shape, shape.seq)
        peak = peak_flops(device, args)
        rows = []
        for c_name in names:
            med = statistics.median(ms[c_name]["wall"])
            mult = mults[c_name]
            tflops = mult * fwd * shape.batch / (med / 1000) / 1e12
            rows.append({"config": c_name, "ms_per_step": med, "ms_all": ms[c_name]["wall"],
                         "cpu_ms_per_step": statistics.median(ms[c_name]["cpu"]), "cpu_ms_all": ms[c_name]["cpu"],
                         "page_faults_per_step": statistics.median(ms[c_name]["faults"]),
                         "examples_per_s": shape.batch / (med / 1000), "tflops": tflops,
                         "mfu": tflops * 1e12 / peak if peak else None, "flops_mult": mult})
        if not args.no_memory:
            for r in rows:
                print(f"  memory: {r['config']} (fresh process)", flush=True)
                r.update(measure_memory(r["config"], shape, device, args))
        hf = next((r for r in rows if r["config"] == "hf_fp"), None)
        for r in rows:
            r["time_ratio_vs_hf"] = r["ms_per_step"] / hf["ms_per_step"] if hf else None
            r["cpu_time_ratio_vs_hf"] = r["cpu_ms_per_step"] / hf["cpu_ms_per_step"] if hf else None
            r["mem_ratio_vs_hf"] = r["peak_mib"] / hf["peak_mib"] if hf and r.get("peak_mib") and hf.get("peak_mib") else None
        print()
        print(fmt_table(rows, with_mfu=device.type == "cuda"))
        result["shapes"].append({"label": shape.label, "batch": shape.batch, "seq": shape.seq,
                                 "forward_matmul_flops_per_example": fwd, "rows": rows})
    tmp.cleanup()
    if args.tasks:
        print(f"\n## real data: one training epoch of the kd_map step ({Path(args.glue_dir)})", flush=True)
        result["epochs"] = run_epochs(shapes[0].ckpt, device, args)
        print("\n| task | batching | examples | seconds | examples/s | padded / real tokens | speed-up vs fixed |")
        print("|---|---|---|---|---|---|---|")
        for e in result["epochs"]:
            proj = f" (whole epoch ≈ {e['projected_full_epoch_s']:.0f} s)" if e["examples"] < e["train_examples"] else ""
            print(f"| {e['task']} | {e['variant']} | {e['examples']} | {e['seconds']:.1f}{proj} | {e['examples_per_s']:.1f} | "
                  f"{e['padding_overhead']:.2f} | {e['speedup_vs_fixed']:.2f} |")
    result["targets"] = targets(result["shapes"][0]["rows"], result["epochs"])
    meta["loadavg_end"] = os.getloadavg()
    print("\ntargets (ratios from this run):")
    for t in result["targets"]:
        print(f"  {'met ' if t['met'] else 'MISS'}  {t['target']}: {t['value']}")
    print(f"load average at the end {meta['loadavg_end'][0]:.2f}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
