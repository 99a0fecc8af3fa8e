"""Training batches: the plain seeded shuffle (batching=shuffle/fixed) and length buckets (batching=length, the
default), which keep every example once per epoch, pad less, and resume / shard like the plain shuffle."""
import itertools

import numpy as np
import torch

import utils_glue
from transformer.data import epoch_batches, train_batches


def encoded(n: int = 203, seed: int = 0) -> utils_glue.Encoded:
    rng = np.random.default_rng(seed)
    ids = [list(rng.integers(5, 50, int(rng.integers(3, 60)))) for _ in range(n)]
    return utils_glue.Encoded(ids, [[0] * len(x) for x in ids], np.arange(n))


def labels_of(stream, steps: int) -> list[list[int]]:
    return [[int(l) for b, _ in item for l in b.labels] for item in itertools.islice(stream, steps)]


def test_default_batches_are_the_seeded_shuffle():
    enc = encoded()
    order = torch.randperm(len(enc), generator=torch.Generator().manual_seed(7 * 1000 + 0)).tolist()
    got = labels_of(train_batches(enc, 16, 7, None), 13)
    assert got == [order[s:s + 16] for s in range(0, len(enc), 16)]
    batch = next(train_batches(enc, 16, 7, None))[0][0]
    assert batch.input_ids.shape[1] == max(len(enc.input_ids[i]) for i in order[:16])  # padded to the longest


def test_length_buckets_cover_every_example_once_and_pad_less():
    enc = encoded()
    lengths = np.array([len(x) for x in enc.input_ids])
    for epoch in range(2):
        batches = epoch_batches(lengths, 16, 3, epoch, length_buckets=4)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(enc)))
        assert epoch_batches(lengths, 16, 3, epoch, length_buckets=4)[0].tolist() == batches[0].tolist()  # deterministic
    padded = {k: sum(int(lengths[b].max()) * len(b) for b in epoch_batches(lengths, 16, 3, 0, k)) for k in (None, 4)}
    assert padded[4] < 0.8 * padded[None]


def test_length_buckets_resume_and_shard_like_the_default():
    enc = encoded()
    full = labels_of(train_batches(enc, 16, 3, None, length_buckets=4), 30)
    assert labels_of(train_batches(enc, 16, 3, None, start_step=17, length_buckets=4), 13) == full[17:]
    shards = [labels_of(train_batches(enc, 16, 3, None, rank=r, world=2, length_buckets=4), 30) for r in range(2)]
    assert [a + b for a, b in zip(*shards)] == full


def test_batching_flag_maps_to_the_stream_and_dev_padding():
    from transformer.config import DataConfig, RunConfig
    from transformer.data import eval_pad_to, train_padding
    assert DataConfig().batching == "length"
    cases = {"length": ({"pad_to": None, "length_buckets": 50}, None),
             "shuffle": ({"pad_to": None, "length_buckets": None}, None),
             "fixed": ({"pad_to": 128, "length_buckets": None}, 128)}
    for batching, (stream, dev) in cases.items():
        cfg = DataConfig(batching=batching, max_seq_len=128)
        assert train_padding(cfg) == stream and eval_pad_to(cfg) == dev
    # run_config.json files written before data.batching existed still load, with the batching they used
    old = RunConfig().to_dict()
    del old["data"]["batching"]
    for pad_to_max, batching in ((True, "fixed"), (False, "shuffle")):
        old["data"]["pad_to_max"] = pad_to_max
        assert RunConfig.from_dict(old).data.batching == batching

