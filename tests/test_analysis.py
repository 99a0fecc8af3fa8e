"""Analyses (docs/algorithms.md §8) on hand-made maps and on a tiny real teacher/student pair: hand values, zero at identity,
padding invariance, Hessian eigenvalues against a dense Hessian, norm analysis against a direct computation,
mismatch errors, the CLI and the three notebooks run headless."""
import json
import math
import re

import numpy as np
import pytest
import torch

import analyze_kd
import quant_task_glue
from tests.conftest import REPO, TINY, make_base_model, tiny_flags
import utils_glue
from transformer import analysis as A
from transformer import analysis_plots as plots
from transformer.data import collate
from transformer.model import BertForGlue, BertShape
from transformer.quant import QuantLinear

NOTEBOOKS = ["Exp1_Attention_Map_Distance", "Exp2_Hessian_Spectrum", "Exp3_Attention_Output_Analysis"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: extra threads only add contention (the CI machine may be busy training)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, glue_dir):
    """A tiny fine-tuned teacher and a tiny W2A8 map-recipe student made by the real CLI (a few seconds)."""
    from transformers import BertTokenizerFast
    tmp = tmp_path_factory.mktemp("analysis_pair")
    base = make_base_model(tmp / "base")
    # a tokenizer that really knows the tiny vocabulary (letters, '.', ','), so token classes are exercised
    BertTokenizerFast(vocab=str(base / "vocab.txt"), do_lower_case=True).save_pretrained(str(base))
    argv = ["--data.task", "sts-b", *tiny_flags(tmp, base, glue_dir, 3), "--train.eval_every", "3",
            "--loss.attn_score_mse_weight", "0", "--loss.attn_prob_kl_weight", "1"]
    assert quant_task_glue.main(argv) == 0
    (run,) = (tmp / "out" / "sts-b").iterdir()
    return {"teacher": tmp / "teacher", "student": run, "glue": glue_dir, "tmp": tmp}


@pytest.fixture(scope="module")
def setup(pair):
    return A.load_setup(pair["teacher"], [pair["student"]], "sts-b", n_examples=6, labels=["map"])


