#!/usr/bin/env python
"""The runs behind results/accuracy/README.md, resumable: a finished run is skipped, an interrupted one resumed.

    GLUE_DIR=../shared/data/glue PYTHON=.venv/bin/python .venv/bin/python results/accuracy/campaign.py [--jobs 2]
    ... --list                      print the queue and what is done, busy (held by a live run) or todo
    ... --tasks cola --seeds 42     a slice of the queue
    ... --collect                   copy the finished runs' small files to results/accuracy/runs/, run nothing
    ... --deadline 23:40            prefer runs expected to finish by then (estimate_s); stop all there at a checkpoint

Every run is a launcher call (run_kd_qat_*.sh, run_TI_step_{1,2}.sh, run_kd_qat_small.sh) with
`--train.threads 1 --train.precision fp32 --train.seed S`, into output/<task>/<default run name>. The queue is
ordered so the most informative rows finish first: the STS-B, CoLA and RTE teachers, then STS-B and CoLA tier by
tier (TIERS: baseline, recipe and map; TI-G; output and the unified γ sweep), each for seeds 42, 52, 62; then the
recipe's candidates (CANDIDATES) on both tasks' three seeds (SCREENED_OUT: seed 42 only), which settle the recipe
before SST-2 uses it; then SST-2 (and any other task present): its teacher and first tier; then the single-lever
ablations on seed 42 (a screen); then the rest of the candidates and ablations on seeds 52 and 62; then SST-2's
other rows (no sweep of its own: its unified form is the one the STS-B and CoLA sweeps agree on best,
`pooled_form`). A finished run's small files (config, command, metrics, result; no weights) are copied to
results/accuracy/runs/<task>/<run name>/, which results/accuracy/summarise.py reads. Rerun this script to
continue; a run folder another live process holds is left to it. A run whose committed copy is there counts as
finished on any machine (a fresh one has no output/), and a task's teacher (models/ is not committed either) is made
only while the task has unfinished runs or, for a teacher-only task, no committed dev score.

Memory: a run reads its teacher's tensors from a memory-mapped disk cache (cache/teacher/, one per tensor set). SST-2's
are large: 14 GB for baseline or map (hidden states + scores or probabilities), 22 GB with attention outputs (output,
TI). On a 24 GiB machine two SST-2 runs at once (--jobs 2, or two campaigns) evict each other's pages. With the plain
np.memmap both ran ~4x slower (48% I/O wait, measured 2026-12-07). Since the cache maps its files for random access
(transformer/teacher_cache.py), two SST-2 runs reading the one 22 GB cache (TI-G step 2 beside unified) ran at 1.0 it/s
each, 2.0 together, against 1.3-1.5 it/s for one alone, with 2-10% I/O wait (measured 2026-12-07 evening): worth two
jobs. Two runs on different SST-2 caches (14 + 22 GB) have not been measured since.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import utils_glue  # noqa: E402  (the repository is not a package)
from transformer.rundir import FolderLock  # noqa: E402

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


# The unified row's form and γ: a one-seed sweep of both published forms (SPEC: one coefficient 1, the other γ),
# run as part of the seed-42 block; seeds 52 and 62 then run the sweep's winner (best dev), which is also the
# seed-42 entry (selected on that seed, so its seed-42 score is optimistic; the other two are not).
GAMMAS = ("0.1", "0.5", "0.9")
FORMS = tuple(("1", g) for g in GAMMAS) + tuple((g, "1") for g in GAMMAS)  # (map_coeff, output_coeff)
SWEEP_SEED = 42


def unified_call(task: str, form: tuple[str, str]) -> tuple[str, ...]:
    return ("run_kd_qat_exploration.sh", task, "base", *form)


def rows_for(task: str, seed: int) -> list[Row]:
    dense = DENSE_EVAL.get(task, ())
    small = [Row("small", (("run_kd_qat_small.sh", task),))] if (REPO / "run_kd_qat_small.sh").is_file() else []
    quick = task in QUICK_TASKS
    unified = [Row(f"sweep-map{m}-out{o}", (unified_call(task, (m, o)),)) for m, o in FORMS] \
        if quick and seed == SWEEP_SEED else []
    form = chosen_form(task) if quick else pooled_form()
    if form is not None:  # known once the sweep(s) have finished
        unified.append(Row("unified", (unified_call(task, form),)))
    rows = [
        Row("baseline", (("run_kd_qat_baseline.sh", task, *dense),)),
        *small,  # the recommended recipe second: the two rows the targets compare
        Row("map", (("run_kd_qat_map.sh", task),)),
        Row("output", (("run_kd_qat_output.sh", task),)),
        *unified,
        Row("ti-g", (("run_TI_step_1.sh", task, *dense), ("run_TI_step_2.sh", task, "gradual", *dense))),
    ]
    if not quick:  # the single-lever ablations are on STS-B and CoLA
        return rows
    return rows + [
        # a candidate for the recipe: per-token activation scales on top of it (the recipe drops the ±2.5 clip, so
        # one outlier sets a whole batch tensor's step)
        Row("small+token", (("run_kd_qat_small.sh", task, *LEVERS["token"]),)),
        # and augmented data (TinyBERT and TernaryBERT train small GLUE tasks on it) at the recipe's step count
        Row("small+aug", (("run_kd_qat_small.sh", task, *aug_flags(task)),)),
        # and twice its steps: its dev curves still rise over the last epochs (XTC trains 18 epochs)
        Row("small+12ep", (("run_kd_qat_small.sh", task, "--train.epochs", "12"),)),
        *(Row(f"map+{k}", (("run_kd_qat_map.sh", task, *flags),)) for k, flags in LEVERS.items()),
        Row("map+aug", (("run_kd_qat_map.sh", task, *aug_flags(task), "--optim.lr", "5e-5"),)),
        # TinyBERT's two stages through the general-distillation schedule: the encoder with rep + attn_map, then the
        # head (pooler + classifier) with pred for the last quarter of the budget (docs/algorithms.md §7)
        Row("map+twostage", tuple(("run_kd_qat_map.sh", task, "--distill.schedule", "two_step", "--distill.step", k)
                                  for k in ("1", "2"))),
    ]


def aug_flags(task: str) -> tuple[str, ...]:
    """Train on AUG_DIR's train_aug.tsv for 6 epochs' worth of the original training set (map+long's and the
    recipe's step count; epochs of the 20× larger augmented set would be 20× longer)."""
    return "--data.glue_dir", str(AUG_DIR), "--data.augment", "--train.max_steps", str(long_steps(task))


@functools.cache
def long_steps(task: str) -> int:
    """map+long's step count: 6 epochs of the original training set at the task's batch size."""
    from transformer.config import TASK_DEFAULTS
    from transformer.data import steps_per_epoch
    spec = utils_glue.get_task(task)
    n = len(utils_glue.read_examples(utils_glue.task_dir(glue_dir(), spec), spec, "train"))
    return 6 * steps_per_epoch(n, TASK_DEFAULTS[task].batch_size)


def glue_dir() -> Path:
    return Path(os.environ.get("GLUE_DIR") or utils_glue.default_glue_dir())


augment_lock = threading.Lock()  # two workers starting augmented runs of one task would both write its data


def ensure_augmented(task: str) -> None:
    """AUG_DIR/<task>/train_aug.tsv (and copies of the task's other files), unless it is there already."""
    spec = utils_glue.get_task(task)
    with augment_lock:
        if (REPO / AUG_DIR / spec.folder / "train_aug.tsv").is_file():
            return
        say(f"writing {AUG_DIR / spec.folder / 'train_aug.tsv'} (utils_glue.py augment, teacher models/{task})")
        utils_glue.augment_task(glue_dir(), spec, REPO / "models" / task, REPO / AUG_DIR, seed=42)


def sweep_scores(task: str) -> dict[tuple[str, str], float] | None:
    """Best dev score of each (map, output) form of the task's seed-42 sweep (NaN: -inf); None until all finished."""
    scores = {}
    for form in FORMS:
        result = result_of(task, folder_of(unified_call(task, form), SWEEP_SEED))
        if result is None:
            return None
        best = json.loads(result.read_text())["best"]
        v = best["metrics"].get(best["select_metric"])
        scores[form] = v if v is not None and math.isfinite(v) else -math.inf
    return scores


def chosen_form(task: str) -> tuple[str, str] | None:
    """The (map, output) coefficients of the task's sweep run with the best dev score, once all of them have finished."""
    scores = sweep_scores(task)
    return None if scores is None else max(FORMS, key=lambda f: scores[f])  # ties: the first form in FORMS


def pooled_form() -> tuple[str, str] | None:
    """The unified form of the other tasks (SST-2: a sweep there would cost six long runs): the form with the least
    total regret (its score below the best form's) over the STS-B and CoLA sweeps present; None until
    those have finished."""
    present = [t for t in QUICK_TASKS if (glue_dir() / utils_glue.get_task(t).folder).is_dir()]
    sweeps = [sweep_scores(t) for t in present]
    if not sweeps or any(s is None for s in sweeps):
        return None
    regret = {f: sum(s[f] - max(s.values()) for s in sweeps) for f in FORMS}  # -inf for a NaN run
    return max(FORMS, key=lambda f: regret[f])


@dataclass(frozen=True)
class Job:
    task: str
    row: str  # "teacher" or a Row name
    seed: int | None
    calls: tuple[tuple[str, ...], ...]

    @property
    def label(self) -> str:
        return f"{self.task}/{self.row}" + (f"/s{self.seed}" if self.seed is not None else "")


# fp32, not bf16: bf16 halves a step on CPUs with AVX512-BF16 / AMX but is ~7× slower per matmul on AVX2-only ones
# (torch's fallback GEMM), and the machine differs between sessions; one precision keeps the table one protocol.
PRECISION = "fp32"
# These teachers were fine-tuned in bf16 before that was known; keeping their flags lets a later session (whose
# machine has no models/) make the same teachers again: two sessions did, bit for bit (results/accuracy/teachers/).
# Other tasks' teachers are fine-tuned in fp32. keep_teacher refuses a teacher that differs from the committed one.
TEACHER_PRECISION = {"sts-b": "bf16", "cola": "bf16", "rte": "bf16"}


def common_flags(seed: int | None, precision: str = PRECISION, with_glue: bool = True) -> list[str]:
    glue = os.environ.get("GLUE_DIR") if with_glue else None
    return [*(["--data.glue_dir", glue] if glue else []), "--train.threads", "1", "--train.precision", precision,
            *(["--train.seed", str(seed)] if seed is not None else [])]


def launcher_cmd(call: tuple[str, ...], seed: int | None) -> list[str]:
    script, *args = call
    # a call with its own data folder (map+aug) does not get GLUE_DIR
    common = common_flags(None if script == "run_kd_qat_exploration.sh" else seed, with_glue="--data.glue_dir" not in args)
    if script == "run_kd_qat_exploration.sh":  # TASK MODEL MAP OUTPUT [SEED]: its seed is positional
        return ["bash", script, *args, str(seed), *common]
    return ["bash", script, *args, *common]


# Single levers on top of the map recipe (the issue's §2 ablations); the small recipe puts some of them together.
LEVERS = {"noclip": ("--no-quant.act_clip",), "pact": ("--quant.act_learned_clip",),
          "emb8": ("--quant.embedding_bits", "8"), "long": ("--train.epochs", "6", "--optim.lr", "5e-5"),
          # long's two halves: at equal steps (6ep vs long: the LR alone), at equal LR (map vs 6ep: the steps alone)
          "6ep": ("--train.epochs", "6"), "lr5e-5": ("--optim.lr", "5e-5"),
          # one activation scale per token (per query row for attention probabilities) instead of per batch tensor:
          # no other sequence's outlier (or padding) coarsens a token's step (docs/algorithms.md §2.3)
          "token": ("--quant.act_granularity", "token")}
# Rows in order of what the targets need first: the recipe against the baseline and map (3 seeds), then the
# TI comparison, then output and unified (TIERS; each runs for every quick task and seed before the next starts); then
# the recipe's candidates (CANDIDATES) on every seed of both quick tasks, except those a seed-42 screen found no better
# (SCREENED_OUT: seed 42 only, the rest with the ablations): they decide the recipe before SST-2's long recipe runs
# use it; then the single-lever ablations on map (LEVER_ROWS).
TIERS = (("baseline", "small", "map"), ("ti-g",), ("output", "unified"))
# each candidate's seeds together: augmentation first (within 1 point on STS-B at the recipe's cost, so it decides the
# default), then 12 epochs (within 1 point too, at twice the cost: 25k steps a run on SST-2), then per-token scales
# (lost on STS-B seed 42; results/accuracy/README.md has the current figures)
CANDIDATES = ("small+aug", "small+12ep", "small+token")
SCREENED_OUT = ("small+token",)
LEVER_ROWS = (*(f"map+{k}" for k in LEVERS), "map+aug", "map+twostage")
# map+aug: `utils_glue.py augment` data (made here once per machine, from the task's teacher, seed 42), trained for
# map+long's step count at its LR, so the two differ only in the data
AUG_DIR = Path("data") / "glue_aug"


def queue(tasks: list[str], seeds: list[int]) -> list[Job]:
    """The teachers; the quick tasks' (STS-B, CoLA) table rows tier by tier, each tier seed by seed; the recipe's
    candidates on every seed (a screened-out one on the first); every other task's teacher and first tier (SST-2:
    6,315 steps a run, 12× STS-B's; the table and the recipe's three-task target need it); the map levers on the
    first seed (a screen); the candidates and levers on the other seeds; then the other tasks' remaining rows."""
    def teacher(t):
        return Job(t, "teacher", None, (("quant_task_glue.py", t, "--teacher-only"),))

    def block(group: list[str], tier: tuple[str, ...], seeds: list[int] = seeds) -> list[Job]:
        return [Job(task, r.name, seed, r.calls) for task in group for seed in seeds for r in rows_for(task, seed)
                if r.name in tier or (r.name.startswith("sweep") and "unified" in tier)]

    def by_row(group: list[str], rows: tuple[str, ...], seeds: list[int]) -> list[Job]:  # a row's seeds together
        # block's order is task, seed, row; a stable sort on (task, row) keeps the seeds in order within a row
        return sorted(block(group, rows, seeds), key=lambda j: (group.index(j.task), rows.index(j.row)))
    quick = [t for t in QUICK_TASKS if t in tasks]  # STS-B first: the shortest runs and the recipe's main target
    others = [t for t in tasks if t not in QUICK_TASKS and t not in TEACHER_ONLY_TASKS]
    jobs = [teacher(t) for t in quick + [t for t in tasks if t in TEACHER_ONLY_TASKS]]
    for tier in TIERS:
        jobs += block(quick, tier)
    kept = tuple(r for r in CANDIDATES if r not in SCREENED_OUT)
    first = by_row(quick, kept, seeds) + by_row(quick, SCREENED_OUT, seeds[:1])
    jobs += first + [teacher(t) for t in others] + block(others, TIERS[0]) + block(quick, LEVER_ROWS, seeds[:1])
    jobs += [j for j in by_row(quick, CANDIDATES, seeds[1:]) if j not in first] + block(quick, LEVER_ROWS, seeds[1:])
    for tier in TIERS[1:]:
        jobs += block(others, tier)
    return jobs


def folders(job: Job) -> list[Path]:
    """The run folder of each launcher call of a job (the teacher call has none)."""
    return [folder_of(call, job.seed) for call in job.calls if call[0] != "quant_task_glue.py"]


@functools.cache
def dry_run(call: tuple[str, ...], seed: int | None) -> dict:
    """The launcher's own --dry-run: run folder and resolved config (so nothing is rebuilt here)."""
    r = subprocess.run([*launcher_cmd(call, seed), "--dry-run"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHON": PYTHON})
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(call)} (seed {seed}): --dry-run failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout)


def folder_of(call: tuple[str, ...], seed: int | None) -> Path:
    """A launcher call's run folder, named by the CLI."""
    return REPO / dry_run(call, seed)["run_folder"]


# ---------------------------------------------------------------------------------------------
# Wall-time estimates, so that a campaign given --deadline prefers runs that can finish before it (a run stopped there
# resumes in the next session only where output/ is kept; a fresh machine starts it again)

CALL_OVERHEAD_S = 90.0  # per launcher call: teacher and data loading, the final evaluation and saving
MARGIN = 1.15
# A job without history (a new task's teacher or first runs) is taken to need this long: SST-2's are 12× STS-B's
# steps, so one is not preferred near the deadline over a run that can finish
UNKNOWN_JOB_S = 2 * 3600.0
# A run expected to take longer than this (a session's time for runs, after set-up and the closing checks) fits no
# session's deadline: waiting for an emptier session gains nothing, so it starts in its place in the queue and
# deadlines stop it at checkpoints (SST-2's recipe: ~3 h). Without this it would start only once nothing else fits.
SESSION_S = 150 * 60.0


@functools.cache
def train_examples(task: str, augment: bool) -> int:
    spec = utils_glue.get_task(task)
    folder = REPO / AUG_DIR / spec.folder if augment else utils_glue.task_dir(glue_dir(), spec)
    return len(utils_glue.read_examples(folder, spec, "train_aug" if augment else "train"))


def planned_steps(call: tuple[str, ...], seed: int | None) -> int:
    """Optimizer steps a launcher call runs (TI and two-stage steps: their share of the budget)."""
    from transformer.config import RunConfig
    from transformer.train import step_budget
    cfg = RunConfig.from_dict(dry_run(call, seed)["config"])
    n = cfg.train.max_steps or train_examples(cfg.data.task, cfg.data.augment)  # max_steps: the count is not read
    return step_budget(cfg, n)[0]


def seconds_per_step(task: str, eval_every: int) -> float | None:
    """Median wall seconds per optimizer step of the task's committed runs that evaluate as often (evaluation is a
    large share of a CoLA run), else of all its committed runs; None when the task has none."""
    rates, same = [], []
    for d in (HERE / "runs" / task).glob("*"):
        if not (d / "result.json").is_file() or not (d / "run_config.json").is_file():
            continue
        r = json.loads((d / "result.json").read_text())
        if not r.get("wall_s") or not r.get("steps"):
            continue
        rate = max(0.0, r["wall_s"] - CALL_OVERHEAD_S) / r["steps"]
        rates.append(rate)
        if json.loads((d / "run_config.json").read_text())["train"]["eval_every"] == eval_every:
            same.append(rate)
    return statistics.median(same or rates) if rates else None


def estimate_s(job: Job) -> float | None:
    """Expected wall seconds of the job's unfinished calls at the committed runs' speed (two runs side by side, as they
    were made; another machine can be faster or slower: Picker scales it); None without history (a new task, a
    teacher never made)."""
    if job.row == "teacher":
        kept = HERE / "teachers" / f"{job.task}.json"
        return json.loads(kept.read_text())["wall_s"] if kept.is_file() else None
    if all(done(job.task, f) for f in folders(job)):
        return 0.0
    total = 0.0
    for call in job.calls:  # run_job reruns a call not finished here (a later step needs its weights)
        if finished(folder := folder_of(call, job.seed)):
            continue
        cfg = dry_run(call, job.seed)["config"]
        rate = seconds_per_step(job.task, cfg["train"]["eval_every"] or 0)
        if rate is None:
            return None
        total += CALL_OVERHEAD_S + rate * max(0, planned_steps(call, job.seed) - steps_done(folder))
    return total


def steps_done(folder: Path) -> int:
    """Steps an interrupted run has behind it: the last step its metrics.jsonl logged (after a stop at a checkpoint,
    the checkpoint's step; a run killed without one redoes a few); 0 for a run not started here."""
    if not (folder / "checkpoint.pt").is_file() or not (folder / "metrics.jsonl").is_file():
        return 0
    last = 0
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        try:
            last = max(last, int(json.loads(line).get("step", 0)))
        except (ValueError, TypeError, AttributeError):  # a line cut by the kill
            continue
    return last


def parse_deadline(text: str, now: float | None = None) -> float:
    """`HH:MM` (the next such local time) as a Unix time."""
    now = time.time() if now is None else now
    try:
        h, m = (int(x) for x in text.split(":"))
        t = time.localtime(now)
        at = time.mktime((t.tm_year, t.tm_mon, t.tm_mday, h, m, 0, 0, 0, -1))
    except (ValueError, OverflowError):
        raise SystemExit(f"--deadline {text!r}: expected HH:MM") from None
    return at if at > now else at + 24 * 3600


def teacher_needed(task: str, jobs: list[Job]) -> bool:
    """Whether the campaign must make `task`'s teacher (~15 min a session, as models/ is not committed): some run of
    the task is unfinished, or (a teacher-only task) its dev score is not in results/accuracy/teachers/ yet."""
    runs = [j for j in jobs if j.task == task and j.row != "teacher"]
    if not runs:
        return not (HERE / "teachers" / f"{task}.json").is_file()
    return not all(done(task, f) for j in runs for f in folders(j))


def finished(folder: Path) -> bool:
    """Whether the run in this folder (on this machine) has finished."""
    return (folder / "result.json").is_file()


def result_of(task: str, folder: Path) -> Path | None:
    """A run's result.json: in its run folder or, on a machine without that folder (output/ is not committed), the
    copy under results/accuracy/runs/; None while the run has not finished."""
    for result in (folder / "result.json", HERE / "runs" / task / folder.name / "result.json"):
        if result.is_file():
            return result
    return None


def done(task: str, folder: Path) -> bool:
    return result_of(task, folder) is not None


def busy(folder: Path) -> bool:
    """A run folder some live process holds (another campaign, or a run started by hand): leave it to that process."""
    return FolderLock(folder).held()


print_lock = threading.Lock()
live_lock = threading.Lock()
live: set[subprocess.Popen] = set()  # the runs this campaign has going, for stop_runs


def stop_runs() -> int:
    """Ctrl-C to every run going: each stops after its current step with a checkpoint (a teacher fine-tune, which
    has none, is lost); the next campaign resumes them. Returns how many were asked."""
    with live_lock:
        for p in live:
            p.send_signal(signal.SIGINT)
        return len(live)


def say(msg: str) -> None:
    with print_lock:
        print(time.strftime("%H:%M:%S"), msg, flush=True)


def run_job(job: Job, logs: Path) -> bool:
    for i, call in enumerate(job.calls):
        cmd = [PYTHON, *call, *common_flags(None, TEACHER_PRECISION.get(job.task, PRECISION))] \
            if call[0] == "quant_task_glue.py" else \
            launcher_cmd(call, job.seed)
        folder = None if call[0] == "quant_task_glue.py" else folder_of(call, job.seed)
        if folder is not None and finished(folder):
            keep_call(job, i, folder)
            continue
        if "--data.augment" in call:
            ensure_augmented(job.task)
        log = logs / f"{job.label.replace('/', '_')}_{i + 1}.log"
        say(f"start {job.label} ({i + 1}/{len(job.calls)}): {' '.join(cmd)}")
        t0 = time.time()
        with open(log, "w") as f:
            # its own process group: a Ctrl-C to the campaign's group, or `kill -INT` to the campaign alone, reaches
            # each run once, through stop_runs (two would stop it at once, without a checkpoint)
            r = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHON": PYTHON},
                                 start_new_session=True)
            with live_lock:
                live.add(r)
            try:
                r.wait()
            finally:
                with live_lock:
                    live.discard(r)
        if r.returncode in (130, -signal.SIGINT):  # interrupted (stop_runs): a run's checkpoint is kept
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


