"""Time the vectorised attention-map analysis on a BERT-base-shaped pair (12 layers, 12 heads, 128 tokens).

    python bench/bench_ranking_loss.py [--threads N]

Prints a table: seconds for all 12 layers of each distance (median of 3). A Python loop over token pairs
(what the published notebook did) takes minutes for the ranking loss alone.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformer import analysis as A  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    L, H, S = 12, 12, 128
    p_t = torch.randn(L, 1, H, S, S, generator=g).softmax(-1)
    p_s = torch.randn(L, 1, H, S, S, generator=g).softmax(-1)
    valid = torch.ones(1, S, dtype=torch.bool)
    rows = []
    for name, fn in (("KL(T||S)", lambda l: A.attn_kl(p_t[l], p_s[l], valid)),
                     ("ranking loss", lambda l: A.attn_ranking_loss(p_t[l], p_s[l], valid)),
                     ("top-5 cover ratio", lambda l: A.attn_topk_cover_ratio(p_t[l], p_s[l], valid)),
                     ("attention distance", lambda l: A.attn_distance(p_s[l], valid))):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for layer in range(L):
                fn(layer)
            times.append(time.perf_counter() - start)
        rows.append((name, statistics.median(times)))
    print(f"{'quantity (12 layers x 12 heads x 128 tokens)':<46} {'seconds':>8}")
    for name, sec in rows:
        print(f"{name:<46} {sec:>8.2f}")
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
