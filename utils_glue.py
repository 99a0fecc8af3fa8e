"""GLUE data and metrics: task specs, TSV reading, tokenisation, metrics, and a Hugging Face download path.

Reads the standard GLUE TSV layout written by the official `download_glue_data.py` (Wang et al., 2019),
plus custom TSV tasks (KLUE, NSMC, ...) described by a small JSON file.
"""
from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METRICS = {  # metric family -> keys of compute_metrics() output
    "accuracy": ("acc",),
    "matthews": ("mcc",),
    "acc_f1": ("acc", "f1", "acc_and_f1"),
    "pearson_spearman": ("pearson", "spearman", "corr"),
}
_DEFAULT_SELECT = {"accuracy": "acc", "matthews": "mcc", "acc_f1": "acc", "pearson_spearman": "corr"}


class DataError(Exception):
    """User-facing data error; str(e) is one line saying what and where (path:line where relevant)."""

    def __init__(self, msg: str):
        super().__init__(" ".join(str(msg).splitlines()))


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE (or custom) task: label set, metric and TSV column layout.

    Column refs are an int index (negative counts from the end) or a header name (custom tasks).
    """

    name: str
    folder: str
    labels: tuple[str, ...] | None
    metric: str
    select_metric: str
    dev_splits: tuple[str, ...]
    header: tuple[str, ...] | None      # standard train/dev header; None = headerless file (CoLA)
    text_a: int | str
    text_b: int | str | None
    label: int | str
    test_header: tuple[str, ...]        # test files always have a header; texts are found by name
    test_text_a: str
    test_text_b: str | None
    n_cols: int | None = None           # column count of headerless files
    train_file: str = "train"
    test_splits: tuple[str, ...] = ("test",)
    custom: bool = False

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


def _glue(name, folder, labels, metric, header, a, b, lab, test_header, ta, tb, **kw) -> TaskSpec:
    return TaskSpec(name=name, folder=folder, labels=labels, metric=metric, select_metric=_DEFAULT_SELECT[metric],
                    dev_splits=kw.pop("dev_splits", ("dev",)), header=header, text_a=a, text_b=b, label=lab,
                    test_header=test_header, test_text_a=ta, test_text_b=tb, **kw)


_BIN = ("0", "1")
_ENT = ("entailment", "not_entailment")
_STSB = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score")
_MNLI = ("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
         "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label")
_MRPC = ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
_PAIR = ("index", "sentence1", "sentence2")
_TASKS = {t.name: t for t in (
    _glue("cola", "CoLA", _BIN, "matthews", None, 3, None, 1, ("index", "sentence"), "sentence", None, n_cols=4),
    _glue("sst-2", "SST-2", _BIN, "accuracy", ("sentence", "label"), 0, None, 1,
          ("index", "sentence"), "sentence", None),
    _glue("mrpc", "MRPC", _BIN, "acc_f1", _MRPC, 3, 4, 0, ("index",) + _MRPC[1:], "#1 String", "#2 String"),
    _glue("sts-b", "STS-B", None, "pearson_spearman", _STSB, 7, 8, 9, _STSB[:-1], "sentence1", "sentence2"),
    _glue("qqp", "QQP", _BIN, "acc_f1", ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
          3, 4, 5, ("id", "question1", "question2"), "question1", "question2"),
    # MNLI dev has 16 columns (label1..label5) and train 12, so the gold label is addressed as the LAST column.
    _glue("mnli", "MNLI", ("contradiction", "entailment", "neutral"), "accuracy", _MNLI, 8, 9, -1,
          _MNLI[:10], "sentence1", "sentence2", dev_splits=("dev_matched", "dev_mismatched"),
          test_splits=("test_matched", "test_mismatched")),
    _glue("qnli", "QNLI", _ENT, "accuracy", ("index", "question", "sentence", "label"), 1, 2, 3,
          ("index", "question", "sentence"), "question", "sentence"),
    _glue("rte", "RTE", _ENT, "accuracy", _PAIR + ("label",), 1, 2, 3, _PAIR, "sentence1", "sentence2"),
    _glue("wnli", "WNLI", _BIN, "accuracy", _PAIR + ("label",), 1, 2, 3, _PAIR, "sentence1", "sentence2"),
)}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)
_ALIASES = {n.replace("-", ""): n for n in TASK_NAMES}

_CUSTOM_REQUIRED = ("name", "text_a", "label", "labels", "metric")
_CUSTOM_OPTIONAL = ("text_b", "folder", "select_metric", "train_file", "dev_file", "description")


def get_task(name: str, custom_task: str | Path | None = None) -> TaskSpec:
    """Task spec by (case-insensitive) name or alias; a custom-task JSON path overrides the name."""
    if custom_task:  # "" (an unset CLI option) means no custom task
        return _load_custom(Path(custom_task))
    key = str(name).strip().lower().replace("_", "").replace("-", "")
    if key == "custom":
        raise DataError("task 'custom' needs a custom task JSON file (custom_task=PATH)")
    if key not in _ALIASES:
        raise DataError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)} "
                        "(or 'custom' with a custom task JSON file)")
    return _TASKS[_ALIASES[key]]


def _load_custom(path: Path) -> TaskSpec:
    def bad(why: str) -> DataError:
        return DataError(f"{path}: bad custom task JSON: {why}")

    try:
        cfg = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"{path}: custom task JSON file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(str(e)) from None
    if not isinstance(cfg, dict):
        raise bad("expected a JSON object")
    missing = [k for k in _CUSTOM_REQUIRED if k not in cfg]
    unknown = sorted(set(cfg) - set(_CUSTOM_REQUIRED) - set(_CUSTOM_OPTIONAL))
    if missing or unknown:
        raise bad(f"missing keys {missing}" if missing else
                  f"unknown keys {unknown}; allowed: {list(_CUSTOM_REQUIRED + _CUSTOM_OPTIONAL)}")
    for k in ("name", "text_a", "label", "folder", "train_file", "dev_file"):
        v = cfg.get(k, "x")
        if not isinstance(v, str) or not v or (k in ("name", "folder", "train_file", "dev_file") and "/" in v):
            raise bad(f"{k!r} must be a non-empty string without '/', got {v!r}")
    if cfg.get("text_b") is not None and not isinstance(cfg["text_b"], str):
        raise bad(f"'text_b' must be a column name or null, got {cfg['text_b']!r}")
    metric, labels = cfg["metric"], cfg["labels"]
    if metric not in METRICS:
        raise bad(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if labels is not None:
        # JSON ints are accepted (NSMC-style 0/1) and compared as the strings found in the TSV.
        if (not isinstance(labels, list) or len(labels) < 2
                or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in labels)):
            raise bad("'labels' must be a list of at least two label strings, or null for regression")
        labels = tuple(str(x) for x in labels)
        if len(set(labels)) != len(labels):
            raise bad(f"duplicate labels in {list(labels)}")
    if (labels is None) != (metric == "pearson_spearman"):
        raise bad("regression (labels: null) goes with metric 'pearson_spearman' and only with it")
    if metric == "acc_f1" and len(labels) != 2:
        raise bad("metric 'acc_f1' needs exactly two labels (F1 is of the second one)")
    select = cfg.get("select_metric", _DEFAULT_SELECT[metric])
    if select not in METRICS[metric]:
        raise bad(f"select_metric {select!r} is not one of {METRICS[metric]}")
    a, b, lab = cfg["text_a"], cfg.get("text_b"), cfg["label"]
    test_header = (a,) if b is None else (a, b)
    return TaskSpec(name=cfg["name"], folder=cfg.get("folder", cfg["name"]), labels=labels, metric=metric,
                    select_metric=select, dev_splits=(cfg.get("dev_file", "dev"),), header=test_header + (lab,),
                    text_a=a, text_b=b, label=lab, test_header=test_header, test_text_a=a, test_text_b=b,
                    train_file=cfg.get("train_file", "train"), custom=True)


def default_glue_dir() -> str:
    return os.environ.get("GLUE_DIR") or "glue_data"


def _layout(task: TaskSpec) -> str:
    files = "{" + ",".join((task.train_file,) + task.dev_splits) + "}.tsv"
    cols = (f"no header, {task.n_cols} columns" if task.header is None
            else "header row with columns " + ", ".join(map(str, task.header)))
    return f"<GLUE_DIR>/{task.folder}/{files} ({cols})"


def task_dir(glue_dir: str | Path, task: TaskSpec) -> Path:
    """The task folder glue_dir/<task.folder>; DataError saying how to get the data if it is missing."""
    path = Path(glue_dir) / task.folder
    if not path.is_dir():
        how = ("set --data.glue_dir or GLUE_DIR" if task.custom else
               f"set --data.glue_dir or GLUE_DIR, or run `python utils_glue.py download --task {task.name} "
               "--out DIR` where the internet is reachable")
        raise DataError(f"task folder not found: {path.absolute()}; expected {_layout(task)}; {how}")
    return path


@dataclass(frozen=True, slots=True)
class Example:
    guid: str
    text_a: str
    text_b: str | None
    label: str | float | None


def _read_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(1-based line number, tab-split fields) per line; CSV quoting is deliberately off (RTE has stray quotes)."""
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
    # split("\n"), not splitlines(): the latter also breaks on \x0b, \x1c, \u2028 ... inside sentences.
    lines = text.split("\n")
    while lines and lines[-1] in ("", "\r"):  # trailing blank lines only
        lines.pop()
    rows = []
    for no, line in enumerate(lines, 1):
        if line.endswith("\r"):
            line = line[:-1]
        if not line:
            raise DataError(f"{path}:{no}: empty line inside the file")
        rows.append((no, line.split("\t")))
    return rows