def _maps(B=2, H=3, S=6, lengths=(6, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    valid = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
    scores = torch.randn(B, H, S, S, generator=g) * 2 + (~valid)[:, None, None, :] * -10000.0
    return scores.softmax(-1), valid


# ---------------------------------------------------------------------------------------------
# Distances on hand-made maps

T3 = torch.tensor([[[[0.7, 0.2, 0.1], [0.15, 0.8, 0.05], [0.3, 0.25, 0.45]]]])   # (1, 1, 3, 3), rows sum to 1
S3 = torch.tensor([[[[0.2, 0.7, 0.1], [0.15, 0.8, 0.05], [0.3, 0.25, 0.45]]]])   # row 0: keys 0 and 1 swapped
V3 = torch.ones(1, 3, dtype=torch.bool)


def test_hand_values_on_3x3_maps():
    # KL: only row 0 differs: 0.7 ln(0.7/0.2) + 0.2 ln(0.2/0.7) = 0.5 ln 3.5, averaged over s = 3 rows
    assert A.attn_kl(T3, S3, V3).item() == pytest.approx(0.5 * math.log(3.5) / 3, rel=1e-6)
    # ranking, row 0: (0,1) and (1,0) disagree by |0.2 - 0.7| = 0.5 each; every other pair agrees
    assert A.attn_ranking_loss(T3, S3, V3).item() == pytest.approx(1.0)
    # a teacher tie costs nothing; row 2 student (0.5, 0.1, 0.4): keys 0, 2 misordered by 0.1, counted twice
    s = T3.clone()
    s[0, 0, 2] = torch.tensor([0.5, 0.1, 0.4])
    t = T3.clone()
    t[0, 0, 2] = torch.tensor([0.3, 0.3, 0.4])
    assert A.attn_ranking_loss(t, s, V3).item() == pytest.approx(0.2)
    # cover ratio, k=1: teacher's top key has student rank 2, 1, 1 (1-based) in rows 0, 1, 2 -> (2+1+1)/3/3
    assert A.attn_topk_cover_ratio(T3, S3, V3, k=1).item() == pytest.approx(4 / 9)
    assert A.attn_topk_cover_ratio(T3, T3, V3, k=1).item() == pytest.approx(1 / 3)  # identical: k/s
    assert A.attn_topk_cover_ratio(T3, S3, V3, k=5).item() == pytest.approx(1.0)    # k > s: every key
    # attention distance: rows (0.2 + 0.2, 0.15 + 0.05, 0.6 + 0.25) = 1.45, / s^2
    assert A.attn_distance(T3, V3).item() == pytest.approx(1.45 / 9)
    assert A.attn_distance(torch.eye(3)[None, None], V3).item() == 0
    assert A.attn_distance(torch.full((1, 1, 3, 3), 1 / 3), V3).item() == pytest.approx(8 / 27)


def test_identical_maps_give_zero_and_different_maps_positive():
    p_t, valid = _maps()
    p_s, _ = _maps(seed=1)
    lengths = valid.sum(-1, keepdim=True).float()
    for f in (A.attn_kl, A.attn_ranking_loss):
        assert torch.allclose(f(p_t, p_t, valid), torch.zeros(2, 3), atol=1e-6), f.__name__
        assert (f(p_t, p_s, valid) > 1e-3).all(), f.__name__
    # the cover ratio's minimum is min(k, s)/s (reached by identical maps); the attention distance is per map
    torch.testing.assert_close(A.attn_topk_cover_ratio(p_t, p_t, valid, k=2), (2 / lengths).expand(2, 3))
    assert (A.attn_topk_cover_ratio(p_t, p_s, valid, k=2) > 2 / lengths).all()
    assert (A.attn_distance(p_t, valid) - A.attn_distance(p_s, valid)).abs().max() > 1e-3


def test_each_sample_is_masked_by_its_own_length():
    p_t, valid = _maps(B=2, lengths=(6, 4))
    p_s, _ = _maps(B=2, lengths=(6, 4), seed=1)
    # sample 1 alone, unpadded, must give what it gives padded in the batch, whatever sits in the padding
    p_t_pad, p_s_pad = p_t.clone(), p_s.clone()
    p_t_pad[1, :, 4:], p_s_pad[1, :, 4:] = 0.3, 0.9   # garbage rows of padded queries
    for f in (A.attn_kl, A.attn_ranking_loss, A.attn_topk_cover_ratio):
        alone = f(p_t[1:, :, :4, :4], p_s[1:, :, :4, :4], valid[1:, :4])
        torch.testing.assert_close(f(p_t_pad, p_s_pad, valid)[1:], alone, msg=f.__name__)
    torch.testing.assert_close(A.attn_distance(p_t_pad, valid)[1:], A.attn_distance(p_t[1:, :, :4, :4], valid[1:, :4]))


def test_ranking_loss_matches_a_loop():
    p_t, valid = _maps(B=2, H=2, S=5, lengths=(5, 3))
    p_s, _ = _maps(B=2, H=2, S=5, lengths=(5, 3), seed=2)
    ref = torch.zeros(2, 2)
    for b in range(2):
        s = int(valid[b].sum())
        for h in range(2):
            for r in range(s):
                for i in range(s):
                    for j in range(s):
                        d = -(p_s[b, h, r, i] - p_s[b, h, r, j]) * torch.sign(p_t[b, h, r, i] - p_t[b, h, r, j])
                        ref[b, h] += d.clamp_min(0)
    torch.testing.assert_close(A.attn_ranking_loss(p_t, p_s, valid), ref)
    torch.testing.assert_close(A.attn_ranking_loss(p_t, p_s, valid, max_elements=50), ref)  # one row per chunk
    # its speed on a 12-layer, 12-head, 128-token pair is measured by bench/bench_ranking_loss.py


# ---------------------------------------------------------------------------------------------
# Hessian


def _mlp_problem(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 3)).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(3, (20,))
    params = list(net.parameters())
    shapes = [p.shape for p in params]

    def loss_of(flat):  # CE + 0.01 Σ‖p‖ as a function of the flat parameter vector (259 entries)
        named, i = {}, 0
        for (name, _), shape in zip(net.named_parameters(), shapes):
            named[name] = flat[i:i + shape.numel()].view(shape)
            i += shape.numel()
        out = torch.func.functional_call(net, named, (x,))
        return torch.nn.functional.cross_entropy(out, y) + 0.01 * sum(p.norm() for p in named.values())

    return params, loss_of


def test_power_iteration_matches_the_dense_hessian():
    params, loss_of = _mlp_problem()
    flat = torch.cat([p.detach().flatten() for p in params])
    assert 200 <= flat.numel() <= 400
    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))
    top3 = exact[exact.abs().argsort(descending=True)][:3]
    got = A.hessian_eigenvalues(lambda: loss_of(torch.cat([p.flatten() for p in params])), params, k=3,
                                tol=1e-8, max_iter=3000)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), top3, rtol=1e-3, atol=0)
    # the published settings (tol 1e-3, 100 steps) land within a percent here
    rough = A.hessian_eigenvalues(lambda: loss_of(torch.cat([p.flatten() for p in params])), params, k=3)
    torch.testing.assert_close(torch.tensor(rough, dtype=torch.float64), top3, rtol=1e-2, atol=0)