# How far a re-made teacher's dev metrics may lie from the committed ones' (absolute, on the 0..1 scale: 0.001 points).
# The same command on the same kind of CPU makes the same teacher bit for bit; another CPU's GEMM kernels (AVX2 vs
# AVX-512 / AMX) sum in another order, which moves the dev metrics in the 7th or 8th digit (seen: STS-B Pearson
# 0.84294304 vs 0.84294310). The students' own fp32 arithmetic differs between such machines in the same way.
TEACHER_TOLERANCE = 1e-5


def keep_teacher(task: str) -> None:
    """The teacher's finetune.json (dev score, steps, wall time, command) as results/accuracy/teachers/<task>.json, once.
    A teacher whose dev scores differ from the committed one's by more than TEACHER_TOLERANCE stops the campaign: the
    table's rows must share it."""
    found = REPO / "models" / task / "finetune.json"
    if not found.is_file():
        return
    kept = HERE / "teachers" / f"{task}.json"
    if kept.is_file():
        old, new = json.loads(kept.read_text())["dev"], json.loads(found.read_text())["dev"]
        diff = max((abs(new[k] - old[k]) for k in old), default=0.0) if old.keys() == new.keys() else math.inf
        if not diff <= TEACHER_TOLERANCE:
            raise SystemExit(f"models/{task} (dev {new}) is not the teacher of the committed runs (dev {old}, "
                             f"{kept}): restore that teacher, or start the task's table afresh (remove {kept} and "
                             f"results/accuracy/runs/{task}/)")
        if diff:
            say(f"models/{task}: dev metrics within {diff:.1e} of the committed teacher's (another CPU's rounding; "
                f"tolerance {TEACHER_TOLERANCE:.0e})")
        return  # the same teacher again: the committed record (command, code version, wall time) stays
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(found, kept)


