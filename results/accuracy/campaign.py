#!/usr/bin/env python
"""The runs behind results/accuracy/README.md, resumable: a finished run is skipped, an interrupted one resumed.

    GLUE_DIR=../shared/data/glue PYTHON=.venv/bin/python .venv/bin/python results/accuracy/campaign.py [--jobs 2]
    ... --list                      print the queue and what is finished, run nothing
    ... --tasks cola --seeds 42     a slice of the queue

Every run is a launcher call (run_kd_qat_*.sh, run_TI_step_{1,2}.sh, run_kd_qat_small.sh) with
`--train.threads 1 --train.precision bf16 --train.seed S`, into output/<task>/<default run name>. The queue is
ordered so the most informative rows finish first: the STS-B, CoLA and RTE teachers, then STS-B and CoLA seed by
seed (42, 52, 62; every row), then SST-2 (and any other task present) the same way. A finished run's small files
(config, command, metrics, result; no weights) are copied to results/accuracy/runs/<task>/<run name>/, which
results/accuracy/summarise.py reads. Rerun this script to continue; rows added meanwhile join the queue.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import utils_glue  # noqa: E402  (the repository is not a package)

HERE = Path(__file__).resolve().parent
PYTHON = os.environ.get("PYTHON", sys.executable)
QUICK_TASKS = ("sts-b", "cola")  # the table's tasks are these, SST-2 and any other GLUE folder present
TEACHER_ONLY_TASKS = ("rte",)  # a fine-tuned MiniLM stays near chance there: KD effects cannot show
SEEDS = (42, 52, 62)
# the CoLA TI comparison needs dev every 20 steps and the table the published every 50: every 10 gives both
# (evaluating more often does not change training; summarise.py reads each protocol's subset)
DENSE_EVAL = {"cola": ("--train.eval_every", "10")}
KEEP = ("run_config.json", "command.txt", "git_sha.txt", "metrics.jsonl", "result.json", "best.json", "teacher_eval.json")


@dataclass(frozen=True)
class Row:
    """A table row: the launcher calls of one run (TI-G: step 1 then step 2)."""
    name: str
    calls: tuple[tuple[str, ...], ...]


def rows_for(task: str) -> list[Row]:
    dense = DENSE_EVAL.get(task, ())
    small = [Row("small", (("run_kd_qat_small.sh", task),))] if (REPO / "run_kd_qat_small.sh").is_file() else []
    return [
        Row("baseline", (("run_kd_qat_baseline.sh", task, *dense),)),
        *small,  # the recommended recipe second: the two rows the targets compare
        Row("map", (("run_kd_qat_map.sh", task),)),
        Row("output", (("run_kd_qat_output.sh", task),)),
        # L_map + γ·L_output with γ = 1: the published table's "map + output" row (no γ sweep yet)
        Row("unified", (("run_kd_qat_exploration.sh", task, "base", "1", "1"),)),
        Row("ti-g", (("run_TI_step_1.sh", task, *dense), ("run_TI_step_2.sh", task, "gradual", *dense))),
    ]


@dataclass(frozen=True)
class Job:
    task: str
    row: str  # "teacher" or a Row name
    seed: int | None
    calls: tuple[tuple[str, ...], ...]

    @property
    def label(self) -> str:
        return f"{self.task}/{self.row}" + (f"/s{self.seed}" if self.seed is not None else "")


def common_flags(seed: int | None) -> list[str]:
    glue = os.environ.get("GLUE_DIR")
    return [*(["--data.glue_dir", glue] if glue else []), "--train.threads", "1", "--train.precision", "bf16",
            *(["--train.seed", str(seed)] if seed is not None else [])]


def launcher_cmd(call: tuple[str, ...], seed: int | None) -> list[str]:
    script, *args = call
    if script == "run_kd_qat_exploration.sh":  # TASK MODEL MAP OUTPUT [SEED]: its seed is positional
        return ["bash", script, *args, str(seed), *common_flags(None)]
    return ["bash", script, *args, *common_flags(seed)]


def queue(tasks: list[str], seeds: list[int]) -> list[Job]:
    """Quick tasks (STS-B, CoLA) first, seed by seed, then every other task's teacher and rows (SST-2: 6,315 steps a
    run, 12× STS-B's)."""
    def teacher(t):
        return Job(t, "teacher", None, (("quant_task_glue.py", t, "--teacher-only"),))
    quick = [t for t in QUICK_TASKS if t in tasks]  # STS-B first: the shortest runs and the recipe's main target
    jobs = [teacher(t) for t in quick + [t for t in tasks if t in TEACHER_ONLY_TASKS]]
    for group in (quick, [t for t in tasks if t not in QUICK_TASKS and t not in TEACHER_ONLY_TASKS]):
        jobs += [teacher(t) for t in group if t not in quick]
        for seed in seeds:
            for task in group:
                jobs += [Job(task, r.name, seed, r.calls) for r in rows_for(task)]
    return jobs


def folders(job: Job) -> list[Path]:
    """The run folder of each call, from the launcher's own --dry-run (so names are the CLI's, never rebuilt here)."""
    out = []
    for call in job.calls:
        if call[0] == "quant_task_glue.py":
            continue
        r = subprocess.run([*launcher_cmd(call, job.seed), "--dry-run"], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "PYTHON": PYTHON})
        if r.returncode != 0:
            raise SystemExit(f"{job.label}: --dry-run failed:\n{r.stderr[-2000:]}")
        out.append(REPO / json.loads(r.stdout)["run_folder"])
    return out


def finished(folder: Path) -> bool:
    return (folder / "result.json").is_file()


