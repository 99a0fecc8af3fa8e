"""Does torch.compile make the activation fake-quantizer faster on this CPU? (issue 14 asked to try it)

    python bench/bench_quantizer_compile.py --threads 1

Times, on one (32, 128, 384) activation (MiniLM's hidden states at batch 32 × 128), medians of interleaved repeats:
our eager `quantize_activation` (its one-pass CPU max, `transformer/fast.py`), the textbook formula in eager mode,
and that formula under `torch.compile(dynamic=True)` (Inductor's fused C++ kernels; length-bucketed batches change
the shape every step, hence dynamic). Checks that all three give the same values.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformer.quant import ActConfig, quantize_activation  # noqa: E402


def formula(x: torch.Tensor) -> torch.Tensor:
    c = x.clamp(-2.5, 2.5)
    s = 127.0 / c.abs().amax().clamp_min(1e-30)
    return (c * s).round() / s


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--shape", type=int, nargs=3, default=[32, 128, 384])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(*args.shape) * 1.5
    compiled = torch.compile(formula, dynamic=True)
    fns = {"eager quantize_activation (ours)": lambda: quantize_activation(x, ActConfig()),
           "eager formula": lambda: formula(x), "torch.compile formula": lambda: compiled(x)}
    ref = fns["eager quantize_activation (ours)"]()
    for name, f in fns.items():
        assert torch.equal(f(), ref), name  # also the compile and warm-up call
    ms = {n: [] for n in fns}
    for r in range(args.repeats):
        for n, f in list(fns.items())[r % 3:] + list(fns.items())[:r % 3]:
            t = time.perf_counter()
            for _ in range(10):
                f()
            ms[n].append((time.perf_counter() - t) * 100)
    print(f"| {' × '.join(map(str, args.shape))} activation, {args.threads} thread(s) | ms (median) |\n|---|---|")
    for n, v in ms.items():
        print(f"| {n} | {statistics.median(v):.1f} |")


if __name__ == "__main__":
    main()