def _col(ref: int | str | None, header: list[str] | None, n: int, path: Path, task: TaskSpec) -> int | None:
    if ref is None:
        return None
    if isinstance(ref, str):
        if header is None or ref not in header:
            raise DataError(f"{path}:1: column {ref!r} not found in header {header} (task {task.name})")
        return header.index(ref)
    idx = ref if ref >= 0 else n + ref
    if not 0 <= idx < n:
        raise DataError(f"{path}:1: task {task.name} needs column {idx + 1}, but the file has {n} columns")
    return idx


def read_examples(data_dir: str | Path, task: TaskSpec, split: str) -> list[Example]:
    """Examples of one split read from data_dir/<split>.tsv (data_dir is the task folder); test labels are None."""
    is_test = split == "test" or split in task.test_splits
    stems = {"train": task.train_file, "train_aug": "train_aug", "test": task.test_splits[0]}
    if not is_test and split not in stems and split not in task.dev_splits:
        raise DataError(f"unknown split {split!r} for task {task.name}; valid: "
                        f"{', '.join(('train', 'train_aug') + task.dev_splits + ('test',) + task.test_splits)}")
    path = Path(data_dir) / f"{stems.get(split, split)}.tsv"
    if not path.is_file():
        layout = (f"{path.parent}/{path.name} with header row containing {task.test_header}" if is_test
                  else _layout(task))
        raise DataError(f"missing data file {path}; expected {layout}")
    rows = _read_rows(path)
    header = None
    if is_test or task.header is not None:
        if not rows:
            return []
        header = rows.pop(0)[1]
        n = len(header)
    else:
        n = task.n_cols
    if is_test:
        ia, ib, il = _col(task.test_text_a, header, n, path, task), _col(task.test_text_b, header, n, path, task), None
    else:
        ia, ib, il = (_col(r, header, n, path, task) for r in (task.text_a, task.text_b, task.label))
    label_set = set(task.labels or ())
    out = []
    for no, cols in rows:
        if len(cols) != n:
            raise DataError(f"{path}:{no}: expected {n} tab-separated columns, got {len(cols)}")
        label = None
        if il is not None:
            label = cols[il].strip()
            if task.labels is None:
                try:
                    label = float(label)
                except ValueError:
                    label = None
                if label is None or not math.isfinite(label):
                    raise DataError(f"{path}:{no}: score {cols[il]!r} is not a finite number (task {task.name})")
            elif label not in label_set:
                raise DataError(f"{path}:{no}: label {label!r} is not one of {task.labels} for task {task.name}")
        out.append(Example(f"{split}-{no}", cols[ia], None if ib is None else cols[ib], label))
    return out


