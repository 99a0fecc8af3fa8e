"""results/accuracy/summarise.py: the published best-dev protocol read off densely evaluated runs, and the TI
steps-to-baseline count, on hand-made evaluation logs."""
import importlib.util
import math

import sys

import pytest

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("summarise", REPO / "results" / "accuracy" / "summarise.py")
summarise = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarise)


def _run(task, row, seed, scores: dict[int, float], call=1, calls=1, final_step=None):
    last = final_step or max(scores)
    return {"task": task, "row": row, "seed": seed, "call": call, "calls": calls,
            "evals": [{"step": s, "eval/mcc": v} for s, v in sorted(scores.items())],
            "result": {"steps": last, "best": {"select_metric": "mcc"}, "final": {"mcc": scores[last]}}}


def test_published_best_reads_only_the_published_evaluation_steps_and_skips_nan():
    # CoLA evaluates every 50 steps in the published protocol; a denser run's best at step 30 does not count
    scores = {10: 0.1, 30: 0.9, 50: float("nan"), 100: 0.4, 110: 0.45, 125: 0.3}
    assert summarise.published_best(_run("cola", "baseline", 42, scores)) == 40.0  # step 100; the last step 125 = 30.0
    assert math.isnan(summarise.published_best(_run("cola", "baseline", 42, {50: float("nan")})))


def test_ti_steps_to_the_baselines_final_score_count_global_steps():
    base = _run("cola", "baseline", 42, {20: 0.1, 40: 0.3, 60: 0.5, 80: 0.45, 100: 0.5})  # final 0.5, first at 60
    step1 = _run("cola", "ti-g", 42, {20: 0.0, 40: 0.1}, call=1, calls=2)             # N1 = 40
    step2 = _run("cola", "ti-g", 42, {10: 0.2, 20: 0.55, 40: 0.6, 60: 0.6}, call=2, calls=2)  # global 50..100
    (c,) = summarise.ti_curves([base, step1, step2]).values()
    assert [(s, round(v, 6)) for s, v in c["ti"]] == [(20, 0.0), (40, 10.0), (60, 55.0), (80, 60.0), (100, 60.0)]
    # (global step 50 is off the 20-step grid)
    assert (c["baseline_steps"], c["ti_steps"], c["speedup"]) == (60, 60, 1.0)
    # smoothed over 2 evaluations: baseline 20 (40), 40 (60), 47.5 (80), 47.5 (100): target 47.5, reached at 80;
    # TI-G 5 (40), 32.5 (60), 57.5 (80), 60 (100): reached at 80
    (c,) = summarise.ti_curves([base, step1, step2], window=2).values()
    assert c["target_smoothed"] == 47.5 and (c["baseline_steps_smoothed"], c["ti_steps_smoothed"]) == (80, 80)
    late = _run("cola", "baseline", 42, {20: 0.1, 40: 0.6, 60: 0.2, 80: 0.45, 100: 0.5})  # one early spike
    (c,) = summarise.ti_curves([late, step1, step2], window=2).values()
    assert (c["baseline_steps"], c["ti_steps"]) == (40, 60)  # the spike reaches the final 50 first
    # smoothed baseline 35 (40), 40 (60), 32.5 (80), 47.5 (100): its spike no longer counts
    assert (c["baseline_steps_smoothed"], c["ti_steps_smoothed"], c["speedup_smoothed"]) == (100, 80, 1.25)
    assert summarise.trailing_means([(20, 1.0), (40, math.nan), (60, 3.0)], 2) == [(40, 1.0), (60, 3.0)]


_cspec = importlib.util.spec_from_file_location("campaign", REPO / "results" / "accuracy" / "campaign.py")
campaign = importlib.util.module_from_spec(_cspec)
sys.modules["campaign"] = campaign  # its dataclasses look their module up there
_cspec.loader.exec_module(campaign)


def test_unified_row_waits_for_the_gamma_sweep_then_takes_its_best_form(tmp_path, monkeypatch):
    import json
    folder = {}
    for form in campaign.FORMS:
        folder[campaign.unified_call("sts-b", form)] = tmp_path / "_".join(form)
    monkeypatch.setattr(campaign, "folder_of", lambda call, seed: folder[call])
    monkeypatch.setattr(campaign, "long_steps", lambda task: 1080)  # reads the training set otherwise

    def finish(form, corr):
        d = folder[campaign.unified_call("sts-b", form)]
        d.mkdir()
        (d / "result.json").write_text(json.dumps({"best": {"select_metric": "corr", "metrics": {"corr": corr}}}))

    names = lambda seed: [r.name for r in campaign.rows_for("sts-b", seed)]
    for form, corr in zip(campaign.FORMS[:-1], (0.70, 0.81, float("nan"), 0.75, 0.80)):
        finish(form, corr)
    assert campaign.chosen_form("sts-b") is None  # one sweep run is still missing
    assert "unified" not in names(52) and "unified" not in names(42)
    assert sum(n.startswith("sweep-") for n in names(42)) == len(campaign.FORMS) and not any(
        n.startswith("sweep-") for n in names(52))
    finish(campaign.FORMS[-1], 0.79)
    assert campaign.chosen_form("sts-b") == ("1", "0.5")  # NaN never wins
    (unified,) = [r for r in campaign.rows_for("sts-b", 62) if r.name == "unified"]
    assert unified.calls == (("run_kd_qat_exploration.sh", "sts-b", "base", "1", "0.5"),)
    assert summarise.sweep_form("sweep-map1-out0.5") == ("1", "0.5")


