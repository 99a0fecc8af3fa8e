"""The teacher cache: cached tensors equal the live teacher's at real tokens (float noise), the loss terms follow,
a changed teacher / data file / max length never reuses a stale cache, builds are atomic, budgets are kept."""
import dataclasses
import json
import mmap
import shutil
import subprocess
import sys

import pytest
import torch

from transformer import teacher_cache as tc
from transformer.config import parse_config, resolve
from transformer.data import load_task_data, train_batches
from transformer.distributed import Dist
from transformer.losses import LossContext, distill_loss, identity_layer_map
from transformer.model import KEEPABLE, load_bert
from transformer.quant import quantize_model
from transformer.train import kd_forward, load_tokenizer, teacher_tensors
from tests.conftest import REPO, tiny_flags, write_mini_glue

ALL = frozenset(KEEPABLE)
NOISE = dict(rtol=1e-5, atol=1e-6)  # fp32: a row computed in another batch (other padding) rounds differently


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_base):
    tmp = tmp_path_factory.mktemp("cache")
    glue = write_mini_glue(tmp / "glue", n_train=40)  # short sentences: batches of mixed lengths (the tiny model's
    # 64 positions truncate every real GLUE pair to the same length)
    cfg = resolve(parse_config(["--data.task", "sts-b", *tiny_flags(tmp, tiny_base, glue), "--data.limit_train", "40",
                                "--data.max_seq_len", "64"]))
    teacher = load_bert(tiny_base, num_labels=1, new_classifier=True).eval().requires_grad_(False)
    teacher_dir = tmp / "teacher"
    from transformer.model import save_bert
    save_bert(teacher, teacher_dir)
    load_tokenizer(tiny_base).save_pretrained(str(teacher_dir))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, teacher_dir=str(teacher_dir)))
    data = load_task_data(cfg.data, load_tokenizer(teacher_dir))
    return tmp, cfg, teacher, data


def _cpu():
    return Dist(0, 1, torch.device("cpu"))


def _open(cfg, teacher, data, tensors=ALL, **teacher_kw):
    cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, **teacher_kw))
    return tc.open_or_build(cfg, teacher, data.task, data.train, tensors, _cpu(), lambda: torch.autocast("cpu", enabled=False))


def _batches(data, n=3):
    stream = train_batches(data.train, 8, 42, None, length_buckets=2)
    return [next(stream)[0][0] for _ in range(n)]


def test_cached_tensors_equal_the_live_teacher_at_real_tokens_and_zero_at_padding(setup):
    tmp, cfg, teacher, data = setup
    cache = _open(cfg, teacher, data)
    for b in _batches(data):
        S = b.input_ids.shape[1]
        assert not b.attention_mask.all()  # the batch has padding
        live = teacher(b.input_ids, b.token_type_ids, b.attention_mask, keep=ALL)
        got = cache.batch(b.index, S, ALL, torch.device("cpu"))
        v = b.attention_mask
        tok, pair = v[:, :, None], (v[:, :, None] & v[:, None, :])[:, None]
        torch.testing.assert_close(got.logits, live.logits, **NOISE)
        pairs = [(got.embeddings, live.embeddings, tok)]
        for g, l in zip(got.layers, live.layers):
            pairs += [(g.hidden, l.hidden, tok), (g.attn_output, l.attn_output, tok), (g.sa_output, l.sa_output, tok),
                      (g.scores, l.scores, pair), (g.probs, l.probs, pair), (g.context, l.context, v[:, None, :, None]),
                      (g.value, l.value, v[:, None, :, None])]
        for g, l, m in pairs:
            assert g.shape == l.shape and g.dtype == l.dtype
            m = m.expand_as(g)
            torch.testing.assert_close(g[m], l[m], **NOISE)
            assert (g[~m] == 0).all()


def test_random_access_mapping_gives_the_plain_memmaps_batches(setup):
    tmp, cfg, teacher, data = setup
    folder = _open(cfg, teacher, data).folder
    fast, plain = tc.TeacherCache.open(folder), tc.TeacherCache.open(folder, random_access=False)
    assert bool(fast.maps) == hasattr(mmap, "MADV_RANDOM") and not plain.maps  # Linux: every file advised
    for b in _batches(data):
        got, ref = (c.batch(b.index, b.input_ids.shape[1], ALL, torch.device("cpu")) for c in (fast, plain))
        assert torch.equal(got.logits, ref.logits) and torch.equal(got.embeddings, ref.embeddings)
        for g, r in zip(got.layers, ref.layers):
            for name in ALL - {"hidden"}:
                assert torch.equal(getattr(g, name), getattr(r, name)), name
            assert torch.equal(g.hidden, r.hidden)


