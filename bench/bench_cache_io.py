"""Disk reads of a memory-mapped teacher cache on cold pages: the plain np.memmap against the random-access mapping.

    python bench/bench_cache_io.py --folder cache/teacher/<task>-<key> --out results/bench/cache_io.json

A cache larger than the RAM left for the page cache (SST-2 under TI: 22 GB on a 24 GiB machine) is read from disk
every epoch. Each mode first drops the folder's pages from the page cache (posix_fadvise DONTNEED: clean pages of
files no other process maps), opens it, and pads `--batches` random batches with `TeacherCache.batch`; it reports
the bytes this process read from disk (/proc/self/io read_bytes), the bytes the batches hold, and the time per batch,
cold and then again warm.
Both modes must give the same tensors (checked). Use a folder no running job maps: its pages are dropped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformer.teacher_cache import TeacherCache  # noqa: E402


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no read_bytes in /proc/self/io")


def drop_pages(folder: Path) -> None:
    for f in folder.glob("*.bin"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_ahead_kb(path: Path) -> str:
    """The kernel's read-ahead window of the disk holding path: a cold page fault of a plain mapping reads about this."""
    dev = os.stat(path).st_dev
    node = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    for d in (node, node.parent):  # a partition's queue is its disk's
        if (d / "queue/read_ahead_kb").exists():
            return (d / "queue/read_ahead_kb").read_text().strip()
    return "unknown"


def run(folder: Path, random_access: bool, batches: list[np.ndarray]) -> tuple[dict, list]:
    drop_pages(folder)
    cache = TeacherCache.open(folder, random_access=random_access)
    keep = cache.tensors
    r0, t0, outs = read_bytes(), time.perf_counter(), []
    for idx in batches:
        out = cache.batch(torch.as_tensor(idx), int(cache.lengths[idx].max()), keep, torch.device("cpu"))
        outs.append([out.logits] + [getattr(l, n) for l in out.layers for n in sorted(keep - {"hidden"})]
                    + (out.hidden_states() if "hidden" in keep else []))
    seconds, read = time.perf_counter() - t0, read_bytes() - r0
    t1 = time.perf_counter()  # again, every page now in RAM: what the mapping costs when the cache fits
    for idx in batches:
        cache.batch(torch.as_tensor(idx), int(cache.lengths[idx].max()), keep, torch.device("cpu"))
    warm = time.perf_counter() - t1
    item = next(iter(cache.arrays.values())).element_size()
    held = sum(int(cache.offsets[s.name][i + 1] - cache.offsets[s.name][i]) * item
               for idx in batches for s in cache.arrays for i in idx)
    del cache
    drop_pages(folder)
    return {"mode": "random access + prefetch" if random_access else "plain np.memmap",
            "ms_per_batch": 1000 * seconds / len(batches), "warm_ms_per_batch": 1000 * warm / len(batches),
            "mb_read_per_batch": read / len(batches) / 1e6,
            "mb_needed_per_batch": held / len(batches) / 1e6, "read_over_needed": read / max(held, 1)}, outs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--folder", type=Path, required=True, help="a complete cache folder (cache/teacher/<task>-<key>)")
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    n = len(json.loads((args.folder / "cache.json").read_text())["lengths"])
    rng = np.random.default_rng(args.seed)
    batches = [rng.choice(n, args.batch_size, replace=False) for _ in range(args.batches)]
    rows, outs = [], []
    for random_access in (False, True):
        row, out = run(args.folder, random_access, batches)
        rows.append(row)
        outs.append(out)
    same = all(torch.equal(a, b) for xs, ys in zip(*outs) for a, b in zip(xs, ys))
    ahead = read_ahead_kb(args.folder)
    print(f"{args.folder.name}: {n} examples, {args.batches} random batches of {args.batch_size}, cold pages; "
          f"read_ahead_kb {ahead}; same tensors: {same}")
    print("| mode | ms/batch | warm ms/batch | MB read/batch | MB needed/batch | read / needed |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['ms_per_batch']:.0f} | {r['warm_ms_per_batch']:.1f} | {r['mb_read_per_batch']:.1f} | {r['mb_needed_per_batch']:.1f} | "
              f"{r['read_over_needed']:.1f}× |")
    if not same:
        raise SystemExit("the two modes gave different tensors")
    if args.out:
        args.out.write_text(json.dumps({"folder": args.folder.name, "batches": args.batches, "batch_size":
                                        args.batch_size, "read_ahead_kb": ahead, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
