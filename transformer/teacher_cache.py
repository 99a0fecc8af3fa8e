"""The frozen teacher's outputs, computed once per training example and reused by every epoch, seed and run.

The teacher runs in eval mode without gradients on the same examples every epoch, so its forward is the same work
each time (about a quarter of a KD-QAT step). `TeacherCache.build` runs it once over the training split, keeps each
example's tensors **unpadded** (its own n tokens: (n, D) per layer for hidden states, (H, n, n) for attention maps, ...)
in one flat file per tensor and layer, and `TeacherCache.batch` pads them into the `EncoderOutput` the live forward
would return for a training batch (dtype included), with zeros at padding positions.

What differs from the live teacher, and why it is harmless:
- Real tokens: the same values up to float noise of running each example in another batch (the teacher's outputs at
  real tokens do not depend on padding; the matrix products may round differently).
- Padding positions: the live teacher's values there (computed for [PAD] tokens that attend to the real ones) are
  not stored. Losses are told so (`LossContext.teacher_padding=False`): an MSE term counts no error at padding
  positions but keeps its denominator, so its value is the live one minus the padding positions' error and its
  gradient on every real token is the live one. Attention KL terms never read padding. Under Teacher Intervention
  the student's padding rows receive zeros; with the published per-tensor activation scale a padding row can set a
  quantizer's max, so TI step 1 then matches the live teacher only up to those scales (per-token scales: exactly).
  Under `--data.batching fixed` (the published 128-token padding) padding errors are most of the MSE terms, so
  `--teacher.cache auto` leaves the cache off there.

A cache folder is named by a key of everything that determines its contents (teacher weights and tokenizer files by
content hash, task, the training file's content hash, max length, example limit, the tensor set, precision, storage
dtype, format version); a cache whose tensor set contains the needed one is reused. Folders are written under a
temporary name and renamed when complete, so an interrupted build leaves nothing a later run would trust.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import mmap
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

import utils_glue
from transformer.model import BertForGlue, EncoderOutput, LayerOutput

FORMAT = 1  # bump when the stored layout or the model's forward changes what a cache holds
META = "cache.json"
_TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
_NP_STORAGE = {"fp32": np.float32, "bf16": np.uint16}  # numpy has no bf16: its bits are stored as uint16


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _checkpoint_files(folder: Path) -> list[Path]:
    names = ("config.json", "model.safetensors", "pytorch_model.bin", "vocab.txt", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json")
    return [folder / n for n in names if (folder / n).is_file()]


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines a cache's contents; `digest` names its folder."""
    teacher: str          # sha256 of the teacher's weights, config and tokenizer files
    task: str
    train_file: str       # sha256 of the training TSV (train.tsv or train_aug.tsv)
    max_seq_len: int
    limit_train: int | None
    precision: str        # autocast precision of the teacher forward
    dtype: str            # storage dtype
    format: int = FORMAT

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def cache_key(teacher_dir: str | Path, task: utils_glue.TaskSpec, glue_dir: str | Path, augment: bool, max_seq_len: int,
              limit_train: int | None, precision: str, dtype: str) -> CacheKey:
    train = utils_glue.task_dir(Path(glue_dir), task) / ("train_aug.tsv" if augment else "train.tsv")
    return CacheKey(_hash_files(_checkpoint_files(Path(teacher_dir))), task.name, _hash_files([train]), max_seq_len,
                    limit_train, precision, dtype)


# ---------------------------------------------------------------------------------------------
# Layout: which flat arrays a tensor set needs, and each example's size in them

@dataclass(frozen=True)
class Slot:
    """One stored array: tensor `name` of layer `layer` (hidden: 0 = embeddings, l = layer l's output)."""
    name: str
    layer: int

    @property
    def file(self) -> str:
        return f"{self.name}.{self.layer}.bin"


def _slots(tensors: frozenset[str], num_layers: int) -> list[Slot]:
    slots = [Slot("logits", 0)]
    for name in sorted(tensors):
        slots += [Slot(name, l) for l in range(num_layers + 1 if name == "hidden" else num_layers)]
    return slots


