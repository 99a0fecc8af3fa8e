"""Tokenized GLUE splits -> padded tensor batches. Reading, tokenizing and metrics live in `utils_glue`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

import utils_glue
from transformer.config import DataConfig


@dataclass
class Batch:
    input_ids: Tensor        # (B, S) int64
    token_type_ids: Tensor   # (B, S) int64
    attention_mask: Tensor   # (B, S) bool, True = real token
    labels: Tensor           # (B,) int64 class index, or float32 score for regression
    index: Tensor | None = None  # (B,) int64 positions of the examples in their split (the teacher cache's key)

    def to(self, device: torch.device | str) -> Batch:
        nb = torch.device(device).type == "cuda"  # async copies only make sense to a GPU
        return Batch(*(t.to(device, non_blocking=nb) for t in
                       (self.input_ids, self.token_type_ids, self.attention_mask, self.labels)), self.index)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class TaskData:
    task: utils_glue.TaskSpec
    train: utils_glue.Encoded
    dev: dict[str, utils_glue.Encoded]  # split name -> examples (MNLI: dev_matched, dev_mismatched)


def load_task_data(cfg: DataConfig, tokenizer, with_train: bool = True) -> TaskData:
    """Read and tokenize the task's train (or train_aug) and dev splits; `limit_*` keep the first N."""
    task = utils_glue.get_task(cfg.task, cfg.custom_task)
    folder = utils_glue.task_dir(Path(cfg.glue_dir), task)

    def encode(split: str, limit: int | None) -> utils_glue.Encoded:
        examples = utils_glue.read_examples(folder, task, split)[:limit]
        if not examples:
            raise utils_glue.DataError(f"{folder / (split + '.tsv')}: no examples")
        return utils_glue.encode_examples(examples, task, tokenizer, cfg.max_seq_len)

    train = encode("train_aug" if cfg.augment else "train", cfg.limit_train) if with_train else None
    dev = {split: encode(split, cfg.limit_dev) for split in task.dev_splits}
    return TaskData(task, train, dev)


def collate(enc: utils_glue.Encoded, idx: list[int] | np.ndarray, pad_to: int | None, pad_id: int = 0) -> Batch:
    """Pad examples `idx` to `pad_to` tokens (None: to the longest of them)."""
    rows = [enc.input_ids[i] for i in idx]
    S = pad_to or max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    types = torch.zeros((len(rows), S), dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.bool)
    for b, i in enumerate(idx):
        n = len(enc.input_ids[i])
        ids[b, :n] = torch.as_tensor(enc.input_ids[i])
        types[b, :n] = torch.as_tensor(enc.token_type_ids[i])
        mask[b, :n] = True
    return Batch(ids, types, mask, torch.as_tensor(enc.labels[np.asarray(idx)]), torch.as_tensor(np.asarray(idx)))


def train_padding(cfg: DataConfig) -> dict:
    """`train_batches` keyword arguments of cfg.batching: pad_to (fixed) and length_buckets (length)."""
    return {"pad_to": cfg.max_seq_len if cfg.batching == "fixed" else None,
            "length_buckets": cfg.bucket_batches if cfg.batching == "length" else None}


def eval_pad_to(cfg: DataConfig) -> int | None:
    """Dev batches are padded to max_seq_len under batching=fixed (as published), else to their longest example."""
    return cfg.max_seq_len if cfg.batching == "fixed" else None


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size)


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                  length_buckets: int | None = None) -> list[np.ndarray]:
    """The example indices of every global batch of epoch `epoch`, in order.

    length_buckets=None: a shuffle with seed (seed, epoch), cut into consecutive batches (the last may be short).
    length_buckets=K (batching=length, the default of the CLI): the same shuffle cut into chunks of K batches, each
    chunk sorted by length and cut into batches, then the batch order shuffled. Batches hold examples of similar
    length, so padding to the batch's longest wastes far less; every example is still seen once per epoch.
    """
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=g).numpy()
    if length_buckets is None:
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    chunk = length_buckets * batch_size
    batches = []
    for c in range(0, len(order), chunk):
        part = order[c:c + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[s:s + batch_size] for s in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def train_batches(enc: utils_glue.Encoded, batch_size: int, seed: int, pad_to: int | None, start_step: int = 0,
                  rank: int = 0, world: int = 1, micro_batch_size: int | None = None,
                  length_buckets: int | None = None) -> Iterator[list[tuple[Batch, float]]]:
    """Endless stream, one item per optimizer step: this rank's micro-batches of the global batch, each with
    its share n_micro / n_global of the batch (so Σ over ranks and micro-batches of share·mean loss = global mean).

    Batches of epoch e come from `epoch_batches` (seed, e; length_buckets: see there). Every rank draws the
    same global batch, pads it to its longest example (or pad_to) and takes its contiguous share, so the
    split changes neither padding nor order. start_step skips that many global batches (resume).
    """
    per_epoch = steps_per_epoch(len(enc), batch_size)
    epoch, skip = divmod(start_step, per_epoch)
    lengths = np.array([len(ids) for ids in enc.input_ids])
    while True:
        for idx in epoch_batches(lengths, batch_size, seed, epoch, length_buckets)[skip:]:
            length = pad_to or int(lengths[idx].max())
            mine = np.array_split(idx, world)[rank]
            if len(mine) == 0:  # a short last batch leaves this rank nothing: a zero-share forward keeps DDP in step
                yield [(collate(enc, idx[:1], length), 0.0)]
                continue
            chunks = [mine] if micro_batch_size is None else np.array_split(mine, math.ceil(len(mine) / micro_batch_size))
            yield [(collate(enc, c, length), len(c) / len(idx)) for c in chunks]
        epoch, skip = epoch + 1, 0


def eval_batches(enc: utils_glue.Encoded, batch_size: int, pad_to: int | None) -> Iterator[Batch]:
    for start in range(0, len(enc), batch_size):
        yield collate(enc, np.arange(start, min(start + batch_size, len(enc))), pad_to)