@dataclass
class Encoded:
    """Tokenised split: unpadded [CLS] a [SEP] (b [SEP]) ids, segment ids, and labels (int64 index / float32 score)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_examples(examples: list[Example], task: TaskSpec, tokenizer, max_seq_len: int) -> Encoded:
    """Tokenise with the HF tokenizer (longest-first truncation to max_seq_len); unlabeled -> -1 / NaN."""
    if task.is_regression:
        labels = np.array([math.nan if e.label is None else e.label for e in examples], dtype=np.float32)
    else:
        index = {lab: i for i, lab in enumerate(task.labels)}
        bad = next((e for e in examples if e.label is not None and e.label not in index), None)
        if bad is not None:
            raise DataError(f"example {bad.guid}: label {bad.label!r} is not one of {task.labels} "
                            f"for task {task.name}")
        labels = np.array([-1 if e.label is None else index[e.label] for e in examples], dtype=np.int64)
    if not examples:
        return Encoded([], [], labels)
    pairs = {e.text_b is not None for e in examples}
    if len(pairs) > 1:
        raise DataError(f"task {task.name}: some examples have text_b and some do not")
    text_b = [e.text_b for e in examples] if pairs == {True} else None
    enc = tokenizer([e.text_a for e in examples], text_b, truncation=True, max_length=max_seq_len,
                    return_token_type_ids=True, return_attention_mask=False)
    return Encoded(list(enc["input_ids"]), list(enc["token_type_ids"]), labels)


def compute_metrics(task: TaskSpec, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE metrics: acc, MCC (CoLA), acc/F1 of class 1 (MRPC, QQP), Pearson/Spearman (STS-B)."""
    # Imported here so `import utils_glue` (data loading, the CLI) stays fast.
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.ndim != 1 or preds.shape != labels.shape or len(preds) == 0:
        raise ValueError(f"preds and labels must be non-empty 1-D arrays of equal length (class indices, not "
                         f"logits); got shapes {preds.shape} and {labels.shape}")
    if task.metric == "pearson_spearman":
        p = float(pearsonr(preds.astype(np.float64), labels.astype(np.float64))[0])
        s = float(spearmanr(preds, labels)[0])
        return {"pearson": p, "spearman": s, "corr": (p + s) / 2}
    preds, labels = preds.astype(np.int64), labels.astype(np.int64)
    acc = float((preds == labels).mean())
    if task.metric == "accuracy":
        return {"acc": acc}
    if task.metric == "matthews":
        return {"mcc": float(matthews_corrcoef(labels, preds))}
    if task.metric == "acc_f1":
        f1 = float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0))
        return {"acc": acc, "f1": f1, "acc_and_f1": (acc + f1) / 2}
    raise ValueError(f"unknown metric {task.metric!r}")