def _example_shape(name: str, n: int, shape: dict) -> tuple[int, ...]:
    """The unpadded shape of one example's tensor `name` with n tokens."""
    H, D, C = shape["num_heads"], shape["hidden_size"], shape["num_labels"]
    return {"logits": (C,), "hidden": (n, D), "attn_output": (n, D), "sa_output": (n, D), "scores": (H, n, n),
            "probs": (H, n, n), "context": (H, n, D // H), "value": (H, n, D // H)}[name]


def _offsets(name: str, lengths: np.ndarray, shape: dict) -> np.ndarray:
    sizes = np.array([math.prod(_example_shape(name, int(n), shape)) for n in lengths], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(sizes)])


def cache_bytes(tensors: frozenset[str], lengths: np.ndarray, shape: dict, dtype: str) -> int:
    """Size of a cache before it is built (exact)."""
    per = np.dtype(_NP_STORAGE[dtype]).itemsize
    return sum(int(_offsets(s.name, lengths, shape)[-1]) * per for s in _slots(tensors, shape["num_layers"]))


def _shape_dict(teacher: BertForGlue) -> dict:
    s = teacher.shape
    return {"num_layers": s.num_layers, "num_heads": s.num_heads, "hidden_size": s.hidden_size,
            "num_labels": s.num_labels}


# ---------------------------------------------------------------------------------------------
# The cache

class TeacherCache:
    """Per-example teacher tensors (`arrays[slot]`: flat, example i at offsets[name][i:i+2]) and how to pad a batch."""

    def __init__(self, meta: dict, arrays: dict[Slot, Tensor], folder: Path | None = None,
                 maps: dict[Slot, mmap.mmap] | None = None):
        self.meta, self.arrays, self.folder = meta, arrays, folder
        self.maps = maps or {}  # the files' mappings when opened for random access (`open`), read by `prefetch`
        self.lengths = np.asarray(meta["lengths"], dtype=np.int64)
        self.tensors = frozenset(meta["tensors"])
        self.live_dtype = {k: getattr(torch, v) for k, v in meta["live_dtype"].items()}
        self.offsets = {name: _offsets(name, self.lengths, meta["shape"]) for name in {"logits", *self.tensors}}

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.arrays.values())

    def example(self, slot: Slot, i: int) -> Tensor:
        """Example i's tensor of `slot`, unpadded, as stored."""
        o = self.offsets[slot.name]
        return self.arrays[slot][o[i]:o[i + 1]].view(_example_shape(slot.name, int(self.lengths[i]), self.meta["shape"]))

    def batch(self, index: Tensor, seq_len: int, keep: frozenset[str], device: torch.device) -> EncoderOutput:
        """The teacher's EncoderOutput for examples `index` padded to seq_len: the kept tensors (⊆ self.tensors) and
        logits, zeros at padding positions, in the live forward's dtypes."""
        missing = set(keep) - self.tensors
        if missing:
            raise ValueError(f"the teacher cache holds {sorted(self.tensors)}, not {sorted(missing)}")
        idx = index.tolist()
        B, S, L = len(idx), seq_len, self.meta["shape"]["num_layers"]

        def padded(slot: Slot) -> Tensor:
            parts = [self.example(slot, i) for i in idx]
            n_max = S if slot.name != "logits" else None
            full = _example_shape(slot.name, n_max or 0, self.meta["shape"])
            out = torch.zeros((B, *full), dtype=parts[0].dtype)
            for b, (i, p) in enumerate(zip(idx, parts)):
                n = int(self.lengths[i])
                if slot.name == "logits":
                    out[b] = p
                elif slot.name in ("scores", "probs"):
                    out[b, :, :n, :n] = p
                elif slot.name in ("context", "value"):
                    out[b, :, :n] = p
                else:
                    out[b, :n] = p
            return out.to(device=device, dtype=self.live_dtype[slot.name], non_blocking=True)

        slots = [Slot("logits", 0)] + [s for s in self.arrays if s.name in keep]
        self.prefetch(idx, slots)
        logits = padded(Slot("logits", 0))
        layers = [LayerOutput() for _ in range(L)]
        embeddings = None
        for name in sorted(keep):
            if name == "hidden":
                embeddings = padded(Slot("hidden", 0))
                for l in range(L):
                    layers[l].hidden = padded(Slot("hidden", l + 1))
            else:
                for l in range(L):
                    setattr(layers[l], name, padded(Slot(name, l)))
        return EncoderOutput(logits=logits, embeddings=embeddings, layers=layers)

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def build(cls, teacher: BertForGlue, enc: utils_glue.Encoded, tensors: frozenset[str], key: CacheKey,
              folder: Path | None, device: torch.device, autocast, batch_size: int = 64) -> TeacherCache:
        """Run the teacher (eval, no grad, under the context `autocast()` makes) over every example once, in
        length-sorted batches.
        folder: write the flat arrays there (memory-mapped afterwards); None: keep them in RAM."""
        shape = _shape_dict(teacher)
        lengths = np.array([len(ids) for ids in enc.input_ids], dtype=np.int64)
        slots = _slots(tensors, shape["num_layers"])
        storage = _NP_STORAGE[key.dtype]
        offsets = {name: _offsets(name, lengths, shape) for name in {"logits", *tensors}}
        tmp = None
        if folder is not None:
            tmp = folder.with_name(folder.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            arrays = {s: np.memmap(tmp / s.file, dtype=storage, mode="w+", shape=(max(1, int(offsets[s.name][-1])),))
                      for s in slots}
        else:
            arrays = {s: np.zeros(max(1, int(offsets[s.name][-1])), dtype=storage) for s in slots}
        from transformer.data import collate  # data imports nothing from here; a local import keeps it so
        live_dtype: dict[str, str] = {}
        order = np.argsort(lengths, kind="stable")
        was_training = teacher.training
        teacher.eval()
        with torch.no_grad():
            for start in tqdm(range(0, len(order), batch_size), desc="teacher cache (one-off)", dynamic_ncols=True):
                idx = order[start:start + batch_size]
                b = collate(enc, idx, None).to(device)
                with autocast():
                    out = teacher(b.input_ids, b.token_type_ids, b.attention_mask, keep=tensors)
                for s in slots:
                    t = cls._slot_tensor(out, s)
                    live_dtype[s.name] = str(t.dtype).removeprefix("torch.")
                    t = t.float() if key.dtype == "fp32" else t.to(torch.bfloat16)
                    for row, i in enumerate(idx):
                        n = int(lengths[i])
                        v = t[row]
                        v = (v if s.name == "logits" else v[:, :n, :n] if s.name in ("scores", "probs")
                             else v[:, :n] if s.name in ("context", "value") else v[:n])
                        flat = v.contiguous().cpu().reshape(-1)
                        flat = flat.view(torch.int16).numpy().view(np.uint16) if key.dtype == "bf16" else flat.numpy()
                        o = offsets[s.name]
                        arrays[s][o[i]:o[i + 1]] = flat
        teacher.train(was_training)
        meta = {"key": dataclasses.asdict(key), "tensors": sorted(tensors), "shape": shape, "dtype": key.dtype,
                "lengths": lengths.tolist(), "live_dtype": live_dtype, "complete": True}
        if folder is None:
            return cls(meta, {s: _as_tensor(a, key.dtype) for s, a in arrays.items()})
        for a in arrays.values():
            a.flush()
        del arrays
        (tmp / META).write_text(json.dumps(meta))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)  # complete, or not there at all
        return cls.open(folder)

    @staticmethod
    def _slot_tensor(out: EncoderOutput, s: Slot) -> Tensor:
        if s.name == "logits":
            return out.logits
        if s.name == "hidden":
            return out.embeddings if s.layer == 0 else out.layers[s.layer - 1].hidden
        return getattr(out.layers[s.layer], s.name)

    @classmethod
    def open(cls, folder: Path, in_memory: bool = False, random_access: bool = True) -> TeacherCache:
        """A complete cache folder, memory-mapped (or read into RAM).

        random_access: map each file with madvise(MADV_RANDOM) and have `batch` ask for exactly its rows
        (MADV_WILLNEED) first. The plain np.memmap (False) is the reference: same values, but each page fault on a
        cold page reads the kernel's whole read-around window (read_ahead_kb, 8 MB on this machine's disk), which
        for a cache larger than the free RAM read ~300x the bytes a batch needs (bench/bench_cache_io.py)."""
        meta = json.loads((folder / META).read_text())
        storage = _NP_STORAGE[meta["dtype"]]
        arrays, maps = {}, {}
        for s in _slots(frozenset(meta["tensors"]), meta["shape"]["num_layers"]):
            if in_memory:
                a = np.fromfile(folder / s.file, dtype=storage)
            elif random_access and hasattr(mmap, "MADV_RANDOM"):
                with open(folder / s.file, "rb") as f:  # the mapping outlives the file object
                    maps[s] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write, as np.memmap "c"
                maps[s].madvise(mmap.MADV_RANDOM)
                a = np.frombuffer(maps[s], dtype=storage)
            else:
                a = np.memmap(folder / s.file, dtype=storage, mode="c")
            arrays[s] = _as_tensor(a, meta["dtype"])
        return cls(meta, arrays, folder, maps)

    def prefetch(self, idx: list[int], slots: list[Slot]) -> None:
        """Start reading examples idx of `slots` from disk at once (asynchronous), before `batch` copies them: one
        MADV_WILLNEED per example and file, covering exactly its bytes (page-aligned)."""
        for s in slots:
            m = self.maps.get(s)
            if m is None:
                continue
            o, item = self.offsets[s.name], self.arrays[s].element_size()
            for i in idx:
                start = int(o[i]) * item // mmap.PAGESIZE * mmap.PAGESIZE
                m.madvise(mmap.MADV_WILLNEED, start, int(o[i + 1]) * item - start)


