"""`utils_glue.py augment`: embedding-neighbour word replacement writing train_aug.tsv (docs/algorithms.md §12)."""
import hashlib

import numpy as np
import pytest

import quant_task_glue
import utils_glue
from tests.conftest import tiny_flags, write_mini_glue


def _digest(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.tsv"))}


@pytest.fixture
def mini(tmp_path):
    return write_mini_glue(tmp_path / "glue")


def test_neighbours_are_the_nearest_whole_words_by_cosine():
    vocab = {"[PAD]": 0, "##x": 1, "cat": 2, "dog": 3, "car": 4, "van": 5, "7": 6}
    # cat ~ dog, car ~ van; "##x" and "7" lie right next to cat but are no candidates
    table = np.array([[0, 0], [1, 0.05], [1, 0], [1, 0.2], [0, 1], [0.3, 1], [1, 0.01]], dtype=np.float32)
    nb = utils_glue.EmbeddingNeighbours(table, vocab, k=2)
    assert nb("cat") == ["dog", "van"]
    assert nb("car") == ["van", "dog"]
    assert nb("7") == [] and nb("##x") == [] and nb("zebra") == []


def test_augment_keeps_every_row_changes_only_the_first_sentence_and_is_deterministic(tmp_path, mini, tiny_base):
    task = utils_glue.get_task("sts-b")
    before = _digest(mini / "STS-B")
    out = utils_glue.augment_task(mini, task, tiny_base, tmp_path / "aug", seed=3, n=4)
    assert out == tmp_path / "aug" / "STS-B" / "train_aug.tsv"
    assert _digest(mini / "STS-B") == before  # the source is never written
    assert {f: d for f, d in _digest(tmp_path / "aug" / "STS-B").items() if f != "train_aug.tsv"} == before
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    orig = [line.split("\t") for line in (mini / "STS-B" / "train.tsv").read_text().splitlines()]
    assert rows[0] == orig[0]  # header
    # each original row, in order, then its copies: same other columns, a different first sentence
    at = [next(i for i, r in enumerate(rows) if r == o) for o in orig[1:]]
    assert at == sorted(at) and at[0] == 1
    for start, end, o in zip(at, at[1:] + [len(rows)], orig[1:]):
        copies = rows[start + 1:end]
        assert len(copies) <= 4
        for c in copies:
            assert c[:7] == o[:7] and c[8:] == o[8:] and c[7] != o[7].lower()
        assert len({c[7] for c in copies}) == len(copies)
    assert len(rows) > len(orig)  # the letters of the tiny vocabulary are candidates: some words were replaced
    # deterministic given the seed; another seed gives another file
    again = utils_glue.augment_task(mini, task, tiny_base, tmp_path / "aug", seed=3, n=4, overwrite=True)
    assert again.read_bytes() == out.read_bytes()
    other = utils_glue.augment_task(mini, task, tiny_base, tmp_path / "aug2", seed=4, n=4)
    assert other.read_bytes() != out.read_bytes()


def test_augment_refuses_to_replace_files(tmp_path, mini, tiny_base):
    task = utils_glue.get_task("rte")
    utils_glue.augment_task(mini, task, tiny_base, seed=1, n=2)  # in place: only train_aug.tsv is added
    assert (mini / "RTE" / "train_aug.tsv").is_file()
    with pytest.raises(utils_glue.DataError, match="exists; pass --overwrite"):
        utils_glue.augment_task(mini, task, tiny_base, seed=1, n=2)
    (tmp_path / "other" / "RTE").mkdir(parents=True)
    (tmp_path / "other" / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(utils_glue.DataError, match="differs from"):
        utils_glue.augment_task(mini, task, tiny_base, tmp_path / "other", seed=1, n=2)
    with pytest.raises(utils_glue.DataError, match="model.safetensors"):
        utils_glue.augment_task(mini, task, tmp_path, tmp_path / "x", seed=1)


def test_augment_cli_then_training_reads_train_aug(tmp_path, mini, tiny_base, capsys):
    assert utils_glue.main(["augment", "--task", "sts-b", "--model", str(tiny_base), "--glue_dir", str(mini),
                            "--out", str(tmp_path / "aug"), "--n", "2"]) == 0
    assert "wrote" in capsys.readouterr().err
    argv = ["--data.task", "sts-b", *tiny_flags(tmp_path, tiny_base, tmp_path / "aug", steps=1), "--data.augment"]
    assert quant_task_glue.main(argv) == 0
    assert utils_glue.main(["augment", "--task", "sts-b", "--model", str(tiny_base), "--glue_dir", str(mini),
                            "--out", str(tmp_path / "aug")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