def test_cache_io_benchmark_reports_both_mappings_on_a_real_cache(setup, tmp_path):
    """bench/bench_cache_io.py end to end on the tiny cache: both modes' rows, their tensors checked equal, the bytes
    the batches hold counted the same way in both. No timing assertions."""
    _, cfg, teacher, data = setup
    folder = _open(cfg, teacher, data).folder
    out = tmp_path / "io.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "bench_cache_io.py"), "--folder", str(folder),
                        "--batches", "2", "--batch-size", "4", "--out", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "same tensors: True" in r.stdout and "| mode | ms/batch |" in r.stdout
    result = json.loads(out.read_text())
    plain, fast = result["rows"]
    assert (plain["mode"], fast["mode"]) == ("plain np.memmap", "random access + prefetch")
    assert plain["mb_needed_per_batch"] == fast["mb_needed_per_batch"] > 0  # the same batches
    for row in (plain, fast):
        assert row["ms_per_batch"] > 0 and row["warm_ms_per_batch"] > 0 and row["mb_read_per_batch"] >= 0


def test_loss_terms_with_the_cache_equal_the_live_ones_without_padding_errors(setup):
    tmp, cfg, teacher, data = setup
    cache = _open(cfg, teacher, data)
    flags = ["--loss.attn_prob_kl_weight", "1", "--loss.attn_output_mse_weight", "1", "--loss.context_mse_weight", "1",
             "--loss.sa_output_mse_weight", "1", "--loss.value_relation_kl_weight", "1"]
    run = resolve(parse_config(["--data.task", "sts-b", *flags]))
    student = quantize_model(load_bert(cfg.model.teacher_dir, num_labels=1), run.quant).eval()  # eval: no dropout
    for b in _batches(data):
        _, cached = kd_forward(student, teacher, b, run, cache=cache)
        # the live teacher, with the losses told to ignore padding errors in the same way
        keep = teacher_tensors(run)
        live_out = teacher(b.input_ids, b.token_type_ids, b.attention_mask, keep=keep)
        s_out = student(b.input_ids, b.token_type_ids, b.attention_mask, keep=keep)
        ctx = LossContext(b.attention_mask, b.labels, True, identity_layer_map(2), teacher_padding=False)
        _, live = distill_loss(s_out, live_out, ctx, run.loss)
        assert cached.keys() == live.keys() and len(live) == 8
        for k in live:
            torch.testing.assert_close(cached[k], live[k], rtol=1e-5, atol=1e-6, msg=k)
    # and on a batch without padding they are the published terms themselves
    one = _batches(data, 1)[0]
    n = int(one.attention_mask.sum(-1).min())
    same_len = dataclasses.replace(one, input_ids=one.input_ids[:1, :n], token_type_ids=one.token_type_ids[:1, :n],
                                   attention_mask=one.attention_mask[:1, :n], labels=one.labels[:1], index=one.index[:1])
    assert same_len.attention_mask.all()
    _, c = kd_forward(student, teacher, same_len, run, cache=cache)
    _, l = kd_forward(student, teacher, same_len, run)
    for k in l:
        torch.testing.assert_close(c[k], l[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_cache_is_reused_by_key_and_never_when_teacher_data_or_length_change(setup, tmp_path):
    _, cfg, teacher, data = setup
    root = tmp_path / "caches"
    cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache_dir=str(root)))
    a = _open(cfg, teacher, data, frozenset({"hidden", "probs"}))
    assert _open(cfg, teacher, data, frozenset({"probs"})).folder == a.folder  # a superset is reused
    assert _open(cfg, teacher, data, frozenset({"scores"})).folder != a.folder  # another tensor set: its own cache
    # a changed teacher (weights), a changed training file, another max length: other keys
    moved = root.parent / "teacher2"
    shutil.copytree(cfg.model.teacher_dir, moved)
    from safetensors.torch import load_file, save_file
    sd = load_file(str(moved / "model.safetensors"))
    sd["classifier.bias"] = sd["classifier.bias"] + 1
    save_file(sd, str(moved / "model.safetensors"))
    k0 = tc.cache_key(cfg.model.teacher_dir, data.task, cfg.data.glue_dir, False, 32, 40, "fp32", "fp32")
    assert tc.cache_key(moved, data.task, cfg.data.glue_dir, False, 32, 40, "fp32", "fp32") != k0
    assert tc.cache_key(cfg.model.teacher_dir, data.task, cfg.data.glue_dir, False, 64, 40, "fp32", "fp32") != k0
    assert tc.cache_key(cfg.model.teacher_dir, data.task, cfg.data.glue_dir, False, 32, 40, "bf16", "fp32") != k0
    assert tc.cache_key(cfg.model.teacher_dir, data.task, cfg.data.glue_dir, False, 32, 20, "fp32", "fp32") != k0
    glue2 = root.parent / "glue2"
    shutil.copytree(cfg.data.glue_dir, glue2, ignore=shutil.ignore_patterns("*aug*"))
    rows = (glue2 / "STS-B" / "train.tsv").read_text().splitlines(keepends=True)
    (glue2 / "STS-B" / "train.tsv").write_text("".join(rows[:1] + rows[2:]))  # one row fewer
    assert tc.cache_key(cfg.model.teacher_dir, data.task, glue2, False, 32, 40, "fp32", "fp32") != k0
    assert tc.cache_key(cfg.model.teacher_dir, data.task, cfg.data.glue_dir, False, 32, 40, "fp32", "fp32") == k0