def _as_tensor(a: np.ndarray, dtype: str) -> Tensor:
    t = torch.from_numpy(a)
    return t.view(torch.int16).view(torch.bfloat16) if dtype == "bf16" else t


def find(root: Path, key: CacheKey, tensors: frozenset[str]) -> Path | None:
    """A complete cache folder under root with this key whose tensor set contains `tensors`."""
    if not root.is_dir():
        return None
    want = dataclasses.asdict(key)
    for folder in sorted(root.glob(f"{key.task}-*")):
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, ValueError):
            continue  # unfinished (a .partial folder) or foreign
        if meta.get("key") == want and meta.get("complete") and tensors <= set(meta["tensors"]):
            return folder
    return None


def folder_for(root: Path, key: CacheKey, tensors: frozenset[str]) -> Path:
    tag = hashlib.sha256((key.digest() + ",".join(sorted(tensors))).encode()).hexdigest()[:16]
    return root / f"{key.task}-{tag}"


# ---------------------------------------------------------------------------------------------
# Choosing and opening the cache of a run

GB = 1 << 30
# left free beside a new cache: a memory-mapped cache that fills the disk kills its run (SIGBUS) and the checkpoints
# of every other run on it
DISK_MARGIN = 2 * GB


def free_bytes(root: Path) -> int:
    """Free bytes on the filesystem that holds root (or its nearest existing parent: root may not exist yet)."""
    p = root.resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def open_or_build(cfg, teacher: BertForGlue, task: utils_glue.TaskSpec, enc: utils_glue.Encoded, tensors: frozenset[str],
                  dist, autocast) -> TeacherCache | None:
    """The run's teacher cache under --teacher.cache (None: the live teacher). cfg: a resolved RunConfig.

    auto: disk, except under data.batching=fixed (off). memory: built in RAM for this run when it fits
    cache_memory_gb, else as disk. disk: found or built under cache_dir (shared by every run with the same key),
    memory-mapped; a cache larger than cache_disk_gb, or than the free disk less DISK_MARGIN, falls back to
    the live teacher with a note.
    Several processes (DDP): rank 0 builds on disk, the others wait and map it.
    """
    from transformer.rundir import FolderLock  # rundir sits above the model, like this module
    t = cfg.teacher
    mode = t.cache if t.cache != "auto" else ("off" if cfg.data.batching == "fixed" else "disk")
    if mode == "off":
        return None
    lengths = np.array([len(ids) for ids in enc.input_ids], dtype=np.int64)
    size = cache_bytes(tensors, lengths, _shape_dict(teacher), t.cache_dtype)
    key = cache_key(cfg.model.teacher_dir, task, cfg.data.glue_dir, cfg.data.augment, cfg.data.max_seq_len,
                    cfg.data.limit_train, cfg.train.precision, t.cache_dtype)
    if mode == "memory" and dist.world == 1 and size <= t.cache_memory_gb * GB:
        return TeacherCache.build(teacher, enc, tensors, key, None, dist.device, autocast)
    root = Path(t.cache_dir)
    found = find(root, key, tensors)
    if found is None and size > t.cache_disk_gb * GB:
        print(f"note: the teacher cache would take {size / GB:.1f} GB, more than --teacher.cache_disk_gb "
              f"{t.cache_disk_gb:g}: running the live teacher")
        return None
    if found is None and size + DISK_MARGIN > (free := free_bytes(root)):  # a found cache needs no room
        print(f"note: the teacher cache would take {size / GB:.1f} GB and {free / GB:.1f} GB are free under {root} "
              f"(keeping {DISK_MARGIN / GB:g} GB for checkpoints): running the live teacher")
        return None
    if found is None and dist.is_main:
        folder = folder_for(root, key, tensors)
        with FolderLock(folder, "teacher cache", inside=False).acquire(wait=True):  # another run may be building it
            found = find(root, key, tensors)
            if found is None:
                print(f"teacher cache: {size / GB:.2f} GB for {len(enc)} examples -> {folder}")
                found = TeacherCache.build(teacher, enc, tensors, key, folder, dist.device, autocast).folder
    dist.barrier()
    found = found or find(root, key, tensors)
    return TeacherCache.open(found, in_memory=mode == "memory" and size <= t.cache_memory_gb * GB)