def test_targets_report_the_recipes_gap_and_paired_differences():
    def cell(best, steps=540, final=None):
        seeds = (42, 52, 62)
        return {"best": dict(zip(seeds, best)), "final": dict(zip(seeds, final or best)), "steps": dict.fromkeys(seeds, steps)}
    t = {"teacher": {"sts-b": 84.5, "cola": 26.4},
         "rows": {"small": {"sts-b": cell([84.0, 83.0, 83.5]), "cola": cell([25.0])},
                  "baseline": {"sts-b": cell([78.0, 77.0])}, "map": {"sts-b": cell([79.0, 76.5, 80.0])},
                  "small+token": {"sts-b": cell([84.5, 83.0])}, "small+12ep": {"sts-b": cell([83.0, 83.5, 83.8], 2160)},
                  "map+noclip": {"sts-b": cell([80.5])}, "map+long": {"sts-b": cell([82.0, 81.0], 1080)},
                  "map+aug": {"sts-b": cell([82.5, 80.0], 1080, final=[81.0, 79.5])}}}
    text = "\n".join(summarise.targets(t))
    assert "`small+token` vs teacher on STS-B: 0.75 points below (2 seed(s), 540 steps); ≤ 1.0 over 3 seeds: open" in text
    assert "`small+12ep` vs teacher on STS-B: 1.07 points below (3 seed(s), 2160 steps); ≤ 1.0 over 3 seeds: not met" in text
    assert "STS-B: 1.00 points below (3 seed(s)); target ≤ 1.0 over 3 seeds: met" in text
    assert "open (missing: sst-2)" in text
    assert "map − baseline on sts-b: +0.25 points over 2 paired seed(s), per-seed differences +1.00, -0.50" in text
    assert "small − baseline on sts-b: +6.00" in text
    assert "small+token − small on sts-b: +0.25 points over 2 paired seed(s), per-seed differences +0.50, +0.00" in text
    assert "map+noclip − map on sts-b: +1.50 points over 1 paired seed(s), per-seed differences +1.50" in text
    assert ("map+aug − map+long on sts-b: -0.25 points over 2 paired seed(s), per-seed differences +0.50, -1.00; "
            "final step -1.25 (-1.00, -1.50)") in text
    t["teacher"]["sst-2"], t["rows"]["small"]["sst-2"] = 88.0, cell([91.0, 92.0, 90.0])  # students above
    t["rows"]["small"]["cola"] = cell([26.0, 25.8, 25.6])
    text = "\n".join(summarise.targets(t))
    assert ("mean over sts-b, cola, sst-2: 0.47 points above (sts-b 1.00 points below, cola 0.60 points below, sst-2 "
            "3.00 points above); target ≤ 1.5 below: met") in text


def test_queue_runs_teachers_then_tier_by_tier_each_over_every_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(campaign, "folder_of", lambda call, seed: tmp_path / "never-finished")
    monkeypatch.setattr(campaign, "long_steps", lambda task: 1080)
    labels = [j.label for j in campaign.queue(["sts-b", "cola", "rte"], [42, 52])]
    assert labels[:3] == ["sts-b/teacher", "cola/teacher", "rte/teacher"]
    assert labels[3:9] == ["sts-b/baseline/s42", "sts-b/small/s42", "sts-b/map/s42",
                           "sts-b/baseline/s52", "sts-b/small/s52", "sts-b/map/s52"]
    assert labels[9] == "cola/baseline/s42" and labels[15] == "sts-b/ti-g/s42"
    assert labels.index("cola/map/s52") < labels.index("sts-b/ti-g/s42") < labels.index("sts-b/output/s42")
    assert "sts-b/sweep-map1-out0.5/s42" in labels and not any("unified" in x for x in labels)  # sweep not done
    assert not any(x.startswith("rte/") and "teacher" not in x for x in labels)  # RTE: teacher row only


