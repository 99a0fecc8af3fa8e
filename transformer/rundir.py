"""The run folder: config, command, logs, best student, and the resumable checkpoint (written atomically)."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import torch

from transformer.config import RunConfig, incompatible_fields, run_name
from transformer.model import BertForGlue, CheckpointError, load_bert, save_bert
from transformer.quant import LEARNED_CLIPS, learned_clips, load_learned_clips, quantize_model

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = "checkpoint.pt"


class RunError(RuntimeError):
    """A run folder or training problem the user must act on; the message is one line."""


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def git_changes() -> list[str]:
    """The tracked files that differ from HEAD (what "-dirty" in git_sha() stands for), as `git status` paths."""
    try:
        return [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return []


def git_sha() -> str:
    try:
        sha = _git("rev-parse", "HEAD").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if git_changes() else "")


CHANGED = "  changed: "  # git_sha.txt: the line after a dirty sha
RESUMED = "# resumed at step "  # git_sha.txt and command.txt: a resume's entry


def code_version() -> str:
    """A git_sha.txt entry: git_sha() and, when dirty, a second line "  changed: <paths>" (a results/ file edited
    while a campaign runs leaves the code as committed; an edited .py does not)."""
    changes = git_changes()
    return git_sha() + (f"\n{CHANGED}{', '.join(changes)}" if changes else "")


def code_versions(text: str) -> list[dict]:
    """A run's git_sha.txt (code_version at its start and at each resume) as [{"sha", "changed"}]: changed is the
    tracked files that differed from the commit, [] for a clean one, None where a dirty run did not record them."""
    entries = []
    for line in text.splitlines():
        if line.startswith(CHANGED):
            entries[-1]["changed"] = line.removeprefix(CHANGED).split(", ")
        elif line.strip():
            sha = line.split(": ", 1)[1] if line.startswith(RESUMED) else line.strip()
            entries.append({"sha": sha, "changed": None if sha.endswith("-dirty") else []})
    return entries


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # readers never see half a file


def run_folder(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_root) / cfg.data.task / (cfg.train.run_name or run_name(cfg))


LOCK = ".lock"


class FolderLock:
    """An exclusive lock on a folder while one process works in it, held with flock on `<folder>/.lock` (inside=True:
    a run folder, which a fresh run empties except for this file) or `<parent>/.<name>.lock` beside it (a teacher
    folder, which must stay empty until the teacher is renamed into place). The kernel drops a flock when its holder
    exits, however it exits (SIGKILL included), so a lock file left by a killed process is stale and simply taken
    over; the file holds the holder's pid and host for the message to whoever is refused."""

    def __init__(self, folder: Path, what: str = "run folder", inside: bool = True):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK if inside else self.folder.parent / f".{self.folder.name}.lock"
        self._fd: int | None = None
        self._made: list[Path] = []  # folders acquire() created, removed again (if empty) on release

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def held(self) -> bool:
        """Whether a live process holds this lock now (a probe: takes nothing)."""
        try:
            with open(self.path) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(f, fcntl.LOCK_UN)
        except FileNotFoundError:
            pass
        return False

    def acquire(self, wait: bool = False) -> FolderLock:
        """Take the lock; refused with a RunError naming the folder and the holder (or, with wait, block until free)."""
        missing = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._made = missing  # deepest first
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                self._remove_made()
                raise RunError(f"{self.folder} is in use by another process ({self.holder()}): wait for it to finish, "
                               "or stop it; a killed process holds no lock") from None
            try:  # the holder before us may have removed the file while we waited: lock the file that is there now
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # still holding it: whoever opens the old file next retries (above)
            os.close(self._fd)
            self._fd = None
            self._remove_made()

    def _remove_made(self) -> None:
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote into it
                break
        self._made = []

    def __enter__(self) -> FolderLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable(path: Path) -> None:
    """The folder, or its deepest existing parent, must be a writable folder."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise RunError(f"cannot write the run folder {path}: {probe} is not a writable folder")


def check_run_folder(path: Path, cfg: RunConfig) -> bool:
    """Decide what to do with an existing folder; True = resume from its checkpoint.

    A finished run is refused unless --train.overwrite; a checkpoint from the same config is resumed
    (unless --no-train.resume); one from a different config is refused; anything else starts afresh.
    """
    check_writable(path)
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
            path.mkdir(parents=True, exist_ok=True)
            for child in path.iterdir():  # an unfinished or overwritten run: start clean so no stale file survives
                if child.name != LOCK:  # (the lock of this very process)
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            write_json(path / "run_config.json", cfg.to_dict())
            (path / "command.txt").write_text(" ".join(command) + "\n")
            (path / "git_sha.txt").write_text(code_version() + "\n")
        else:
            log = path / "metrics.jsonl"
            kept = [l for l in log.read_text().splitlines() if json.loads(l)["step"] <= resume_step] if log.exists() else []
            log.write_text("".join(l + "\n" for l in kept))
            with open(path / "command.txt", "a") as f:
                f.write(f"{RESUMED}{resume_step}: " + " ".join(command) + "\n")
            with open(path / "git_sha.txt", "a") as f:  # a later session's code runs the rest of the steps
                f.write(f"{RESUMED}{resume_step}: {code_version()}\n")
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
        clips = learned_clips(model)  # PACT clips are no HF tensor: a small JSON beside the weights
        save_bert(model, tmp, extra_config, frozenset(f"{name}.clip" for name in clips))
        if clips:
            write_json(tmp / LEARNED_CLIPS, clips)
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


# ---------------------------------------------------------------------------------------------
# Reading a finished run back (analysis and --evaluate use these, not the trainer)

def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None


def load_run(path: str | Path) -> tuple[BertForGlue, RunConfig]:
    """A saved student with its quantizers, as trained (latent FP weights + run_config.json); any student shape."""
    path = Path(path)
    if not (path / "run_config.json").is_file():
        raise RunError(f"{path}: no run_config.json (not a run folder of quant_task_glue.py)")
    cfg = RunConfig.from_dict(json.loads((path / "run_config.json").read_text()))
    model = quantize_model(load_bert(path), cfg.quant)
    if cfg.quant.act_learned_clip:
        if not (path / LEARNED_CLIPS).is_file():
            raise RunError(f"{path}: trained with --quant.act_learned_clip but has no {LEARNED_CLIPS}")
        load_learned_clips(model, json.loads((path / LEARNED_CLIPS).read_text()), f"{path}: ")
    return model, cfg