def test_an_interrupted_build_is_never_used_and_is_rebuilt(setup, tmp_path):
    _, cfg, teacher, data = setup
    root = tmp_path / "caches"
    cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache_dir=str(root)))
    tensors = frozenset({"hidden"})
    key = tc.cache_key(cfg.model.teacher_dir, data.task, cfg.data.glue_dir, False, cfg.data.max_seq_len,
                       cfg.data.limit_train, "fp32", "fp32")
    partial = tc.folder_for(root, key, tensors).with_name(tc.folder_for(root, key, tensors).name + ".partial")
    partial.mkdir(parents=True)
    (partial / "hidden.0.bin").write_bytes(b"\0" * 12)  # what a killed build leaves
    assert tc.find(root, key, tensors) is None
    cache = _open(cfg, teacher, data, tensors)
    assert cache.folder == tc.folder_for(root, key, tensors) and not partial.exists()
    meta = json.loads((cache.folder / tc.META).read_text())
    assert meta["complete"] and meta["key"] == dataclasses.asdict(key)


def test_budgets_memory_mode_and_bf16_storage(setup, tmp_path, capsys):
    _, cfg, teacher, data = setup
    cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache_dir=str(tmp_path / "c")))
    assert _open(cfg, teacher, data, cache="disk", cache_disk_gb=1e-9) is None  # too large: the live teacher
    assert "running the live teacher" in capsys.readouterr().out
    full = tc.free_bytes(tmp_path / "c" / "not" / "yet")  # a parent that exists answers
    with pytest.MonkeyPatch.context() as mp:  # a disk without room for the cache and the margin: the live teacher
        mp.setattr(tc, "free_bytes", lambda root: tc.DISK_MARGIN)
        assert _open(cfg, teacher, data, cache="disk") is None
    assert "GB are free under" in capsys.readouterr().out and not (tmp_path / "c").exists() and full > 0
    mem = _open(cfg, teacher, data, cache="memory")
    assert mem.folder is None and not (tmp_path / "c").exists()  # RAM only, nothing written
    mapped = _open(cfg, teacher, data, cache="memory", cache_memory_gb=1e-9)  # over the RAM budget: memory-mapped
    assert mapped.folder is not None
    assert _open(cfg, teacher, data, cache="off") is None
    fixed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batching="fixed"))
    assert _open(fixed, teacher, data, cache="auto") is None  # the published padding: the live teacher
    bf16 = _open(cfg, teacher, data, cache="memory", cache_dtype="bf16")
    b = _batches(data, 1)[0]
    live = teacher(b.input_ids, b.token_type_ids, b.attention_mask, keep=ALL)
    got = bf16.batch(b.index, b.input_ids.shape[1], ALL, torch.device("cpu"))
    m = b.attention_mask[:, :, None].expand_as(live.embeddings)
    torch.testing.assert_close(got.embeddings[m], live.embeddings[m], rtol=2 ** -8, atol=1e-6)  # bf16 rounding
    assert bf16.nbytes * 2 == mem.nbytes
    assert tc.cache_bytes(ALL, bf16.lengths, bf16.meta["shape"], "fp32") == mem.nbytes


def test_training_with_the_cache_matches_the_live_teacher_under_padding_invariant_losses(tmp_path, tiny_base, glue_dir):
    import quant_task_glue
    from safetensors.torch import load_file
    runs = {}
    for mode in ("off", "disk"):
        flags = tiny_flags(tmp_path / mode, tiny_base, glue_dir, steps=4)
        flags[flags.index("--model.teacher_dir") + 1] = str(tmp_path / "teacher")  # one teacher for both
        argv = ["sts-b", *flags, "--loss.padding_invariant", "--quant.act_granularity", "token", "--teacher.cache", mode,
                "--train.log_every", "1", "--train.run_name", "r"]
        assert quant_task_glue.main(argv) == 0
        runs[mode] = tmp_path / mode / "out" / "sts-b" / "r"
    losses = {m: [json.loads(l) for l in (r / "metrics.jsonl").read_text().splitlines() if "loss/total" in l]
              for m, r in runs.items()}
    for a, b in zip(losses["off"], losses["disk"]):
        for k in a:
            if k.startswith("loss/"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    wa, wb = (load_file(str(r / "model.safetensors")) for r in runs.values())
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