def test_a_changed_teacher_stops_the_campaign(tmp_path, monkeypatch):
    import json
    import pytest
    monkeypatch.setattr(campaign, "REPO", tmp_path)
    monkeypatch.setattr(campaign, "HERE", tmp_path / "acc")
    (tmp_path / "models" / "cola").mkdir(parents=True)
    made = tmp_path / "models" / "cola" / "finetune.json"
    made.write_text(json.dumps({"dev": {"mcc": 0.26}}))
    campaign.keep_teacher("cola")  # the first teacher is kept
    assert json.loads((tmp_path / "acc" / "teachers" / "cola.json").read_text())["dev"] == {"mcc": 0.26}
    made.write_text(json.dumps({"dev": {"mcc": 0.26}, "wall_s": 900}))
    campaign.keep_teacher("cola")  # the same teacher made again: fine, and the first record stays
    assert "wall_s" not in json.loads((tmp_path / "acc" / "teachers" / "cola.json").read_text())
    made.write_text(json.dumps({"dev": {"mcc": 0.26 + 3e-8}}))  # another CPU's rounding: the same teacher
    campaign.keep_teacher("cola")
    made.write_text(json.dumps({"dev": {"mcc": 0.2601}}))
    with pytest.raises(SystemExit, match="is not the teacher of the committed runs"):
        campaign.keep_teacher("cola")
    made.write_text(json.dumps({"dev": {"acc": 0.26}}))  # other metrics: not comparable
    with pytest.raises(SystemExit, match="is not the teacher of the committed runs"):
        campaign.keep_teacher("cola")


def test_the_picker_skips_runs_finished_here_or_committed_leaves_busy_ones_and_hands_out_the_first_todo(tmp_path, monkeypatch):
    import json
    from transformer.rundir import FolderLock
    monkeypatch.setattr(campaign, "HERE", tmp_path / "acc")
    monkeypatch.setattr(campaign, "folder_of", lambda call, seed: tmp_path / "out" / f"{call[0]}-s{seed}")
    jobs = [campaign.Job("sts-b", row, 42, ((f"run_kd_qat_{row}.sh", "sts-b"),))
            for row in ("small", "baseline", "map", "output")]
    elsewhere, done, held, _ = (campaign.folder_of(j.calls[0], 42) for j in jobs)
    # finished on another machine: only its committed copy is here (output/ is not committed)
    (tmp_path / "acc" / "runs" / "sts-b" / elsewhere.name).mkdir(parents=True)
    (tmp_path / "acc" / "runs" / "sts-b" / elsewhere.name / "result.json").write_text("{}")
    done.mkdir(parents=True)
    (done / "result.json").write_text("{}")
    (done / "model.safetensors").write_text("weights")  # not one of the small files the table keeps
    lock = FolderLock(held).acquire()  # a live run (another campaign, or a run started by hand) holds it
    try:
        assert campaign.busy(held) and not campaign.busy(done)
        picker = campaign.Picker(lambda: jobs)
        assert picker.next().row == "output"  # small and baseline are finished, map is busy
        assert not elsewhere.exists() and picker.done == {"sts-b/small/s42", "sts-b/baseline/s42"}
        kept = tmp_path / "acc" / "runs" / "sts-b" / done.name
        assert sorted(p.name for p in kept.iterdir()) == ["campaign.json", "result.json"]
        assert json.loads((kept / "campaign.json").read_text())["rows"] == ["baseline"]
        assert picker.next() is None  # map is still held, output is taken
    finally:
        lock.release()
    assert not campaign.busy(held) and picker.next().row == "map"


def test_a_teacher_is_made_only_while_its_task_has_unfinished_runs_or_no_committed_score(tmp_path, monkeypatch):
    monkeypatch.setattr(campaign, "HERE", tmp_path / "acc")
    monkeypatch.setattr(campaign, "folder_of", lambda call, seed: tmp_path / "out" / f"{call[0]}-s{seed}")
    jobs = [campaign.Job("cola", "teacher", None, (("quant_task_glue.py", "cola", "--teacher-only"),)),
            campaign.Job("rte", "teacher", None, (("quant_task_glue.py", "rte", "--teacher-only"),)),
            *(campaign.Job("cola", "map", s, (("run_kd_qat_map.sh", "cola"),)) for s in (42, 52))]
    assert campaign.teacher_needed("cola", jobs) and campaign.teacher_needed("rte", jobs)
    (tmp_path / "acc" / "teachers").mkdir(parents=True)
    (tmp_path / "acc" / "teachers" / "rte.json").write_text("{}")  # RTE's teacher row is committed: not remade
    assert not campaign.teacher_needed("rte", jobs)
    for seed in (42, 52):
        (tmp_path / "out" / f"run_kd_qat_map.sh-s{seed}").mkdir(parents=True)
        (tmp_path / "out" / f"run_kd_qat_map.sh-s{seed}" / "result.json").write_text("{}")
        assert campaign.teacher_needed("cola", jobs) == (seed == 42)  # needed until the last run has finished


