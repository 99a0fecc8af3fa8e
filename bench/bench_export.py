"""Inference benchmark of the exported W2A8 student on CPU: encoder + head forward at sequence 128, batch 1 and 8.

    python bench/bench_export.py --out results/bench/export_cpu.json            # MiniLM + a BERT-base-shaped model
    python bench/bench_export.py --quick --out /tmp/bench_export.json           # smoke run

Rows, for the real MiniLM checkpoint and a BERT-base-shaped model (12 × 768, 12 heads, FFN 3072, vocab 30522; random
weights, which quantize to random ternary codes: speed and size do not depend on the values):
  torch fp32        the full-precision model (our `BertForGlue`, eval, no_grad)
  torch bf16        the same model cast to bfloat16
  torch fake-quant  the student as trained (`quantize_model`): fp32 with quantizers, what every published KD-QAT code runs
  ort fp32          our ONNX graph of the FP model in onnxruntime
  ort dynamic int8  onnxruntime's `quantize_dynamic` (int8 weights, per-tensor) of that FP graph
  ort W2A8          our export (`transformer.export`): 2-bit weights on disk, int8 MatMulInteger at run time
Times are medians over interleaved repeats (configurations in rotating order), one thread (torch and onnxruntime).
Peak memory is the RSS high-water mark (VmHWM) of a fresh process that loads one configuration and runs batch 8, above
the same process's RSS after its imports (for the torch rows the load itself sets it: checkpoint + model); the RSS
after loading is stored too. Sizes are the files each configuration loads (fp32 / bf16: safetensors).
A profile of the W2A8 graph (batch 1) splits its time by ONNX op type. Other jobs on the machine skew the timings: the
header prints the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from transformer import export as E  # noqa: E402
from transformer.config import QuantConfig  # noqa: E402
from transformer.model import BertForGlue, BertShape, load_bert, save_bert  # noqa: E402
from transformer.quant import quantize_model  # noqa: E402

BERT_BASE = BertShape(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                      num_labels=2)
ROWS = ["torch fp32", "torch bf16", "torch fake-quant", "ort fp32", "ort dynamic int8", "ort W2A8"]


def make_model(name: str) -> BertForGlue:
    torch.manual_seed(0)
    if name == "minilm":
        from tests.conftest import MINILM
        return load_bert(MINILM, num_labels=2, new_classifier=True)
    model = BertForGlue(BERT_BASE)
    for m in model.modules():  # HF's init: the ternary codes of N(0, 0.02) weights are as dense as trained ones
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, std=0.02)
    return model


def prepare(name: str, folder: Path) -> dict[str, Path]:
    """Write every configuration's file for model `name` under folder; returns row -> file."""
    model = make_model(name).eval()
    save_bert(model, folder / "fp32")
    fq_cfg = QuantConfig()
    student = quantize_model(make_model(name), fq_cfg).eval()
    E.save_student(E.student_from_model(student, fq_cfg), folder / E.STUDENT_FILE)
    onnx.save(E.build_onnx(E.load_student(folder / E.STUDENT_FILE)), str(folder / "w2a8.onnx"))
    fp = QuantConfig(enabled=False)
    onnx.save(E.build_onnx(E.student_from_model(model, fp)), str(folder / "fp32.onnx"))
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(folder / "fp32.onnx"), str(folder / "dynamic_int8.onnx"), weight_type=QuantType.QInt8)
    return {"torch fp32": folder / "fp32" / "model.safetensors", "torch bf16": folder / "fp32" / "model.safetensors",
            "torch fake-quant": folder / "fp32" / "model.safetensors", "ort fp32": folder / "fp32.onnx",
            "ort dynamic int8": folder / "dynamic_int8.onnx", "ort W2A8": folder / "w2a8.onnx",
            "packed W2A8 (safetensors)": folder / E.STUDENT_FILE}


def runner(row: str, name: str, folder: Path):
    """A function batch -> logits for one configuration (weights loaded once)."""
    if row.startswith("torch"):
        model = load_bert(folder / "fp32").eval()
        if row == "torch fake-quant":
            model = quantize_model(model, QuantConfig()).eval()
        if row == "torch bf16":
            model = model.to(torch.bfloat16)

        def run(ids, types, mask):
            with torch.no_grad():
                return model(ids, types, mask).logits
        return run
    file = {"ort fp32": "fp32.onnx", "ort dynamic int8": "dynamic_int8.onnx", "ort W2A8": "w2a8.onnx"}[row]
    session = E.onnx_session(folder / file, threads=1)
    return lambda ids, types, mask: E.onnx_logits(session, ids, types, mask)


def inputs(vocab: int, batch: int, seq: int):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    return ids, torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool)


