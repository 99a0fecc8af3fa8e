"""Devices and torchrun process groups: NCCL on GPU, gloo on CPU; a plain single process otherwise.

    torchrun --nproc_per_node 4 quant_task_glue.py ...     (or NPROC=4 bash run_kd_qat_map.sh)
"""
from __future__ import annotations

import ctypes
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


class DeviceError(RuntimeError):
    """A device or process-group request that cannot be met; one line."""


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--train.device cuda but no CUDA device is visible (check CUDA_VISIBLE_DEVICES)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def keep_freed_memory() -> bool:
    """glibc: serve allocations below 32 MiB from the heap and never hand freed heap memory back to the OS.

    A CPU training step allocates and frees hundreds of MB of short-lived tensors. glibc's adaptive thresholds return
    much of it to the OS and the next step page-faults it back in: tens of thousands of faults per KD-QAT step on a
    2-core VM, each several µs (bench/bench_step.py counts them). The process RSS then stays at its peak instead.
    Returns False where this does not apply (not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # 32 MiB is glibc's largest mmap threshold; a trim threshold of -1 (SIZE_MAX) never trims
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch_dist.all_reduce(t)
        return t

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (a collective: all ranks must call it)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def close(self) -> None:
        if self.world > 1 and torch_dist.is_initialized():
            # DDP's reducer sits in a reference cycle: collect it while its group is alive, or it is destroyed at
            # interpreter exit with gloo threads still attached (seen: "terminate called without an active exception")
            gc.collect()
            torch_dist.destroy_process_group()


def setup(device_name: str) -> Dist:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, pick_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(f"rank with LOCAL_RANK={local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(torch_dist.get_rank(), world, device)