def test_a_campaign_started_in_the_background_passes_ctrl_c_on_to_its_runs():
    import subprocess
    child = "import signal; print(signal.getsignal(signal.SIGINT) == signal.default_int_handler)"
    code = (f"import importlib.util, signal, subprocess, sys\n"
            f"signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `cmd &` in a non-interactive shell starts it\n"
            f"spec = importlib.util.spec_from_file_location('campaign', {str(_cspec.origin)!r})\n"
            f"campaign = importlib.util.module_from_spec(spec); sys.modules['campaign'] = campaign\n"
            f"spec.loader.exec_module(campaign)\n"
            f"subprocess.run([sys.executable, '-c', {child!r}])\n"
            f"campaign.interruptible()\n"
            f"subprocess.run([sys.executable, '-c', {child!r}])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), check=True).stdout
    assert out.split() == ["False", "True"]  # ignored before, the default (KeyboardInterrupt) after


def test_table_lists_each_steps_command_once_without_the_checkouts_path(monkeypatch, tmp_path):
    monkeypatch.setattr(summarise, "HERE", tmp_path)  # no committed teachers in the table
    runs = []
    for seed in (52, 42):
        for call in (1, 2):
            r = _run("cola", "ti-g", seed, {20: 0.1, 40: 0.2}, call=call, calls=2)
            cmd = f"{summarise.REPO}/.venv/bin/python quant_task_glue.py cola --ti.step {call} --train.seed {seed}"
            r["command"] = cmd + (f"\n# resumed at step 20: {cmd}" if call == 2 else "")  # as rundir.py appends it
            runs.append(r)
    t, _ = summarise.table(runs)
    assert t["rows"]["ti-g"]["cola"]["commands"] == [
        ".venv/bin/python quant_task_glue.py cola --ti.step 1 --train.seed 42",
        ".venv/bin/python quant_task_glue.py cola --ti.step 2 --train.seed 42"]


def test_with_a_deadline_the_picker_starts_only_runs_its_estimate_fits_in(tmp_path, monkeypatch):
    import json
    import time
    monkeypatch.setattr(campaign, "HERE", tmp_path / "acc")
    # committed history: 2.0 s a step at the published eval interval, 5.0 s evaluating every 10 steps
    for name, every, steps, wall in (("a", 20, 100, 290.0), ("b", 20, 300, 690.0), ("c", 10, 100, 590.0)):
        d = tmp_path / "acc" / "runs" / "sts-b" / name
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"steps": steps, "wall_s": wall}))
        (d / "run_config.json").write_text(json.dumps({"train": {"eval_every": every}}))
    assert campaign.seconds_per_step("sts-b", 20) == 2.0 and campaign.seconds_per_step("sts-b", 10) == 5.0
    assert campaign.seconds_per_step("sts-b", 50) == 2.0  # no run at that interval: the median of all
    assert campaign.seconds_per_step("sst-2", 50) is None
    plan = {"long": (20, 1000), "short": (20, 100), "dense": (10, 100), "new": (20, 100), "ti1": (20, 60), "ti2": (20, 40)}
    monkeypatch.setattr(campaign, "dry_run", lambda call, seed: {"run_folder": str(tmp_path / "out" / call[0]),
                                                                 "config": {"train": {"eval_every": plan[call[0]][0]}}})
    monkeypatch.setattr(campaign, "planned_steps", lambda call, seed: plan[call[0]][1])
    job = lambda name, task="sts-b", calls=None: campaign.Job(task, name, 42, calls or ((name,),))
    assert campaign.estimate_s(job("short")) == campaign.CALL_OVERHEAD_S + 2.0 * 100
    ti = job("ti-g", calls=(("ti1",), ("ti2",)))
    both = 2 * campaign.CALL_OVERHEAD_S + 2.0 * 100
    committed = tmp_path / "acc" / "runs" / "sts-b" / "ti1"
    committed.mkdir()
    (committed / "result.json").write_text("{}")  # step 1 committed from another machine: rerun here for step 2
    assert campaign.estimate_s(ti) == both
    (tmp_path / "out" / "ti1").mkdir(parents=True)
    (tmp_path / "out" / "ti1" / "result.json").write_text("{}")  # step 1 finished here: only step 2 is left
    assert campaign.estimate_s(ti) == campaign.CALL_OVERHEAD_S + 2.0 * 40
    (tmp_path / "out" / "ti2").mkdir()
    (tmp_path / "out" / "ti2" / "checkpoint.pt").write_text("")  # step 2 stopped after step 30 at a checkpoint
    (tmp_path / "out" / "ti2" / "metrics.jsonl").write_text("".join(json.dumps({"step": k, "loss/total": 1.0}) + "\n"
                                                                   for k in range(1, 31)) + '{"step": 3')  # cut line
    assert campaign.steps_done(tmp_path / "out" / "ti2") == 30
    assert campaign.estimate_s(ti) == campaign.CALL_OVERHEAD_S + 2.0 * 10  # the remaining steps only

    jobs = [job("long"), job("dense"), job("short"), job("new", task="sst-2")]
    picker = campaign.Picker(lambda: jobs, deadline=time.time() + 600)  # short ~5.6 min, dense ~11 min, long ~40
    assert picker.next().row == "short"
    assert picker.next().row == "long"  # none fits: the first starts anyway, to stop at the deadline with a checkpoint
    assert picker.too_long == {"sts-b/long/s42", "sts-b/dense/s42", "sst-2/new/s42"}
    assert picker.next().row == "dense"
    picker.deadline = time.time() - 1  # past it: nothing starts
    assert picker.next() is None
    far = campaign.Picker(lambda: jobs[3:], deadline=time.time() + campaign.UNKNOWN_JOB_S + 60)
    assert far.next().row == "new"  # no history: started only with UNKNOWN_JOB_S left
    assert campaign.Picker(lambda: jobs).next().row == "long"  # no deadline: queue order
    plan["long"] = (20, 5000)  # ~3.2 h: longer than any session, so it starts in its place and stops at checkpoints
    assert campaign.Picker(lambda: jobs, deadline=time.time() + 600).next().row == "long"
    plan["long"] = (20, 1000)
    faster = campaign.Picker(lambda: jobs, deadline=time.time() + 600)
    faster.ratios = [0.5, 0.4, 0.9]  # this machine ran the jobs it finished in half the estimated time
    assert faster.next().row == "dense"  # ~5.6 min now
    monkeypatch.setattr(campaign, "run_job", lambda job, logs: True)
    worker = campaign.Picker(lambda: [job("short")])
    worker.work(tmp_path)  # one job, finished at once: its wall time over its estimate is recorded
    assert len(worker.ratios) == 1 and 0 <= worker.ratios[0] < 0.01
    (tmp_path / "out" / "long").mkdir(parents=True)
    (tmp_path / "out" / "long" / "checkpoint.pt").write_text("")  # an interrupted run: resuming it measures nothing
    worker = campaign.Picker(lambda: [job("long")])
    worker.work(tmp_path)
    assert worker.ratios == []