print_lock = threading.Lock()


def say(msg: str) -> None:
    with print_lock:
        print(time.strftime("%H:%M:%S"), msg, flush=True)


def run_job(job: Job, logs: Path) -> bool:
    for i, call in enumerate(job.calls):
        cmd = [PYTHON, *call, *common_flags(None)] if call[0] == "quant_task_glue.py" else launcher_cmd(call, job.seed)
        folder = None if call[0] == "quant_task_glue.py" else folders(Job(job.task, job.row, job.seed, (call,)))[0]
        if folder is not None and finished(folder):
            keep_call(job, i, folder)
            continue
        log = logs / f"{job.label.replace('/', '_')}_{i + 1}.log"
        say(f"start {job.label} ({i + 1}/{len(job.calls)}): {' '.join(cmd)}")
        t0 = time.time()
        with open(log, "w") as f:
            r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHON": PYTHON})
        if r.returncode == 130:  # interrupted (Ctrl-C reaches the whole process group): its checkpoint is kept
            raise Interrupted(job.label)
        if r.returncode != 0:
            say(f"FAILED {job.label} (exit {r.returncode}); log: {log}")
            return False
        say(f"done {job.label} ({i + 1}/{len(job.calls)}) in {time.time() - t0:.0f} s")
        if folder is not None:
            keep_call(job, i, folder)
    if job.row == "teacher":
        keep_teacher(job.task)
    return True


def keep_teacher(task: str) -> None:
    """The teacher's finetune.json (dev score, steps, wall time, command) as results/accuracy/teachers/<task>.json."""
    found = REPO / "models" / task / "finetune.json"
    if found.is_file():
        (HERE / "teachers").mkdir(exist_ok=True)
        shutil.copy2(found, HERE / "teachers" / f"{task}.json")


def keep_call(job: Job, index: int, folder: Path) -> None:
    """Copy a finished run's small files, with which row, seed and step of the campaign it is."""
    dest = HERE / "runs" / job.task / folder.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        if (folder / name).is_file():
            shutil.copy2(folder / name, dest / name)
    (dest / "campaign.json").write_text(json.dumps({"task": job.task, "row": job.row, "seed": job.seed,
                                                    "call": index + 1, "calls": len(job.calls)}, indent=2) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(utils_glue.TASK_NAMES), help="default: every GLUE task present")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--rows", nargs="+", help="only these rows (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (each one CPU thread)")
    p.add_argument("--list", action="store_true", help="print the queue with what is finished and exit")
    args = p.parse_args()
    glue = Path(os.environ.get("GLUE_DIR") or utils_glue.default_glue_dir())
    tasks = [t for t in args.tasks if (glue / utils_glue.get_task(t).folder).is_dir()]  # absent tasks: skipped
    jobs = [j for j in queue(tasks, args.seeds) if not args.rows or j.row in args.rows or j.row == "teacher"]
    if args.list:
        for j in jobs:
            state = "teacher" if j.row == "teacher" else \
                " ".join("done" if finished(f) else "todo" for f in folders(j))
            print(f"{j.label:24s} {state}")
        return 0
    logs = REPO / "output" / "accuracy_logs"
    logs.mkdir(parents=True, exist_ok=True)
    first = [j for j in jobs if j.row == "teacher" and j.task in (*QUICK_TASKS, *TEACHER_ONLY_TASKS)]
    with ThreadPoolExecutor(args.jobs) as pool:  # those teachers first, so two runs of a task never wait on one
        ok = all(list(pool.map(lambda j: run_job(j, logs), first)))
    picker = Picker(lambda: [j for j in queue(tasks, args.seeds) if j not in first
                             and (not args.rows or j.row in args.rows or j.row == "teacher")])
    workers = [threading.Thread(target=picker.work, args=(logs,)) for _ in range(args.jobs)]
    for w in workers:
        w.start()
    for w in workers:
        while w.is_alive():
            try:
                w.join()
            except KeyboardInterrupt:  # the runs got it too and stop at a checkpoint; wait for them
                picker.stopped = True
    if picker.stopped:
        return 130
    ok = ok and not picker.failed
    say("campaign finished" if ok else f"campaign finished; failed: {', '.join(picker.failed)} (rerun to retry)")
    return 0 if ok else 1


class Interrupted(Exception):
    """A run stopped by Ctrl-C: no worker takes another job."""


class Picker:
    """Hands each worker the first job of a freshly built queue that is neither finished nor taken, so rows added
    while the campaign runs (a new launcher, e.g. run_kd_qat_small.sh) join it in their place."""
    def __init__(self, make_queue):
        self.make_queue, self.lock = make_queue, threading.Lock()
        self.taken: set[str] = set()
        self.done: set[str] = set()
        self.failed: list[str] = []
        self.stopped = False

    def next(self) -> Job | None:
        with self.lock:
            for job in self.make_queue():
                if job.label in self.taken or job.label in self.done:
                    continue
                if job.row != "teacher" and all(finished(f) for f in folders(job)):
                    self.done.add(job.label)
                    keep_finished(job)
                    continue
                self.taken.add(job.label)
                return job
            return None

    def work(self, logs: Path) -> None:
        while not self.stopped and (job := self.next()) is not None:
            try:
                if not run_job(job, logs):
                    self.failed.append(job.label)
            except Interrupted:
                self.stopped = True
                say(f"interrupted in {job.label}: rerun the campaign to resume it")


def keep_finished(job: Job) -> None:
    for i, call in enumerate(job.calls):
        keep_call(job, i, folders(Job(job.task, job.row, job.seed, (call,)))[0])


if __name__ == "__main__":
    sys.exit(main())
