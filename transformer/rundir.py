"""The run folder: config, command, logs, best student, and the resumable checkpoint (written atomically)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import torch

from transformer.config import RunConfig, incompatible_fields, run_name
from transformer.model import BertForGlue, CheckpointError, save_bert

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = "checkpoint.pt"


class RunError(RuntimeError):
    """A run folder or training problem the user must act on; the message is one line."""


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # readers never see half a file


def run_folder(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_root) / cfg.data.task / (cfg.train.run_name or run_name(cfg))


def check_run_folder(path: Path, cfg: RunConfig) -> bool:
    """Decide what to do with an existing folder; True = resume from its checkpoint.

    A finished run is refused unless --train.overwrite; a checkpoint from the same config is resumed
    (unless --no-train.resume); one from a different config is refused; anything else starts afresh.
    """
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise RunError(f"cannot write the run folder {path}: {probe} is not a writable folder")
    if not path.exists() or cfg.train.overwrite:
        return False
    if (path / "result.json").exists():
        raise RunError(f"{path} already holds a finished run (pass --train.overwrite to replace it)")
    if not (cfg.train.resume and (path / CHECKPOINT).exists()):
        return False
    try:
        saved = RunConfig.from_dict(json.loads((path / "run_config.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise RunError(f"{path}/run_config.json is unreadable ({e}); pass --train.overwrite to start afresh") from None
    diff = incompatible_fields(saved, cfg)
    if diff:
        raise RunError(f"{path} holds a run with a different config ({', '.join(diff[:4])}); "
                       "pass --train.overwrite to replace it or --train.run_name to start another")
    return True


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: the previous checkpoint stays in place until the new one is completely written."""
    tmp = path / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path / CHECKPOINT)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path / CHECKPOINT, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or corrupt file: one line, not a pickle traceback
        raise CheckpointError(f"{path / CHECKPOINT} is corrupt or truncated ({type(e).__name__}); "
                              "pass --train.overwrite to start the run afresh") from None


class RunDir:
    """Everything a run writes: run_config.json, command.txt, git_sha.txt, metrics.jsonl, tb/, best.json,
    result.json, checkpoint.pt, and the student (HF format: config.json, model.safetensors, tokenizer files).
    resume_step: continue an existing folder, dropping log records after that step."""

    def __init__(self, path: Path, cfg: RunConfig, command: list[str], resume_step: int | None = None):
        self.path = path
        if resume_step is None:
            if path.exists():
                shutil.rmtree(path)  # an unfinished or overwritten run: start clean so no stale file survives
            path.mkdir(parents=True)
            write_json(path / "run_config.json", cfg.to_dict())
            (path / "command.txt").write_text(" ".join(command) + "\n")
            (path / "git_sha.txt").write_text(git_sha() + "\n")
        else:
            log = path / "metrics.jsonl"
            kept = [l for l in log.read_text().splitlines() if json.loads(l)["step"] <= resume_step] if log.exists() else []
            log.write_text("".join(l + "\n" for l in kept))
            with open(path / "command.txt", "a") as f:
                f.write(f"# resumed at step {resume_step}: " + " ".join(command) + "\n")
        self._jsonl = open(path / "metrics.jsonl", "a")
        self._tb = None
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(path / "tb"), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def save_model(self, model: BertForGlue, tokenizer, extra_config: dict, subfolder: str = "") -> None:
        """Save the student (HF format) into the run folder, or into <run>/<subfolder>."""
        tmp = self.path / ".saving"
        shutil.rmtree(tmp, ignore_errors=True)
        save_bert(model, tmp, extra_config)
        tokenizer.save_pretrained(str(tmp))
        target = self.path / subfolder
        target.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, target / f.name)
        tmp.rmdir()

    def write(self, name: str, obj) -> None:
        write_json(self.path / name, obj)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