def test_power_iteration_finds_a_negative_top_eigenvalue():
    # quadratic ½ xᵀ A x with known spectrum; the largest |λ| is negative
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    spectrum = torch.tensor([-3.0, 2.0, 1.0, 0.5, -0.2, 0.1], dtype=torch.float64)
    a = q @ torch.diag(spectrum) @ q.T
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    got = A.hessian_eigenvalues(lambda: 0.5 * x @ a @ x, [x], k=3, tol=1e-10, max_iter=2000)
    assert got == pytest.approx([-3.0, 2.0, 1.0], rel=1e-4)


def test_hessian_runs_through_the_quantized_student(setup):
    student = setup.students["map"]
    assert isinstance(student.bert.encoder.layer[0].attention.self.query, QuantLinear)
    b = collate(setup.dev, [0], pad_to=None)
    params = list(student.parameters())
    hvp = A.hessian_vector_product(A.task_loss(student, b, regression=True), params)
    g = torch.Generator().manual_seed(0)
    u, v = ([torch.randn(p.shape, generator=g) for p in params] for _ in range(2))
    hu, hv = hvp(u), hvp(v)
    # double backward through the STE Function gives a symmetric operator, non-zero on the latent ternary weights
    assert A._dot(u, hv).item() == pytest.approx(A._dot(v, hu).item(), rel=1e-3)
    q_index = next(i for i, (n, _) in enumerate(student.named_parameters()) if n.endswith("layer.0.attention.self.query.weight"))
    assert hu[q_index].abs().sum() > 0
    spectra = A.hessian_spectra(setup, n_examples=2, k=2, max_iter=10)
    assert set(spectra) == {"teacher", "map"}
    assert all(e.shape == (2, 2) and np.isfinite(e).all() for e in spectra.values())
    assert all(not p.training for p in (student, setup.teacher))


# ---------------------------------------------------------------------------------------------
# Attention output, norm analysis, heat maps on the tiny pair


def test_models_run_in_eval_mode_whatever_the_caller_left(setup):
    first = A.compare_attention_maps(setup)["map"]
    setup.students["map"].train()
    setup.teacher.train()
    again = A.compare_attention_maps(setup)["map"]
    for k in first:
        np.testing.assert_allclose(again[k], first[k], rtol=1e-6, atol=1e-6)
    assert not setup.teacher.training and not setup.students["map"].training
    assert all(v.shape == (TINY.num_layers, TINY.num_heads) for v in first.values())
    assert (first["kl"] > 0).all() and (first["ranking"] > 0).all()


def test_attention_map_distance_is_zero_for_the_same_model_and_batch_independent(setup):
    same = A.attention_map_distance(setup.teacher, setup.teacher, setup.dev)
    assert np.abs(same["kl"]).max() < 1e-6 and np.abs(same["ranking"]).max() < 1e-6
    np.testing.assert_allclose(same["attn_distance"], same["attn_distance_teacher"])
    # batches padded to their longest member give the per-example values (the teacher has no batch-wide scale)
    batched = A.attention_map_distance(setup.teacher, setup.teacher, setup.dev, batch_size=4)
    np.testing.assert_allclose(batched["cover_ratio"], same["cover_ratio"], rtol=1e-5)
    np.testing.assert_allclose(batched["attn_distance"], same["attn_distance"], rtol=1e-5)


def test_attention_output_range_is_min_and_max_over_hidden(setup):
    ranges = A.attention_output_ranges(setup)
    b = collate(setup.dev, [1], pad_to=None)
    out = setup.students["map"](b.input_ids, b.token_type_ids, b.attention_mask, keep=frozenset({"attn_output"}))
    x = torch.stack([lo.attn_output[0] for lo in out.layers])   # (L, s, D)
    r = ranges["map"]
    np.testing.assert_allclose(r["max"][1], x.amax(-1).detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(r["min"][1], x.amin(-1).detach().numpy(), rtol=1e-6)
    assert len(r["max"]) == len(setup.dev) and r["max"][1].shape == (TINY.num_layers, len(setup.dev.input_ids[1]))
    # the figure's legend names the right curve (the published notebook had min and max swapped)
    fig = plots.plot_attention_output_range(ranges, example=1)
    lines = {line.get_label(): line.get_ydata() for line in fig.axes[0].get_lines()}
    np.testing.assert_allclose(lines["map max"], r["max"][1][0])
    np.testing.assert_allclose(lines["teacher min"], ranges["teacher"]["min"][1][0])
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes if ax.get_visible())