def time_rows(name: str, folder: Path, batches: list[int], seq: int, repeats: int) -> dict:
    runs = {row: runner(row, name, folder) for row in ROWS}
    vocab = 30522  # MiniLM's and BERT-base's
    out = {}
    for b in batches:
        x = inputs(vocab, b, seq)
        for run in runs.values():  # warm-up (onnxruntime's first run allocates)
            run(*x)
        times = {row: [] for row in ROWS}
        for r in range(repeats):
            order = ROWS[r % len(ROWS):] + ROWS[:r % len(ROWS)]
            for row in order:
                t0 = time.perf_counter()
                runs[row](*x)
                times[row].append(time.perf_counter() - t0)
        out[b] = {row: statistics.median(t) * 1e3 for row, t in times.items()}
    return out


def peak_memory(row: str, name: str, folder: Path, seq: int) -> dict:
    """Run one configuration at batch 8 in a fresh process; VmHWM minus the RSS after imports (MiB)."""
    code = f"""
import sys, json, torch; sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'bench')!r})
torch.set_num_threads(1)
import bench_export as B
def status(k):
    return int(next(l for l in open('/proc/self/status') if l.startswith(k)).split()[1]) / 1024
base = status('VmRSS:')
run = B.runner({row!r}, {name!r}, B.Path({str(folder)!r}))
loaded = status('VmRSS:') - base
run(*B.inputs(30522, 8, {seq}))
print(json.dumps({{"peak_mib": status('VmHWM:') - base, "resident_after_load_mib": loaded,
                  "abs_peak_mib": status('VmHWM:')}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def profile_w2a8(folder: Path, seq: int, runs: int = 5) -> dict[str, float]:
    """Share of the W2A8 graph's node time by op type (onnxruntime profiler, batch 1, after fusions)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
    so.enable_profiling = True
    so.profile_file_prefix = str(folder / "ort_profile")
    session = ort.InferenceSession(str(folder / "w2a8.onnx"), so, providers=["CPUExecutionProvider"])
    x = {k: v.numpy().astype("int64") for k, v in zip(("input_ids", "token_type_ids", "attention_mask"),
                                                      inputs(30522, 1, seq))}
    for _ in range(runs):
        session.run(["logits"], x)
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] = by_op.get(e["args"]["op_name"], 0.0) + e["dur"]
    total = sum(by_op.values())
    return {op: round(100 * t / total, 1) for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--models", default="minilm,bert-base")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="seq 32, 2 repeats, MiniLM only, no memory runs")
    args = p.parse_args(argv)
    if args.quick:
        args.seq, args.repeats, args.models = 32, 2, "minilm"
    torch.set_num_threads(1)
    header = {"cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg(), "threads": 1,
              "seq": args.seq, "repeats": args.repeats, "versions": E._versions(),
              "note": "one thread each; other jobs (training runs, test suites) shared the 2-core machine during this run"}
    print(f"# {json.dumps(header)}")
    results = {"header": header, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            folder = Path(tmp) / name
            folder.mkdir()
            files = prepare(name, folder)
            sizes = {row: f.stat().st_size for row, f in files.items()}
            sizes["torch bf16"] //= 2  # a bf16 safetensors file: half the fp32 one
            times = time_rows(name, folder, [1, 8], args.seq, args.repeats)
            memory = {} if args.quick else {row: peak_memory(row, name, folder, args.seq) for row in ROWS}
            profile = profile_w2a8(folder, args.seq)
            results["models"][name] = {"ms": times, "bytes": sizes, "memory": memory, "w2a8_profile_pct": profile}
            fp1, fp8 = times[1]["torch fp32"], times[8]["torch fp32"]
            print(f"\n## {name}: seq {args.seq}, 1 thread, median ms (speed-up vs torch fp32)")
            print(f"| {'configuration':<18} | {'batch 1':>16} | {'batch 8':>16} | {'file MB':>8} | {'peak MiB (b8)':>13} |"
                  f" {'loaded MiB':>10} |")
            print(f"|{'-' * 20}|{'-' * 18}|{'-' * 18}|{'-' * 10}|{'-' * 15}|{'-' * 12}|")
            for row in ROWS:
                mem = f"{memory[row]['peak_mib']:.0f}" if row in memory else "-"
                loaded = f"{memory[row]['resident_after_load_mib']:.0f}" if row in memory else "-"
                size = sizes[row] / 1e6
                print(f"| {row:<18} | {times[1][row]:8.1f} ({fp1 / times[1][row]:4.1f}×) | "
                      f"{times[8][row]:8.1f} ({fp8 / times[8][row]:4.1f}×) | {size:8.1f} | {mem:>13} | {loaded:>10} |")
            print(f"| {'packed W2A8 file':<18} | {'':>16} | {'':>16} | {sizes['packed W2A8 (safetensors)'] / 1e6:8.1f} | "
                  f"{'':>13} | {'':>10} |  ({sizes['torch fp32'] / sizes['packed W2A8 (safetensors)']:.1f}× smaller than fp32)")
            print("W2A8 time by op (%):", ", ".join(f"{k} {v}" for k, v in list(profile.items())[:10]))
    header["load_average_end"] = os.getloadavg()
    print(f"# load average at the end: {header['load_average_end']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
