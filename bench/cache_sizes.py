"""Teacher-cache size per example and per GLUE task, from the real token lengths of each training set (issue 14).

    python bench/cache_sizes.py --glue-dir ../shared/data/glue --out results/teacher_cache/sizes.json

For each task folder present: tokenize the training split with the base model's tokenizer at the task's default max
length, and compute (exactly, as `teacher_cache.cache_bytes` does) the cache of each recipe's tensor set for the
MiniLM teacher (6 layers, 384 hidden, 12 heads) and for a BERT-base-shaped one (12 × 768, 12 heads), fp32 and bf16.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils_glue  # noqa: E402
from transformer.config import default_base_model, parse_config, resolve, task_defaults  # noqa: E402
from transformer.teacher_cache import GB, cache_bytes  # noqa: E402
from transformer.train import load_tokenizer, teacher_tensors  # noqa: E402

RECIPES = {"baseline": [], "map": ["--loss.attn_score_mse_weight", "0", "--loss.attn_prob_kl_weight", "1"],
           "output": ["--loss.attn_score_mse_weight", "0", "--loss.attn_output_mse_weight", "1"],
           "ti_step1": ["--loss.attn_output_mse_weight", "1", "--ti.mode", "gradual"]}
SHAPES = {"minilm": {"num_layers": 6, "num_heads": 12, "hidden_size": 384, "num_labels": 2},
          "bert-base": {"num_layers": 12, "num_heads": 12, "hidden_size": 768, "num_labels": 2}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", str(REPO.parent / "shared" / "data" / "glue")))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    tokenizer = load_tokenizer(default_base_model())
    rows = []
    for name in utils_glue.TASK_NAMES:
        task = utils_glue.get_task(name)
        try:
            folder = utils_glue.task_dir(Path(args.glue_dir), task)
        except utils_glue.DataError:  # not in this GLUE folder
            continue
        max_len = task_defaults(task.name).max_seq_len
        enc = utils_glue.encode_examples(utils_glue.read_examples(folder, task, "train"), task, tokenizer, max_len)
        lengths = np.array([len(ids) for ids in enc.input_ids])
        for recipe, flags in RECIPES.items():
            tensors = teacher_tensors(resolve(parse_config(["--data.task", name, *flags])))
            for shape_name, shape in SHAPES.items():
                size = cache_bytes(tensors, lengths, {**shape, "num_labels": task.num_labels}, "fp32")
                rows.append({"task": task.name, "examples": len(lengths), "mean_tokens": float(lengths.mean()),
                             "max_seq_len": max_len, "recipe": recipe, "tensors": sorted(tensors), "teacher": shape_name,
                             "fp32_bytes": size, "bf16_bytes": size // 2, "fp32_kib_per_example": size / len(lengths) / 1024})
    print("| task | examples | mean tokens | recipe | teacher | per example (fp32) | whole task fp32 | bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['examples']} | {r['mean_tokens']:.1f} | {r['recipe']} | {r['teacher']} | "
              f"{r['fp32_kib_per_example']:.0f} KiB | {r['fp32_bytes'] / GB:.2f} GiB | {r['bf16_bytes'] / GB:.2f} GiB |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"glue_dir": args.glue_dir, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