# Hugging Face `nyu-mll/glue` columns per task, and HF label int -> GLUE label string.
_HF_TEXT = {"cola": ("sentence", None), "sst-2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
            "sts-b": ("sentence1", "sentence2"), "qqp": ("question1", "question2"),
            "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
            "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2")}
_HF_LABELS = {"mnli": ("entailment", "neutral", "contradiction"), "qnli": _ENT, "rte": _ENT}
_HF_SPLITS = {"train": "train", "validation": "dev", "validation_matched": "dev_matched",
              "validation_mismatched": "dev_mismatched", "test": "test", "test_matched": "test_matched",
              "test_mismatched": "test_mismatched"}


def _clean(text) -> str:
    return str(text).replace("\t", " ").replace("\r", " ").replace("\n", " ")


def _score(x) -> str:
    x = float(x)
    # HF stores STS-B scores as float32: write 3.8, not 3.799999952316284.
    return str(np.float32(x)) if float(np.float32(x)) == x else repr(x)


def _split_rows(ds, task: TaskSpec, stem: str) -> tuple[tuple[str, ...] | None, list[list[str]]]:
    ca, cb = _HF_TEXT[task.name]
    a = list(ds[ca])
    b = list(ds[cb]) if cb else [None] * len(a)
    idx = list(ds["idx"]) if "idx" in ds.column_names else list(range(len(a)))
    is_test = stem.startswith("test")
    header = task.test_header if is_test else task.header
    n = len(header) if header is not None else task.n_cols
    if is_test:
        pos_a, pos_b = header.index(task.test_text_a), cb and header.index(task.test_text_b)
    else:
        pos_a, pos_b = task.text_a % n, cb and task.text_b % n
    labs = None if is_test else list(ds["label"])
    hf_names = _HF_LABELS.get(task.name, _BIN)
    rows = []
    for i in range(len(a)):
        row = [""] * n
        if header is not None and header[0] in ("index", "id"):
            row[0] = str(idx[i])
        row[pos_a] = _clean(a[i])
        if cb:
            row[pos_b] = _clean(b[i])
        if labs is not None:
            lab = labs[i]
            if task.is_regression:
                row[task.label % n] = _score(lab)
            elif not 0 <= int(lab) < len(hf_names):
                raise DataError(f"{task.name} {stem} row {i}: label {lab!r} is not a valid HF label index")
            else:
                row[task.label % n] = hf_names[int(lab)]
                if task.name == "cola" and hf_names[int(lab)] == "0":
                    row[2] = "*"  # CoLA's original-judgement column marks unacceptable sentences
        rows.append(row)
    return header, rows


