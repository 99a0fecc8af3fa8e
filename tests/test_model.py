"""Our BERT: named outputs, padding, strict checkpoint I/O, and parity with Hugging Face."""
import json
import shutil

import pytest
import torch

from transformer.model import KEEPABLE, BertForGlue, CheckpointError, load_bert, save_bert
from tests.conftest import MINILM, TINY, make_base_model, needs_minilm


def _inputs(B=3, S=9, vocab=TINY.vocab_size, lengths=(9, 5, 2)):
    ids = torch.randint(5, vocab, (B, S))
    mask = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
    types = torch.zeros(B, S, dtype=torch.long)
    types[:, S // 2:] = 1
    return ids, types, mask


def test_forward_keeps_only_what_is_asked_with_documented_shapes():
    model = BertForGlue(TINY).eval()
    ids, types, mask = _inputs()
    B, S, H, D = 3, 9, TINY.num_heads, TINY.hidden_size
    none = model(ids, types, mask)
    assert none.logits.shape == (B, TINY.num_labels) and none.embeddings is None
    assert all(getattr(l, k) is None for l in none.layers for k in KEEPABLE)
    full = model(ids, types, mask, keep=KEEPABLE)
    shapes = {"hidden": (B, S, D), "scores": (B, H, S, S), "probs": (B, H, S, S), "context": (B, H, S, D // H),
              "value": (B, H, S, D // H), "sa_output": (B, S, D), "attn_output": (B, S, D)}
    for layer in full.layers:
        for k, shape in shapes.items():
            assert getattr(layer, k).shape == shape, k
    assert len(full.hidden_states()) == TINY.num_layers + 1
    torch.testing.assert_close(full.layers[0].probs, full.layers[0].scores.softmax(-1))
    assert (full.layers[0].scores[1, :, :, 5:] <= -100).all()  # padded keys carry the additive mask
    torch.testing.assert_close(full.logits, none.logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot keep"):
        model(ids, types, mask, keep=frozenset({"attention"}))


def test_padding_does_not_change_real_tokens_in_fp():
    model = BertForGlue(TINY).eval()
    ids, types, mask = _inputs(B=1, S=5, lengths=(5,))
    a = model(ids, types, mask, keep=frozenset({"hidden"}))
    pad_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    pad_types = torch.cat([types, torch.zeros(1, 4, dtype=torch.long)], 1)
    pad_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)], 1)
    b = model(pad_ids, pad_types, pad_mask, keep=frozenset({"hidden"}))
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.layers[-1].hidden[:, :5], a.layers[-1].hidden, rtol=0, atol=1e-5)


def test_save_load_round_trip_is_exact(tmp_path):
    model = BertForGlue(TINY).eval()
    save_bert(model, tmp_path / "m")
    again = load_bert(tmp_path / "m", num_labels=TINY.num_labels).eval()
    args = _inputs()
    torch.testing.assert_close(again(*args).logits, model(*args).logits, rtol=0, atol=0)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]


def test_hf_parity_on_a_tiny_random_checkpoint(tmp_path):
    from transformers import BertForSequenceClassification
    base = make_base_model(tmp_path / "tiny", num_labels=3)
    ours = load_bert(base).eval()
    hf = BertForSequenceClassification.from_pretrained(str(base)).eval()
    args = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=args[0], token_type_ids=args[1], attention_mask=args[2].long()).logits
        torch.testing.assert_close(ours(*args).logits, ref, rtol=0, atol=1e-5)


@needs_minilm
def test_hf_parity_on_the_real_minilm_checkpoint():
    """Quantization off, our logits and hidden states equal HF BertForSequenceClassification (fp32, ≤ 1e-5)."""
    from transformers import BertForSequenceClassification
    torch.manual_seed(0)
    ours = load_bert(MINILM, num_labels=2, new_classifier=True).eval()
    hf = BertForSequenceClassification.from_pretrained(str(MINILM), num_labels=2).eval()
    hf.classifier.load_state_dict(ours.classifier.state_dict())
    ids, types, mask = _inputs(B=3, S=16, vocab=30522, lengths=(16, 11, 4))
    with torch.no_grad():
        a = ours(ids, types, mask, keep=frozenset({"hidden"}))
        b = hf(input_ids=ids, token_type_ids=types, attention_mask=mask.long(), output_hidden_states=True)
    assert (a.logits - b.logits).abs().max().item() <= 1e-5
    assert len(b.hidden_states) == 7
    for x, y in zip(a.hidden_states(), b.hidden_states):
        assert (x - y)[mask].abs().max().item() <= 1e-5  # HF lets padded positions drift; real tokens must match
    # pinned slice (printed once by this same code): "[CLS] hello world [SEP]", last layer, [CLS], first 3 dims
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        last = ours(ids, torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool), keep=frozenset({"hidden"}))
    torch.testing.assert_close(last.layers[-1].hidden[0, 0, :3], torch.tensor([0.176445, 0.039366, 0.077902]),
                               rtol=0, atol=1e-5)