def test_at_the_deadline_the_runs_stop_at_a_checkpoint_and_no_job_starts(tmp_path, monkeypatch):
    import threading
    import time
    monkeypatch.setattr(campaign, "HERE", tmp_path / "acc")
    monkeypatch.setattr(campaign, "folder_of", lambda call, seed: tmp_path / "out" / f"{call[0]}-s{seed}")
    monkeypatch.setattr(campaign, "estimate_s", lambda job: 60.0)
    # a run that, like quant_task_glue.py, takes Ctrl-C as: checkpoint, then exit 130
    run = ("import signal, sys, time\n"
           "signal.signal(signal.SIGINT, lambda *a: (print('checkpoint', flush=True), sys.exit(130)))\n"
           "print('training', flush=True)\ntime.sleep(120)\n")
    monkeypatch.setattr(campaign, "launcher_cmd", lambda call, seed: [sys.executable, "-c", run])
    jobs = [campaign.Job("sts-b", row, 42, ((f"run_kd_qat_{row}.sh", "sts-b"),)) for row in ("map", "output")]
    picker = campaign.Picker(lambda: jobs, deadline=time.time() + 3600)
    worker = threading.Thread(target=picker.work, args=(tmp_path,))
    worker.start()
    log = tmp_path / "sts-b_map_s42_1.log"
    t0 = time.time()
    while "training" not in (log.read_text() if log.is_file() else "") and time.time() - t0 < 60:
        time.sleep(0.05)
    picker.stop_at_deadline()
    worker.join(timeout=60)
    assert not worker.is_alive() and picker.stopped and picker.taken == {"sts-b/map/s42"}  # output never started
    assert log.read_text().split() == ["training", "checkpoint"] and not campaign.live


def test_a_deadline_is_the_next_such_local_time():
    import time
    import pytest
    now = time.mktime((2026, 12, 6, 3, 0, 0, 0, 0, -1))
    assert campaign.parse_deadline("03:45", now) - now == 45 * 60
    assert campaign.parse_deadline("02:00", now) - now == 23 * 3600  # already past today: tomorrow
    with pytest.raises(SystemExit, match="HH:MM"):
        campaign.parse_deadline("in an hour", now)