def write_glue_task(dataset_dict, task: TaskSpec, out_dir: str | Path) -> Path:
    """Write a HF GLUE DatasetDict as standard GLUE TSVs in out_dir/<task.folder>/; returns that folder."""
    if task.name not in _HF_TEXT or task.custom:
        raise DataError(f"write_glue_task supports only the GLUE tasks {', '.join(TASK_NAMES)}, not {task.name!r}")
    unknown = sorted(set(dataset_dict) - set(_HF_SPLITS))
    if unknown:
        raise DataError(f"{task.name}: unexpected dataset splits {unknown}; expected some of {list(_HF_SPLITS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / task.folder
    # Write into a temp folder next to the target, then rename: a failure leaves nothing half-written.
    tmp = Path(tempfile.mkdtemp(prefix=f".{task.folder}.tmp-", dir=out_dir))
    try:
        for split, ds in dataset_dict.items():
            stem = _HF_SPLITS[split]
            header, rows = _split_rows(ds, task, stem)
            lines = ([] if header is None else ["\t".join(header)]) + ["\t".join(r) for r in rows]
            with open(tmp / f"{stem}.tsv", "w", encoding="utf-8", newline="") as f:
                f.write("".join(line + "\n" for line in lines))
        if not final.exists():
            tmp.rename(final)
        else:
            # Keep other files already there (e.g. train_aug.tsv); each file is replaced atomically.
            for f in tmp.iterdir():
                os.replace(f, final / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def download_glue(task_names: list[str], out_dir: str | Path) -> None:
    """Download GLUE tasks from the HF hub (`nyu-mll/glue`) and write them in the standard TSV layout."""
    tasks = [get_task(n) for n in task_names]  # validate every name before touching the network
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"downloading needs the `datasets` package: {e}") from None
    for task in tasks:
        try:
            dd = datasets.load_dataset("nyu-mll/glue", task.name.replace("-", ""))
        except Exception as e:  # network / hub failures come in many exception types
            raise DataError(f"could not download {task.name} from the Hugging Face hub (no internet?): "
                            f"{type(e).__name__}: {e}") from None
        path = write_glue_task(dd, task, out_dir)
        print(f"wrote {path}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Data augmentation: TinyBERT-style word replacement (docs/algorithms.md §12)

AUG_P, AUG_N, AUG_K = 0.4, 20, 15  # TinyBERT's p_t, N_a and K


def word_embedding_table(model_dir: str | Path) -> np.ndarray:
    """The (vocab, hidden) word-embedding matrix of an HF BERT folder's model.safetensors, as float32."""
    from safetensors import safe_open
    path = Path(model_dir) / "model.safetensors"
    if not path.is_file():
        raise DataError(f"{path}: not found; --model must be a Hugging Face BERT folder with model.safetensors "
                        "(e.g. the task's teacher under models/<task>)")
    with safe_open(str(path), framework="np") as f:
        keys = [k for k in f.keys() if k.endswith("embeddings.word_embeddings.weight")]
        if len(keys) != 1:
            raise DataError(f"{path}: expected one *embeddings.word_embeddings.weight tensor, found {keys}")
        return np.asarray(f.get_tensor(keys[0]), dtype=np.float32)


class EmbeddingNeighbours:
    """The K whole-word vocabulary entries nearest to a word by cosine similarity of the model's own word embeddings:
    the candidate set of TinyBERT's replacement, where TinyBERT asks a masked-LM head (which all-MiniLM-L6-v2 lacks)
    for single-piece words and GloVe for the others. Candidates: purely alphabetic, not '##' pieces nor [..] tokens."""

    def __init__(self, table: np.ndarray, vocab: dict[str, int], k: int = AUG_K):
        if table.shape[0] < len(vocab):
            raise DataError(f"the word-embedding table has {table.shape[0]} rows for a vocabulary of {len(vocab)}")
        self.vocab, self.k = vocab, k
        self.words = sorted((w for w in vocab if w.isalpha()), key=vocab.__getitem__)
        ids = np.array([vocab[w] for w in self.words], dtype=np.int64)
        unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
        self.unit, self.cand = unit, unit[ids]
        self.position = {w: i for i, w in enumerate(self.words)}
        self._memo: dict[str, list[str]] = {}

    def __call__(self, word: str) -> list[str]:
        """K neighbours of a candidate word (most similar first, the word itself excluded); [] for other words."""
        if word not in self.position:
            return []
        if word not in self._memo:
            sim = self.cand @ self.unit[self.vocab[word]]
            sim[self.position[word]] = -np.inf
            top = np.argpartition(-sim, self.k)[:self.k]
            self._memo[word] = [self.words[i] for i in top[np.argsort(-sim[top], kind="stable")]]
        return self._memo[word]


def augment_sentence(text: str, words_of, neighbours: EmbeddingNeighbours, rng: np.random.Generator,
                     p: float = AUG_P) -> str:
    """One augmented copy: each candidate word is replaced, with probability p, by one of its K neighbours drawn
    uniformly. Words come from the tokenizer's own normalizer and pre-tokenizer (lowercased, punctuation split off),
    so the copy tokenizes like the original wherever it is unchanged."""
    out = []
    for w in words_of(text):
        cands = neighbours(w)
        out.append(cands[int(rng.integers(len(cands)))] if cands and rng.random() < p else w)
    return " ".join(out)


def _raw_rows(path: Path, task: TaskSpec) -> tuple[list[str] | None, list[list[str]], int, int | None]:
    """Header, rows and the text_a / text_b column indices of a train file (read_examples has validated it)."""
    rows = [cols for _, cols in _read_rows(path)]
    header = rows.pop(0) if task.header is not None and rows else None
    n = len(header) if header is not None else task.n_cols
    ia, ib = (_col(r, header, n, path, task) for r in (task.text_a, task.text_b))
    return header, rows, ia, ib


def augment_task(glue_dir: str | Path, task: TaskSpec, model_dir: str | Path, out_dir: str | Path | None = None,
                 seed: int = 42, n: int = AUG_N, p: float = AUG_P, k: int = AUG_K, overwrite: bool = False) -> Path:
    """Write <out_dir>/<task folder>/train_aug.tsv: every training row followed by up to n augmented copies (copies
    equal to the row are dropped), same columns and labels; for sentence pairs only the first sentence is changed.
    out_dir (default glue_dir) other than glue_dir gets copies of the task's other TSVs first. Never writes train,
    dev or test files that exist there; deterministic given seed. Returns the file written."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer
    if not (0 < p <= 1 and n >= 1 and k >= 1):
        raise DataError(f"augment needs 0 < p <= 1, n >= 1 and k >= 1 (got p={p}, n={n}, k={k})")
    src = task_dir(glue_dir, task)
    dst = Path(out_dir or glue_dir) / task.folder
    train = src / f"{task.train_file}.tsv"
    read_examples(src, task, "train")  # the usual file:line errors before any work
    target = dst / "train_aug.tsv"
    if target.exists() and not overwrite:
        raise DataError(f"{target} exists; pass --overwrite to replace it")
    table = word_embedding_table(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    backend = tok.backend_tokenizer
    words_of = lambda text: [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]
    neighbours = EmbeddingNeighbours(table, tok.get_vocab(), k)
    header, rows, ia, _ = _raw_rows(train, task)
    rng = np.random.default_rng(seed)
    out = [] if header is None else ["\t".join(header)]
    for cols in tqdm(rows, desc=f"augment {task.name}", dynamic_ncols=True):
        out.append("\t".join(cols))
        seen = {" ".join(words_of(cols[ia]))}  # the row itself, as the copies spell it, and every copy so far
        for _ in range(n):
            new = augment_sentence(cols[ia], words_of, neighbours, rng, p)
            if new not in seen:
                seen.add(new)
                out.append("\t".join(new if j == ia else c for j, c in enumerate(cols)))
    dst.mkdir(parents=True, exist_ok=True)
    if dst.resolve() != src.resolve():
        for f in sorted(src.glob("*.tsv")):
            if f.name == "train_aug.tsv":
                continue
            there = dst / f.name
            if there.exists():
                if there.read_bytes() != f.read_bytes():
                    raise DataError(f"{there} exists and differs from {f}; use an empty --out folder")
                continue
            shutil.copy2(f, there)
    fd, tmp = tempfile.mkstemp(prefix=".train_aug.", suffix=".tsv", dir=dst)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write("".join(line + "\n" for line in out))
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="utils_glue.py", description="GLUE data utilities")
    sub = parser.add_subparsers(dest="cmd", required=True)
    dl = sub.add_parser("download", help="download GLUE tasks from the Hugging Face hub as GLUE TSVs")
    dl.add_argument("--task", action="append", required=True, help=f"repeatable; one of {', '.join(TASK_NAMES)}")
    dl.add_argument("--out", default=default_glue_dir(), help="output GLUE dir (default: $GLUE_DIR or glue_data)")
    aug = sub.add_parser("augment", help="write train_aug.tsv (TinyBERT-style word replacement) for --data.augment")
    aug.add_argument("--task", required=True, help=f"one of {', '.join(TASK_NAMES)}")
    aug.add_argument("--model", required=True,
                     help="HF BERT folder whose tokenizer and word embeddings give the neighbours (e.g. models/sts-b)")
    aug.add_argument("--glue_dir", default=default_glue_dir(), help="source GLUE dir (default: $GLUE_DIR or glue_data)")
    aug.add_argument("--out", help="GLUE dir to write (default: --glue_dir; else the task's other TSVs are copied there)")
    aug.add_argument("--seed", type=int, default=42)
    aug.add_argument("--n", type=int, default=AUG_N, help=f"augmented copies per example (default {AUG_N})")
    aug.add_argument("--p", type=float, default=AUG_P, help=f"replacement probability per word (default {AUG_P})")
    aug.add_argument("--k", type=int, default=AUG_K, help=f"neighbours per word (default {AUG_K})")
    aug.add_argument("--overwrite", action="store_true", help="replace an existing train_aug.tsv")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "download":
            download_glue(args.task, args.out)
        else:
            path = augment_task(args.glue_dir, get_task(args.task), args.model, args.out, args.seed, args.n, args.p,
                                args.k, args.overwrite)
            print(f"wrote {path}", file=sys.stderr)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