def test_checkpoint_errors_are_one_clear_line(tmp_path):
    base = make_base_model(tmp_path / "ok", num_labels=2)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_bert(tmp_path / "missing")
    bad = tmp_path / "roberta"
    shutil.copytree(base, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    with pytest.raises(CheckpointError, match="not a BERT checkpoint"):
        load_bert(bad)
    with pytest.raises(CheckpointError, match="num_labels=2 but the task needs 1"):
        load_bert(base, num_labels=1)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(base / "config.json", noweights / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_bert(noweights)
    trunc = tmp_path / "trunc"
    shutil.copytree(base, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read the weights"):
        load_bert(trunc)


def test_strict_load_rejects_unknown_and_missing_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    base = make_base_model(tmp_path / "ok")
    sd = load_file(str(base / "model.safetensors"))
    extra = tmp_path / "extra"
    shutil.copytree(base, extra)
    save_file({**sd, "bert.encoder.layer.0.attention.self.rotary.weight": torch.zeros(1)}, str(extra / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        load_bert(extra)
    missing = tmp_path / "missing_q"
    shutil.copytree(base, missing)
    save_file({k: v for k, v in sd.items() if "layer.1.attention.self.query.weight" not in k}, str(missing / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor"):
        load_bert(missing)
    body = tmp_path / "body_only"  # a BertModel checkpoint: no "bert." prefix, no classifier
    shutil.copytree(base, body)
    save_file({k.removeprefix("bert."): v for k, v in sd.items() if not k.startswith("classifier")}, str(body / "model.safetensors"))
    with pytest.raises(CheckpointError, match="has no classifier"):
        load_bert(body)
    assert load_bert(body, num_labels=5, new_classifier=True).classifier.out_features == 5


def test_dropout_scales_kept_entries_and_keeps_a_bool_mask():
    from transformer.fast import Dropout
    drop = Dropout(0.25)
    x = (torch.rand(64, 1000) + 0.5).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = drop(x)
    kept = y != 0
    assert [t.dtype for t in saved] == [torch.bool] and saved[0].equal(kept)
    torch.testing.assert_close(y[kept], x[kept] * (1 / 0.75), rtol=0, atol=0)  # as torch: x · (1 / (1 − p))
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # 64,000 draws: the keep rate is 0.75 ± 0.005 (3σ)
    y.backward(torch.full_like(y, 3.0))
    torch.testing.assert_close(x.grad, kept * (3.0 / 0.75), rtol=0, atol=0)
    torch.manual_seed(5)
    a = drop(x.detach())
    torch.manual_seed(5)
    assert a.equal(drop(x.detach()))  # seeded: resume and reruns draw the same masks
    assert drop.eval()(x).equal(x) and Dropout(0.0)(x).equal(x)


def test_a_base_checkpoint_without_pooler_gets_a_fresh_pooler_and_strict_loads_stay_strict(tmp_path, capsys):
    from transformers import BertConfig, BertModel
    hf_cfg = BertConfig(vocab_size=TINY.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, initializer_range=0.05)
    base = tmp_path / "no_pooler"
    BertModel(hf_cfg, add_pooling_layer=False).save_pretrained(str(base))  # a sentence-embedding style checkpoint
    torch.manual_seed(1)
    model = load_bert(base, num_labels=3, new_classifier=True)
    assert "no pooler weights" in capsys.readouterr().out
    assert model.shape.num_layers == 3 and model.classifier.out_features == 3
    w = model.bert.pooler.dense.weight
    assert (model.bert.pooler.dense.bias == 0).all() and 0.04 < w.std().item() < 0.06  # HF init, its initializer_range
    # the body is the checkpoint's, exactly
    from safetensors.torch import load_file
    sd = load_file(str(base / "model.safetensors"))
    assert torch.equal(model.bert.encoder.layer[2].output.dense.weight, sd["encoder.layer.2.output.dense.weight"])
    # a teacher or student load (no new head) still refuses the folder
    with pytest.raises(CheckpointError, match="has no classifier"):
        load_bert(base, num_labels=3)
    saved = tmp_path / "fine_tuned"
    save_bert(model, saved)
    del_pooler = {k: v for k, v in load_file(str(saved / "model.safetensors")).items() if "pooler" not in k}
    from safetensors.torch import save_file
    save_file(del_pooler, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor"):
        load_bert(saved, num_labels=3)  # a fine-tuned model without its pooler is broken, not a base