def test_teacher_agreement_reports_the_largest_distance_of_any_runs_teacher_from_the_committed_one(tmp_path, monkeypatch):
    import json
    monkeypatch.setattr(summarise, "HERE", tmp_path)
    (tmp_path / "teachers").mkdir()
    (tmp_path / "teachers" / "sts-b.json").write_text(json.dumps({"dev": {"pearson": 0.8, "corr": 0.81}}))
    runs = [{"task": "sts-b", "dir": tmp_path / name, "teacher_dev": dev} for name, dev in
            (("a", {"pearson": 0.8, "corr": 0.81}), ("b", {"pearson": 0.8 + 4e-8, "corr": 0.81}),
             ("c", None))]  # c: resumed, no teacher_eval.json
    runs.append({**runs[1]})  # the same run listed under two rows (a sweep run that is also the unified row)
    assert summarise.teacher_agreement(runs) == ["sts-b: 2 runs, max |Δ| 4.0e-08"]


def test_other_tasks_get_the_table_rows_only_their_first_tier_before_the_ablations(tmp_path, monkeypatch):
    monkeypatch.setattr(campaign, "folder_of", lambda call, seed: tmp_path / "never-finished")
    monkeypatch.setattr(campaign, "long_steps", lambda task: 1080)
    labels = [j.label for j in campaign.queue(["sts-b", "cola", "sst-2"], [42, 52])]
    sst = [x for x in labels if x.startswith("sst-2/")]
    assert sst == ["sst-2/teacher", *(f"sst-2/{r}/s{s}" for s in (42, 52) for r in ("baseline", "small", "map")),
                   "sst-2/ti-g/s42", "sst-2/ti-g/s52", "sst-2/output/s42", "sst-2/output/s52"]  # no sweep, no ablations
    at = labels.index
    # the recipe's candidates: every seed before the levers' screen, each row's seeds together; a screened-out one on
    # seed 42 first and its other seeds with the ablations
    assert at("cola/output/s52") < at("sts-b/small+aug/s42") < at("sts-b/small+aug/s52") < at("sts-b/small+12ep/s42")
    assert at("sts-b/small+12ep/s52") < at("cola/small+aug/s42") < at("cola/small+aug/s52") < at("cola/small+12ep/s42")
    assert at("cola/small+12ep/s42") < at("cola/small+12ep/s52") < at("sts-b/small+token/s42") < at("cola/small+token/s42")
    # then SST-2's teacher and first tier (the table's third column), then the levers' seed-42 screen
    assert at("cola/small+token/s42") < at("sst-2/teacher") < at("sst-2/map/s52") < at("sts-b/map+noclip/s42")
    assert at("sts-b/map+noclip/s42") < at("cola/map+twostage/s42") < at("sts-b/small+token/s52") < at("sts-b/map+noclip/s52")
    assert at("sts-b/map+noclip/s52") < at("cola/map+twostage/s52") < at("sst-2/ti-g/s42")
    assert len(labels) == len(set(labels))  # no run queued twice


def test_other_tasks_take_the_unified_form_with_the_least_total_regret_over_both_sweeps(tmp_path, monkeypatch):
    for folder in ("STS-B", "CoLA"):
        (tmp_path / folder).mkdir()
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    a, b, c = campaign.FORMS[:3]
    scores = {"sts-b": {a: 0.80, b: 0.79, c: 0.75}, "cola": {a: 0.20, b: 0.26, c: float("-inf")}}
    scores = {t: {f: s.get(f, 0.0) for f in campaign.FORMS} for t, s in scores.items()}
    monkeypatch.setattr(campaign, "sweep_scores", lambda task: scores[task])
    assert campaign.chosen_form("sts-b") == a and campaign.chosen_form("cola") == b
    assert campaign.pooled_form() == b  # regret: a 0.06, b 0.01, c (a NaN run) never
    (unified,) = [r for r in campaign.rows_for("sst-2", 62) if r.name == "unified"]
    assert unified.calls == ((("run_kd_qat_exploration.sh", "sst-2", "base", *b)),)
    scores["cola"] = None  # CoLA's sweep unfinished: no unified row for SST-2 yet
    assert campaign.pooled_form() is None and "unified" not in [r.name for r in campaign.rows_for("sst-2", 62)]