def keep_call(job: Job, index: int, folder: Path) -> None:
    """Copy a finished run's small files, with which rows (a sweep run can also be the unified row), seed and step of
    the campaign it is."""
    dest = HERE / "runs" / job.task / folder.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        if (folder / name).is_file():
            shutil.copy2(folder / name, dest / name)
    info = dest / "campaign.json"
    rows = json.loads(info.read_text()).get("rows", []) if info.is_file() else []
    info.write_text(json.dumps({"task": job.task, "rows": sorted({*rows, job.row}), "seed": job.seed,
                                "call": index + 1, "calls": len(job.calls)}, indent=2) + "\n")


def interruptible() -> None:
    """Take SIGINT as KeyboardInterrupt again. Started in the background (`nohup ... &`), the shell hands us SIGINT
    ignored, and an ignored signal stays ignored in every child: kill -INT would stop neither the campaign nor a
    teacher fine-tune. A handler is reset to the default in each child, so the runs take stop_runs' SIGINT again."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(utils_glue.TASK_NAMES), help="default: every GLUE task present")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--rows", nargs="+", help="only these rows (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (each one CPU thread)")
    p.add_argument("--deadline", metavar="HH:MM",
                   help="prefer runs expected to finish by then (local time; estimates from the committed runs' wall "
                        "times), and at that time stop every run at a checkpoint, so a session's end cuts none off")
    p.add_argument("--list", action="store_true", help="print the queue with what is finished and exit")
    p.add_argument("--collect", action="store_true",
                   help="copy every finished run of the queue to results/accuracy/runs/ and exit (runs nothing)")
    args = p.parse_args()
    deadline = parse_deadline(args.deadline) if args.deadline else None
    interruptible()
    tasks = [t for t in args.tasks if (glue_dir() / utils_glue.get_task(t).folder).is_dir()]  # absent tasks: skipped

    def selected() -> list[Job]:  # rebuilt for each pick, as rows can join while the campaign runs (Picker)
        return [j for j in queue(tasks, args.seeds) if not args.rows or j.row in args.rows or j.row == "teacher"]
    jobs = selected()
    if args.list:
        todo, total, unknown = 0, 0.0, 0
        for j in jobs:
            state = ("teacher: make" if teacher_needed(j.task, jobs) else "teacher: not needed") if j.row == "teacher" else \
                " ".join("done" if done(j.task, f) else "busy" if busy(f) else "todo" for f in folders(j))
            pending = state != "teacher: not needed" and not state.endswith("done")
            est = estimate_s(j) if pending else None
            est = None if est is None else MARGIN * est
            print(f"{j.label:24s} {state}" + (f"  (~{est / 60:.0f} min)" if est is not None else ""))
            if pending:
                todo, total, unknown = todo + 1, total + (est or 0.0), unknown + (est is None)
        print(f"{todo} job(s) to run: ~{total / 3600:.1f} h at the committed runs' speed, one after another (÷ --jobs "
              f"side by side)" + (f"; {unknown} without an estimate" if unknown else ""))
        return 0
    if args.collect:
        ended = [j for j in jobs if j.row != "teacher" and all(done(j.task, f) for f in folders(j))]
        for j in ended:
            keep_finished(j)
        say(f"collected {len(ended)} finished run(s)")
        return 0
    logs = REPO / "output" / "accuracy_logs"
    logs.mkdir(parents=True, exist_ok=True)
    first = [j for j in jobs if j.row == "teacher" and j.task in (*QUICK_TASKS, *TEACHER_ONLY_TASKS)
             and teacher_needed(j.task, jobs)]
    teachers = Picker(lambda: first)  # those teachers first, so two runs of a task never wait on one
    run_workers(teachers, logs, args.jobs)
    if teachers.stopped:  # a teacher has no checkpoint: rerunning makes it afresh
        say("interrupted while making the teachers: rerun the campaign to continue")
        return 130

    def rest() -> list[Job]:
        jobs = selected()
        return [j for j in jobs if j.row != "teacher" or (j not in first and teacher_needed(j.task, jobs))]
    picker = Picker(rest, deadline)
    timer = threading.Timer(max(0.0, deadline - time.time()), picker.stop_at_deadline) if deadline else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    run_workers(picker, logs, args.jobs)
    if timer is not None:
        timer.cancel()
    if picker.stopped:
        return 130
    failed = teachers.failed + picker.failed
    say(f"campaign finished; failed: {', '.join(failed)} (rerun to retry)" if failed else "campaign finished")
    return 1 if failed else 0


class Interrupted(Exception):
    """A run stopped by Ctrl-C: no worker takes another job."""


class Picker:
    """Hands each worker the first job of a freshly built queue that is neither finished nor taken, so rows added
    while the campaign runs (a new launcher, e.g. run_kd_qat_small.sh) join it in their place. With a deadline, a job
    whose estimate ends after it is passed over for a later, shorter one, unless it is a run longer than any session
    (SESSION_S), which no deadline would ever fit; a job without history counts as
    UNKNOWN_JOB_S (its wall time becomes the history); when no job fits, the first one starts anyway, and the deadline
    stops it at a checkpoint (`stop_at_deadline`). The estimate is `estimate_s` (a resumed run: its remaining steps)
    times this machine's speed relative to the history (the median ratio of wall time to estimate over the jobs this
    campaign has finished; 1 before the first), times MARGIN."""
    def __init__(self, make_queue, deadline: float | None = None):
        self.make_queue, self.lock, self.deadline = make_queue, threading.Lock(), deadline
        self.taken: set[str] = set()
        self.done: set[str] = set()
        self.too_long: set[str] = set()
        self.ratios: list[float] = []  # wall time / estimate_s of the jobs finished here
        self.failed: list[str] = []
        self.stopped = False

    def fits(self, job: Job) -> bool:
        if self.deadline is None:
            return True
        est = self.expected_s(job)
        est = UNKNOWN_JOB_S if est is None else est
        if time.time() + est <= self.deadline or (job.row != "teacher" and est > SESSION_S):  # a teacher: no checkpoint
            return True
        if job.label not in self.too_long:
            self.too_long.add(job.label)
            say(f"not starting {job.label}: ~{est / 60:.0f} min, {(self.deadline - time.time()) / 60:.0f} min left "
                f"before the deadline")
        return False

    def next(self) -> Job | None:
        with self.lock:
            first = None  # the first job anyone could start: taken past the deadline when no job fits before it
            for job in self.make_queue():
                if job.label in self.taken or job.label in self.done:
                    continue
                if job.row != "teacher":
                    runs = folders(job)
                    if all(done(job.task, f) for f in runs):
                        self.done.add(job.label)
                        keep_finished(job)
                        continue
                    if any(busy(f) for f in runs):  # looked at again when the queue is next rebuilt
                        continue
                first = first or job
                if not self.fits(job):
                    continue
                self.taken.add(job.label)
                return job
            if first is None or self.stopped or (self.deadline is not None and time.time() >= self.deadline):
                return None
            # an idle core until the deadline gains nothing: the run stops there at a checkpoint and the next campaign
            # resumes it, where output/ is kept (a run longer than a session gets done this way, e.g. SST-2's recipe)
            say(f"no run fits before the deadline; starting {first.label}, to stop there at a checkpoint")
            self.taken.add(first.label)
            return first

    def stop_at_deadline(self) -> None:
        """At the deadline: no new job, and the runs going stop at a checkpoint (resumed by the next campaign)."""
        self.stopped = True
        say(f"deadline: stopping {stop_runs()} run(s) at a checkpoint; rerun the campaign to resume them")

    def expected_s(self, job: Job) -> float | None:
        est = estimate_s(job)
        return None if est is None else MARGIN * est * (statistics.median(self.ratios) if self.ratios else 1.0)

    def work(self, logs: Path) -> None:
        while not self.stopped and (job := self.next()) is not None:
            try:
                est, t0 = estimate_s(job), time.time()
                # a teacher already in models/ takes a second; part of a resumed run ran before: neither measures
                measured = job.row != "teacher" and not any((f / "checkpoint.pt").is_file() for f in folders(job)
                                                            if not finished(f))
                if not run_job(job, logs):
                    self.failed.append(job.label)
                elif est and measured:
                    with self.lock:
                        self.ratios.append((time.time() - t0) / est)
            except Interrupted:
                self.stopped = True
                say(f"interrupted in {job.label}: rerun the campaign to resume it")
            except Exception:  # a bug or an I/O error in the campaign itself: that job failed, the next one starts
                self.failed.append(job.label)
                say(f"FAILED {job.label} in the campaign:\n{traceback.format_exc()}")


def run_workers(picker: Picker, logs: Path, n: int) -> None:
    """n workers run the picker's jobs until none is left or it is stopped. A Ctrl-C stops the picker and is passed
    on to the runs (in their own process groups, see run_job): each stops after its step with a checkpoint; a second
    Ctrl-C stops them at once."""
    workers = [threading.Thread(target=picker.work, args=(logs,)) for _ in range(n)]
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):
        try:
            # not Thread.join(): Python 3.11 takes a KeyboardInterrupt inside join() as the thread's end (it releases
            # the thread's state lock), so the campaign would exit and leave its runs going
            time.sleep(0.2)
        except KeyboardInterrupt:
            picker.stopped = True
            say(f"Ctrl-C: stopping {stop_runs()} run(s) at a checkpoint (a second Ctrl-C stops them at once)")


def keep_finished(job: Job) -> None:
    """Copy each call's finished run folder on this machine (one already committed from another machine has none)."""
    for i, call in enumerate(job.calls):
        if finished(folder := folder_of(call, job.seed)):
            keep_call(job, i, folder)


if __name__ == "__main__":
    sys.exit(main())
