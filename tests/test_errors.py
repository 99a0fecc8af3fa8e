"""Every user error in README's table: one scenario per row, run through the CLI; exit 2, one line, no traceback,
the README's message, and no partial run folder. The table is read from README.md so the two cannot drift."""
import json
import re
import shutil
from pathlib import Path

import pytest

import quant_task_glue
from tests.conftest import REPO, tiny_flags, write_mini_glue


def readme_rows() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    table = text.split("<!-- user-errors:start -->")[1].split("<!-- user-errors:end -->")[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = re.search(r"`(.+?)`", cells[1]).group(1)
    return rows


@pytest.fixture
def env(tmp_path, tiny_base):
    glue = write_mini_glue(tmp_path / "glue")
    return tmp_path, tiny_base, glue


def _flags(env, **replace):
    tmp, base, glue = env
    flags = tiny_flags(tmp, base, glue)
    for k, v in replace.items():
        flags[flags.index(k) + 1] = v
    return flags


def _teacher(env, task="sts-b"):
    tmp = env[0]
    assert quant_task_glue.main([task, *_flags(env), "--model.teacher_dir", str(tmp / f"t_{task}"),
                                 "--train.max_steps", "1"]) == 0
    return tmp / f"t_{task}"


def _edit(path: Path, line_no: int, new: str):
    lines = path.read_text().splitlines(keepends=True)
    lines[line_no] = new
    path.write_text("".join(lines))


def s_unknown_task(env):
    return ["nosuchtask", *_flags(env)]


def s_missing_data_folder(env):
    return ["sts-b", *_flags(env, **{"--data.glue_dir": str(env[0] / "nowhere")})]


def s_missing_data_file(env):
    (env[2] / "STS-B" / "dev.tsv").unlink()
    return ["sts-b", *_flags(env)]


def s_wrong_column_count(env):
    _edit(env[2] / "STS-B" / "train.tsv", 3, "1\tmain\tx\t2012\t1\tnone\tnone\tonly one sentence\n")
    return ["sts-b", *_flags(env)]


def s_bad_label(env):
    _edit(env[2] / "RTE" / "train.tsv", 2, "1\ta dog runs\tthe cat sleeps\tmaybe\n")
    return ["rte", *_flags(env)]


def s_empty_dev_set(env):
    (env[2] / "STS-B" / "dev.tsv").write_text((env[2] / "STS-B" / "dev.tsv").read_text().splitlines()[0] + "\n")
    return ["sts-b", *_flags(env)]


def s_teacher_num_labels(env):
    return ["sts-b", *_flags(env), "--model.teacher_dir", str(_teacher(env, "rte"))]


def s_not_bert(env):
    t = env[0] / "roberta"
    shutil.copytree(env[1], t)
    cfg = json.loads((t / "config.json").read_text())
    (t / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    return ["sts-b", *_flags(env), "--model.teacher_dir", str(t)]


def s_corrupt_weights(env):
    t = _teacher(env)
    data = (t / "model.safetensors").read_bytes()
    (t / "model.safetensors").write_bytes(data[: len(data) // 3])
    return ["sts-b", *_flags(env), "--model.teacher_dir", str(t)]


def s_teacher_folder_without_checkpoint(env):
    (env[0] / "teacher").mkdir()
    (env[0] / "teacher" / "notes.txt").write_text("mine")
    return ["sts-b", *_flags(env)]


def s_finished_run(env):
    assert quant_task_glue.main(["sts-b", *_flags(env), "--train.run_name", "done"]) == 0
    return ["sts-b", *_flags(env), "--train.run_name", "done"]


def s_incompatible_resume(env):
    assert quant_task_glue.main(["sts-b", *_flags(env), "--train.run_name", "r", "--train.eval_every", "1",
                                 "--train.keep_checkpoint"]) == 0
    (env[0] / "out" / "sts-b" / "r" / "result.json").unlink()
    return ["sts-b", *_flags(env), "--train.run_name", "r", "--train.eval_every", "1", "--optim.lr", "0.001"]


def s_corrupt_resume_checkpoint(env):
    assert quant_task_glue.main(["sts-b", *_flags(env), "--train.run_name", "r", "--train.keep_checkpoint",
                                 "--train.eval_every", "1"]) == 0
    run = env[0] / "out" / "sts-b" / "r"
    (run / "result.json").unlink()
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:100])
    return ["sts-b", *_flags(env), "--train.run_name", "r", "--train.eval_every", "1"]


def s_unwritable_output(env):
    (env[0] / "afile").write_text("x")
    return ["sts-b", *_flags(env, **{"--train.output_root": str(env[0] / "afile" / "out")})]


def s_negative_coefficient(env):
    return ["sts-b", *_flags(env), "--loss.attn_prob_kl_weight", "-0.5"]


def s_unsupported_bits(env):
    return ["sts-b", *_flags(env), "--quant.weight_bits", "3"]


def s_learned_clip_without_clip(env):
    return ["sts-b", *_flags(env), "--quant.act_learned_clip", "--no-quant.act_clip"]


def s_non_positive_value(env):
    return ["sts-b", *_flags(env), "--optim.lr", "0"]


def s_unknown_config_key(env):
    (env[0] / "c.json").write_text(json.dumps({"loss": {"map_coeff": 1.0}}))
    return ["sts-b", *_flags(env), "--config", str(env[0] / "c.json")]


def s_task_given_twice(env):
    return ["sts-b", *_flags(env), "--data.task", "rte"]


def s_ti_step2_first(env):
    return ["sts-b", *_flags(env, **{"--train.max_steps": "4"}), "--ti.mode", "gradual", "--ti.steps", "2", "--ti.step", "2"]


def s_ti_step2_without_mode(env):
    return ["sts-b", *_flags(env), "--ti.step", "2"]


def s_ti_step1_too_long(env):
    return ["sts-b", *_flags(env), "--model.teacher_dir", str(_teacher(env)), "--ti.mode", "gradual", "--ti.steps", "2"]


def s_bad_layer_map(env):
    return ["sts-b", *_flags(env), "--model.teacher_dir", str(_teacher(env)), "--distill.student_layers", "1",
            "--distill.layer_map", "0,1"]


def s_mismatched_heads(env):
    return ["sts-b", *_flags(env), "--model.teacher_dir", str(_teacher(env)), "--distill.student_layers", "1",
            "--distill.student_heads", "2"]


HELD_LOCKS = []  # locks a scenario holds for the test's duration (released when the test process moves on)


def s_run_folder_in_use(env):
    from transformer.config import parse_config, resolve
    from transformer.rundir import FolderLock, run_folder
    argv = ["sts-b", *_flags(env)]
    folder = run_folder(resolve(parse_config(argv[1:] + ["--data.task", "sts-b"])))
    HELD_LOCKS.append(FolderLock(folder).acquire())  # as another process training in that folder would
    return argv


SCENARIOS = {
    "unknown task": s_unknown_task,
    "missing data folder": s_missing_data_folder,
    "missing data file": s_missing_data_file,
    "row with the wrong number of columns": s_wrong_column_count,
    "label not in the task's label set": s_bad_label,
    "empty dev set": s_empty_dev_set,
    "teacher whose num_labels does not fit the task": s_teacher_num_labels,
    "checkpoint that is not BERT": s_not_bert,
    "corrupt or truncated weights file": s_corrupt_weights,
    "teacher folder holding other files": s_teacher_folder_without_checkpoint,
    "output folder holding a finished run": s_finished_run,
    "resume with an incompatible config": s_incompatible_resume,
    "corrupt or truncated resume checkpoint": s_corrupt_resume_checkpoint,
    "output folder not writable": s_unwritable_output,
    "negative loss coefficient": s_negative_coefficient,
    "unsupported bit width": s_unsupported_bits,
    "a learned clip without a clip": s_learned_clip_without_clip,
    "non-positive LR, steps or sizes": s_non_positive_value,
    "unknown key in a --config file": s_unknown_config_key,
    "task given twice": s_task_given_twice,
    "TI step 2 before its step 1": s_ti_step2_first,
    "TI step 2 without a step-1 mode": s_ti_step2_without_mode,
    "TI step 1 as long as the whole budget": s_ti_step1_too_long,
    "run folder in use by another launch": s_run_folder_in_use,
    "layer map that does not fit the student": s_bad_layer_map,
    "attention terms with another head count": s_mismatched_heads,
}


def test_readme_table_and_scenarios_match():
    assert set(readme_rows()) == set(SCENARIOS)


@pytest.mark.parametrize("row", sorted(SCENARIOS))
def test_user_error(row, env, capsys):
    argv = SCENARIOS[row](env)
    before = {p for p in (env[0] / "out").rglob("*")} if (env[0] / "out").exists() else set()
    capsys.readouterr()
    rc = quant_task_glue.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert readme_rows()[row] in err, err
    after = {p for p in (env[0] / "out").rglob("*")} if (env[0] / "out").exists() else set()
    assert after == before  # nothing half-written
    while HELD_LOCKS:
        HELD_LOCKS.pop().release()