def test_token_classes(pair):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(pair["teacher"]))
    classes = A.token_classes(tok)
    names = [A.TOKEN_CLASSES[c] for c in classes[tok.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", ",", "a", "##b"])]]
    assert names == ["[CLS]", "[SEP]", "punctuation", "punctuation", "other", "other"]


def test_norm_analysis_equals_a_direct_computation(setup):
    student = setup.students["map"]
    dense = student.bert.encoder.layer[1].attention.output.dense
    w_o = A.output_weight(dense)
    assert len(torch.unique(w_o)) <= 3  # the student's ternary W_O, not the latent FP weight
    b = collate(setup.dev, [0, 2], pad_to=None)
    out = student(b.input_ids, b.token_type_ids, b.attention_mask, keep=frozenset({"probs", "value"}))
    probs, value = out.layers[1].probs.detach(), out.layers[1].value.detach()
    f_norm, af_norm, sum_af = A.kobayashi_norms(probs, value, w_o)
    B, H, S, dh = value.shape
    for bi in range(B):
        for i in range(S):
            total = {j: torch.zeros(TINY.hidden_size) for j in range(S)}
            for h in range(H):
                for j in range(S):
                    f = value[bi, h, j] @ w_o[:, h * dh:(h + 1) * dh].T   # f_h(x_j) = V_h[j] W_O^h
                    assert f_norm[bi, h, j].item() == pytest.approx(f.norm().item(), rel=1e-5)
                    assert af_norm[bi, h, i, j].item() == pytest.approx((probs[bi, h, i, j] * f).norm().item(), rel=1e-5, abs=1e-7)
                    total[j] += probs[bi, h, i, j] * f
            for j in range(S):
                assert sum_af[bi, i, j].item() == pytest.approx(total[j].norm().item(), rel=1e-5, abs=1e-7)
    # per-class means over (valid query, valid key of the class) pairs, for example 0 alone (as norm_analysis runs
    # it: with a batch, the student's per-tensor activation scale would also see the other example)
    b = collate(setup.dev, [0], pad_to=None)
    out = student(b.input_ids, b.token_type_ids, b.attention_mask, keep=frozenset({"probs", "value"}))
    probs = out.layers[1].probs.detach()
    f_norm, af_norm, sum_af = A.kobayashi_norms(probs, out.layers[1].value.detach(), w_o)
    one = A.Setup(setup.task, setup.teacher, setup.students, setup.tokenizer,
                  utils_glue.Encoded(setup.dev.input_ids[:1], setup.dev.token_type_ids[:1], setup.dev.labels[:1]))
    classes = A.token_classes(setup.tokenizer, TINY.vocab_size)
    res = A.norm_analyses(one)["map"]
    s = len(setup.dev.input_ids[0])
    key_class = classes[torch.tensor(setup.dev.input_ids[0])]
    for c in range(len(A.TOKEN_CLASSES)):
        keys = (key_class == c).nonzero().flatten()
        if len(keys) == 0:
            assert np.isnan(res["alpha"][1, :, c]).all()
            continue
        np.testing.assert_allclose(res["alpha"][1, :, c], probs[0, :, :s][:, :, keys].mean((1, 2)).numpy(), rtol=1e-5)
        np.testing.assert_allclose(res["af_norm"][1, :, c], af_norm[0, :, :s][:, :, keys].mean((1, 2)).numpy(), rtol=1e-5)
        np.testing.assert_allclose(res["sum_af_norm"][1, c], sum_af[0, :s][:, keys].mean().item(), rtol=1e-5)
    for cls in ("[CLS]", "[SEP]", "other"):  # (the tiny examples' punctuation is cut by max_seq_len 32)
        assert np.isfinite(res["alpha"][:, :, A.TOKEN_CLASSES.index(cls)]).all()


def test_heatmaps_and_tokens(setup):
    maps = A.attention_heatmaps(setup, example=2)
    s = len(setup.dev.input_ids[2])
    assert maps["map"].shape == (TINY.num_layers, TINY.num_heads, s, s)
    np.testing.assert_allclose(maps["teacher"].sum(-1), 1, rtol=1e-5)
    assert A.example_tokens(setup, 2)[0] == "[CLS]"
    fig = plots.plot_attention_heatmaps(maps, layer=2, tokens=A.example_tokens(setup, 2), heads=[1, 3])
    assert "map − teacher" in fig.axes[2 * 2].get_title()


# ---------------------------------------------------------------------------------------------
# Mismatches


def test_mismatched_task_teacher_or_architecture_is_refused(pair, tmp_path):
    rte_teacher = make_base_model(tmp_path / "rte_teacher", num_labels=2)
    cases = [
        (lambda: A.load_setup(pair["teacher"], [pair["student"]], "rte"), "trained on sts-b, not rte"),
        (lambda: A.load_setup(rte_teacher, [pair["student"]], "sts-b"), "num_labels=2 but task sts-b needs 1"),
        (lambda: A.load_setup(pair["teacher"], [pair["student"]], "sts-b", labels=["teacher"]), "distinct label"),
        (lambda: A.check_comparable(BertForGlue(TINY), BertForGlue(BertShape(**{**TINY.__dict__, "num_layers": 1}))),
         "differ in num_layers"),
        (lambda: A.attention_map_distance(BertForGlue(TINY), BertForGlue(BertShape(**{**TINY.__dict__, "num_heads": 2})),
                                          None), "differ in num_heads"),
    ]
    for call, match in cases:
        with pytest.raises(A.AnalysisError, match=re.escape(match)) as e:
            call()
        assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# CLI and notebooks


def test_cli_writes_every_figure_and_the_numbers(pair, tmp_path, capsys):
    out = tmp_path / "figs"
    argv = ["--teacher", str(pair["teacher"]), "--students", str(pair["student"]), "--labels", "map", "--task", "sts-b",
            "--out", str(out), "--n-examples", "4", "--hessian-examples", "2", "--hessian-max-iter", "5",
            "--heatmap-heads", "1", "2"]
    assert analyze_kd.main(argv) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(["attention_map_distance.png", "attention_map_distance_heads.png", "hessian_spectrum.png",
                           "attention_output_range.png", "attention_output_range_summary.png", "norm_analysis.png",
                           f"attention_heatmaps_layer{TINY.num_layers}.png"])
    assert all((out / p).stat().st_size < 200_000 for p in pngs)
    record = json.loads((out / "analysis.json").read_text())
    assert record["task"] == "sts-b" and record["n_examples"] == 4 and "analyze_kd.py" in record["command"]
    assert np.array(record["attention_map_distance"]["map"]["kl"]).shape == (TINY.num_layers, TINY.num_heads)
    assert np.array(record["hessian"]["teacher"]).shape == (2, 3)
    capsys.readouterr()
    assert analyze_kd.main([*argv[:6], "--task", "rte", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not rte" in err and len(err.splitlines()) == 1


def _set_parameters(source: str, values: dict) -> str:
    """Replace `NAME = ...` lines of the notebook's first cell (multi-line list values included)."""
    for name, value in values.items():
        pattern = re.compile(rf"^{name} = (\[[^\]]*\]|[^\n#]*?)(\s*#.*)?$", re.M)
        source, n = pattern.subn(lambda m: f"{name} = {value!r}{m.group(2) or ''}", source, count=1)
        assert n == 1, f"first cell has no {name} = ..."
    return source


@pytest.mark.slow
def test_notebooks_run_headless(pair, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernels inherit it: tiny models, busy machine
    common = {"TEACHER": str(pair["teacher"]), "STUDENTS": [str(pair["student"])], "LABELS": ["map"], "TASK": "sts-b",
              "GLUE_DIR": str(pair["glue"]), "FIG_DIR": str(tmp_path / "figs")}
    extra = {"Exp1_Attention_Map_Distance": {"N_EXAMPLES": 4},
             "Exp2_Hessian_Spectrum": {"HESSIAN_EXAMPLES": 2, "MAX_ITER": 5},
             "Exp3_Attention_Output_Analysis": {"N_EXAMPLES": 4, "LAYER": 2, "HEADS": [1, 2]}}
    for name in NOTEBOOKS:
        nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name} committed with outputs"
        assert all("def " not in c.source for c in nb.cells), f"{name} defines functions"
        nb.cells[0].source = _set_parameters(nb.cells[0].source, {**common, **extra[name]})
        NotebookClient(nb, kernel_name="python3", timeout=300,
                       resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()  # raises on a cell error
        images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        assert images, f"{name} displayed no figure"
    assert len(list((tmp_path / "figs").glob("*.png"))) == 7