def test_a_longer_schedule_is_also_read_at_the_shorter_ones_step_count():
    # CoLA's published protocol evaluates every 50 steps; the long run's step-150 and step-200 scores lie past the
    # short run's 100 steps, and its dense step-90 score is off the protocol
    long = _run("cola", "small+12ep", 42, {50: 0.1, 90: 0.9, 100: 0.3, 150: 0.5, 200: 0.6})
    short = _run("cola", "small", 42, {50: 0.2, 100: 0.25})
    long["result"]["wall_s"], short["result"]["wall_s"] = 300.0, 100.0
    assert summarise.published_best(long, budget=100) == 30.0
    (row,) = [x for x in summarise.equal_cost([long, short]) if x.startswith("| cola")]
    assert row == "| cola | small+12ep vs small | 100 | 30.00 (1 seed) | 25.00 (1 seed) | +5.00 | 60.00 (1 seed) | 3.00× |"
    assert summarise.equal_cost([short]) == []  # no pair, no section


def test_two_workers_starting_augmented_runs_of_one_task_write_its_data_once(tmp_path, monkeypatch):
    import threading
    import time
    monkeypatch.setattr(campaign, "REPO", tmp_path)
    calls = []

    def fake_augment(glue_dir, spec, model_dir, out_dir, seed):
        calls.append(spec.name)
        time.sleep(0.2)  # long enough for the other worker to arrive while this one writes
        (out_dir / spec.folder).mkdir(parents=True, exist_ok=True)
        (out_dir / spec.folder / "train_aug.tsv").write_text("x\n")
    monkeypatch.setattr(campaign.utils_glue, "augment_task", fake_augment)
    workers = [threading.Thread(target=campaign.ensure_augmented, args=("cola",)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert calls == ["cola"]


def test_the_recipes_gain_over_map_is_set_against_the_sum_of_its_levers_gains():
    cell = lambda *best: {"best": dict(zip((42, 52, 62), best))}
    t = {"rows": {"map": {"cola": cell(20.0, 21.0, 19.0)}, "small": {"cola": cell(26.0, 25.0)},
                  "map+noclip": {"cola": cell(21.0, 20.0, 19.5)}, "map+emb8": {"cola": cell(19.0, 22.0)},
                  "map+long": {"cola": cell(23.0, 24.0)}, "baseline": {"sts-b": cell(77.0)}}}
    # seeds 42 and 52: noclip +1, -1; emb8 -1, +1; long +3, +3; sum +3, +3; recipe +6, +4
    (row,) = [x for x in summarise.additivity(t) if x.startswith("| cola")]
    assert row == "| cola | 42, 52 | +0.00 | +0.00 | +3.00 | +3.00 | +5.00 | +3.00, +1.00 |"
    del t["rows"]["map+long"]
    assert summarise.additivity(t) == []  # a lever missing: no section



def _flag_pairs(args: list[str]) -> list[tuple[str, ...]]:
    """Command-line words as sorted (flag,) / (flag, value) tuples."""
    return sorted(tuple(args[i:i + 2]) if i + 1 < len(args) and not args[i + 1].startswith("--") else (args[i],)
                  for i in range(len(args)) if args[i].startswith("--"))


def _launcher_args(script: str) -> list[str]:
    """The fixed words a launcher passes to quant_task_glue.py (its exec line, continuation lines joined, no "$@")."""
    import shlex
    text = (REPO / script).read_text().replace("\\\n", " ")
    exec_line = text.split("\nexec ", 1)[1].split("\n", 1)[0]
    return shlex.split(exec_line.split("quant_task_glue.py", 1)[1].replace('"$@"', ""))


def test_the_recipe_launcher_is_the_map_launcher_plus_exactly_the_levers_the_additivity_section_names():
    levers = [a for r in summarise.RECIPE_LEVERS for a in campaign.LEVERS[r.removeprefix("map+")]]
    assert _flag_pairs(_launcher_args("run_kd_qat_small.sh")) == _flag_pairs(_launcher_args("run_kd_qat_map.sh") + levers)


def test_code_versions_name_each_sessions_commit_and_the_files_that_made_it_dirty():
    start = "abc-dirty\n  changed: results/accuracy/README.md\n"
    resumed = start + "# resumed at step 40: def\n"
    assert summarise.code_versions(resumed) == [{"sha": "abc-dirty", "changed": ["results/accuracy/README.md"]},
                                                {"sha": "def", "changed": []}]
    runs = [{"versions": summarise.code_versions(text)} for text in
            (resumed, "abc-dirty\n  changed: transformer/quant.py, results/accuracy/README.md\n", "old-dirty\n", "def\n")]
    line = summarise.code_version_lines(runs)[0]
    assert line.endswith(": `abc-dirty` (changed: results/accuracy/README.md, transformer/quant.py), `def`, "
                         "`old-dirty` (changes not recorded)")


def test_a_run_records_its_code_version_at_the_start_and_at_each_resume(tmp_path, monkeypatch):
    from transformer import rundir
    from transformer.config import RunConfig
    monkeypatch.setattr(rundir, "git_sha", lambda: "abc-dirty")
    monkeypatch.setattr(rundir, "git_changes", lambda: ["results/x.md"])
    cfg = RunConfig()
    cfg.train.tensorboard = False
    rundir.RunDir(tmp_path, cfg, ["train"]).close()
    monkeypatch.setattr(rundir, "git_sha", lambda: "def")
    monkeypatch.setattr(rundir, "git_changes", lambda: [])
    rundir.RunDir(tmp_path, cfg, ["train"], resume_step=5).close()
    assert (tmp_path / "git_sha.txt").read_text() == "abc-dirty\n  changed: results/x.md\n# resumed at step 5: def\n"
    assert summarise.code_versions((tmp_path / "git_sha.txt").read_text())[1] == {"sha": "def", "changed": []}


@pytest.mark.parametrize("to", ["campaign", "group"])
def test_ctrl_c_to_the_campaign_or_its_group_stops_each_run_once_at_a_checkpoint(tmp_path, to):
    """`kill -INT` to the campaign alone, or a Ctrl-C to its whole process group: either way each run gets exactly one
    SIGINT (two would stop it without a checkpoint), the campaign waits for it and exits with 130, leaving no run."""
    import os
    import signal
    import subprocess
    import time
    run = ("import os, signal, sys, time\n"
           "signal.signal(signal.SIGINT, lambda *a: (print('checkpoint', flush=True), sys.exit(130)))\n"
           "print('training', os.getpid(), flush=True)\ntime.sleep(120)\n")
    code = (f"import importlib.util, sys\nfrom pathlib import Path\n"
            f"spec = importlib.util.spec_from_file_location('campaign', {str(_cspec.origin)!r})\n"
            f"campaign = importlib.util.module_from_spec(spec); sys.modules['campaign'] = campaign\n"
            f"spec.loader.exec_module(campaign)\n"
            f"tmp = Path({str(tmp_path)!r})\n"
            f"campaign.HERE = tmp / 'acc'\n"
            f"campaign.folder_of = lambda call, seed: tmp / 'out' / f'{{call[0]}}-s{{seed}}'\n"
            f"campaign.launcher_cmd = lambda call, seed: [sys.executable, '-c', {run!r}]\n"
            f"campaign.estimate_s = lambda job: 60.0\n"
            f"campaign.interruptible()\n"
            f"jobs = [campaign.Job('sts-b', r, 42, ((f'run_kd_qat_{{r}}.sh', 'sts-b'),)) for r in ('map', 'output')]\n"
            f"picker = campaign.Picker(lambda: jobs)\n"
            f"campaign.run_workers(picker, tmp, 1)\n"
            f"print('stopped' if picker.stopped else 'finished', *sorted(picker.taken), flush=True)\n")
    camp = subprocess.Popen([sys.executable, "-c", code], cwd=str(REPO), stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group, so killpg spares pytest
    log = tmp_path / "sts-b_map_s42_1.log"
    t0 = time.time()
    while "training" not in (log.read_text() if log.is_file() else "") and time.time() - t0 < 60:
        time.sleep(0.05)
    pid = int(log.read_text().split()[1])
    os.kill(camp.pid, signal.SIGINT) if to == "campaign" else os.killpg(camp.pid, signal.SIGINT)
    try:
        out = camp.communicate(timeout=60)[0]
        assert out.split()[-2:] == ["stopped", "sts-b/map/s42"]  # the second job never started
        assert log.read_text().split() == ["training", str(pid), "checkpoint"]
    finally:
        camp.kill()
        try:
            os.kill(pid, signal.SIGKILL)  # a run left behind: the failure the test guards against
            left = True
        except ProcessLookupError:
            left = False
    assert not left


def test_an_error_in_the_campaign_itself_fails_that_job_and_the_next_one_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(campaign, "HERE", tmp_path / "acc")
    monkeypatch.setattr(campaign, "folder_of", lambda call, seed: tmp_path / "out" / f"{call[0]}-s{seed}")
    def estimate(job):
        if job.row == "map":
            raise ValueError("a malformed metrics line")
        return 60.0
    monkeypatch.setattr(campaign, "estimate_s", estimate)
    monkeypatch.setattr(campaign, "launcher_cmd", lambda call, seed: [sys.executable, "-c", "print('trained')"])
    jobs = [campaign.Job("sts-b", row, 42, ((f"run_kd_qat_{row}.sh", "sts-b"),)) for row in ("map", "output")]
    picker = campaign.Picker(lambda: jobs)
    picker.work(tmp_path)
    assert picker.failed == ["sts-b/map/s42"] and not picker.stopped
    assert (tmp_path / "sts-b_output_s42_1.log").read_text() == "trained\n"
