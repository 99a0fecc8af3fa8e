"""Fuzz every GLUE task reader with malformed lines: each file either parses to valid examples (one per data
line: no silent drop) or raises our DataError naming the file and line. Seeded, so failures reproduce."""
import random
import re

import pytest

import utils_glue
from utils_glue import DataError, get_task, read_examples

MUTATIONS = {
    "empty": lambda row, r: b"",
    "extra_tab": lambda row, r: row + b"\textra",
    "missing_tab": lambda row, r: row.replace(b"\t", b" ", 1),
    "only_tabs": lambda row, r: b"\t" * r.randint(1, 20),
    "non_utf8": lambda row, r: row[: r.randint(0, len(row))] + bytes([r.choice([0xFF, 0xFE, 0xC3, 0x80])]) + row[3:],
    "huge": lambda row, r: row.replace(b"text", b"word " * 200_000, 1),
    "quotes": lambda row, r: row.replace(b"text", r.choice([b'"', b'""', b'"unbalanced', b"'", b'a "b" c']), 1),
    "cr": lambda row, r: row + b"\r",
    "nul": lambda row, r: row.replace(b"text", b"te\x00xt", 1),
    "spaces_last": lambda row, r: row.rpartition(b"\t")[0] + b"\t  " + row.rpartition(b"\t")[2] + b" ",
    "bad_last": lambda row, r: row.rpartition(b"\t")[0] + b"\t" + r.choice([b"", b"yes", b"nan?", b"-"]),
}


def valid_row(task: utils_glue.TaskSpec, i: int) -> bytes:
    n = len(task.header) if task.header else task.n_cols
    cols = [f"c{j}" for j in range(n)]
    for ref in (task.text_a, task.text_b):
        if ref is not None:
            cols[ref] = f"some text {i}"
    label = task.labels[i % len(task.labels)] if task.labels else f"{(i % 50) / 10:.1f}"
    cols[task.label] = label
    return "\t".join(cols).encode()


def check_examples(task, examples, n_lines):
    assert len(examples) == n_lines  # nothing dropped silently
    for e in examples:
        assert isinstance(e.text_a, str) and (e.text_b is None) == (task.text_b is None)
        if task.labels is None:
            assert isinstance(e.label, float)
        else:
            assert e.label in task.labels


@pytest.mark.parametrize("name", utils_glue.TASK_NAMES)
def test_fuzzed_rows_parse_or_raise_a_clear_error(name, tmp_path):
    task = get_task(name)
    rng = random.Random(name)
    folder = tmp_path / task.folder
    folder.mkdir()
    split = task.dev_splits[0]
    outcomes = set()
    for case in range(60):
        rows = [valid_row(task, i) for i in range(4)]
        kinds = rng.sample(sorted(MUTATIONS), rng.randint(1, 2))
        where = rng.randrange(len(rows))
        for kind in kinds:
            rows[where] = MUTATIONS[kind](rows[where], rng)
        header = ["\t".join(task.header).encode()] if task.header else []
        path = folder / f"{split}.tsv"
        path.write_bytes(b"\n".join(header + rows) + b"\n")
        try:
            examples = read_examples(folder, task, split)
        except DataError as e:
            msg = str(e)
            assert "\n" not in msg and str(path) in msg, msg
            assert re.search(rf"{re.escape(str(path))}:\d+", msg), f"{kinds}: no line number in {msg!r}"
            outcomes.add("error")
        else:
            while rows and rows[-1] == b"":  # blank lines at the end of a file are its end, not rows
                rows.pop()
            check_examples(task, examples, len(rows))
            outcomes.add("parsed")
    assert outcomes == {"error", "parsed"}  # the fuzzer exercised both paths
