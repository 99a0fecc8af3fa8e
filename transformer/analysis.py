"""Why a KD loss helps (docs/algorithms.md §8): attention-map distances, Hessian spectrum, attention-output dynamic range,
norm analysis (Kobayashi et al. 2020) and attention heat maps. The notebooks and `analyze_kd.py` call these;
plots are in `transformer.analysis_plots`.

    setup = load_setup("models/sts-b", ["output/sts-b/<run>"], "sts-b", n_examples=64)
    dist = compare_attention_maps(setup)        # {student: {"kl": (L, H), "ranking": (L, H), ...}}

Conventions: models run in eval mode (dropout off) and without gradients, except for the Hessian; each sample is
masked by its own length (`valid`: (B, S) bool, True = real token); per-layer results are numpy arrays (L, H)
averaged over examples. Examples go through one at a time by default (batch_size=1), so a student's dynamic
per-tensor activation scale (docs/algorithms.md §2) sees only that sample: no padding, no other sequence.
"""
from __future__ import annotations

import json
import math
import string
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import utils_glue
from transformer.config import DataConfig, RunConfig, resolve
from transformer.data import Batch, collate, eval_batches, load_task_data
from transformer.losses import row_kl
from transformer.model import BertForGlue, EncoderOutput, load_bert, read_shape
from transformer.quant import QuantLinear
from transformer.rundir import REPO, load_run, load_tokenizer

TOKEN_CLASSES = ("[CLS]", "[SEP]", "punctuation", "other")
TEACHER = "teacher"                   # the teacher's key in every {model label: result} dict


class AnalysisError(ValueError):
    """Teacher, students and task that do not belong together; the message is one line."""


# ---------------------------------------------------------------------------------------------
# Loading: teacher + students + dev examples, with the task checked against every checkpoint

@dataclass
class Setup:
    task: utils_glue.TaskSpec
    teacher: BertForGlue                # eval mode
    students: dict[str, BertForGlue]    # label -> student with its quantizers, eval mode
    tokenizer: object                   # the teacher's (HF) tokenizer
    dev: utils_glue.Encoded             # the first n_examples dev examples (unpadded)

    def models(self) -> dict[str, BertForGlue]:
        return {TEACHER: self.teacher, **self.students}


def load_teacher(folder: str | Path, task: utils_glue.TaskSpec) -> BertForGlue:
    """A fine-tuned FP teacher (HF folder) in eval mode; refuses one made for another task."""
    shape = read_shape(folder)
    if shape.num_labels != task.num_labels:
        raise AnalysisError(f"{folder}: teacher has num_labels={shape.num_labels} but task {task.name} needs {task.num_labels}")
    recorded = json.loads((Path(folder) / "config.json").read_text()).get("kdqat", {}).get("task")
    if recorded is not None and recorded != task.name:
        raise AnalysisError(f"{folder}: teacher was fine-tuned on {recorded}, not {task.name}")
    return load_bert(folder, num_labels=task.num_labels).eval()


def _check_student(run_dir, model: BertForGlue, cfg: RunConfig, task: utils_glue.TaskSpec) -> None:
    trained_on = utils_glue.get_task(cfg.data.task, cfg.data.custom_task).name
    if trained_on != task.name:
        raise AnalysisError(f"{run_dir}: student was trained on {trained_on}, not {task.name}")
    if model.shape.num_labels != task.num_labels:
        raise AnalysisError(f"{run_dir}: student has num_labels={model.shape.num_labels} but task {task.name} needs {task.num_labels}")


def load_student(run_dir: str | Path, task: utils_glue.TaskSpec) -> tuple[BertForGlue, RunConfig]:
    """A saved student run folder with its quantizers, in eval mode; refuses one trained on another task."""
    model, cfg = load_run(run_dir)
    _check_student(run_dir, model, cfg, task)
    return model.eval(), cfg


def check_comparable(teacher: BertForGlue, student: BertForGlue, name: str = "student") -> None:
    """Per-layer, per-head comparisons need the same layers, heads and vocabulary."""
    for f in ("num_layers", "num_heads", "vocab_size"):
        a, b = getattr(teacher.shape, f), getattr(student.shape, f)
        if a != b:
            raise AnalysisError(f"teacher and {name} differ in {f} ({a} vs {b}); a per-layer comparison needs the same architecture")


def load_setup(teacher_dir: str | Path, student_dirs: list[str | Path], task: str, n_examples: int = 64,
               glue_dir: str | None = None, labels: list[str] | None = None, device: str = "cpu") -> Setup:
    """Teacher + students (labels default to the run folder names) + the first n_examples dev examples.

    Data settings (max length, custom task) come from the first student's run_config; glue_dir overrides its path."""
    student_dirs = [Path(d) for d in student_dirs]
    labels = list(labels) if labels else [d.name for d in student_dirs]
    if len(labels) != len(student_dirs) or len(set(labels)) != len(labels) or TEACHER in labels:
        raise AnalysisError(f"need one distinct label per student, other than {TEACHER!r}; got {labels}")
    runs = [load_run(d) for d in student_dirs]
    custom = next((cfg.data.custom_task for _, cfg in runs if cfg.data.custom_task), None)  # a custom task's JSON
    spec = utils_glue.get_task(task, custom)
    for d, (model, cfg) in zip(student_dirs, runs):
        _check_student(d, model, cfg, spec)
    students = {label: model.eval().to(device) for label, (model, _) in zip(labels, runs)}
    teacher = load_teacher(teacher_dir, spec).to(device)
    for label, s in students.items():
        check_comparable(teacher, s, label)
    data_cfg = runs[0][1].data if runs else resolve(RunConfig(data=DataConfig(task=spec.name))).data
    data_cfg = DataConfig(task=spec.name, glue_dir=glue_dir or _repo_relative(data_cfg.glue_dir), custom_task=custom,
                          max_seq_len=data_cfg.max_seq_len, limit_dev=n_examples)
    tokenizer = load_tokenizer(teacher_dir)
    dev = next(iter(load_task_data(data_cfg, tokenizer, with_train=False).dev.values()))  # MNLI: matched
    return Setup(spec, teacher, students, tokenizer, dev)


def _repo_relative(path: str) -> str:
    # a run records glue_dir as given on the command line, usually relative to the repository root where training
    # ran; analyses may run elsewhere (a notebook runs in notebooks/)
    return path if Path(path).exists() or not (REPO / path).exists() else str(REPO / path)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(enc: utils_glue.Encoded, batch_size: int, device: torch.device) -> Iterator[Batch]:
    for b in eval_batches(enc, batch_size, pad_to=None):  # padded to the longest in the batch
        yield b.to(device)


@torch.no_grad()
def _forward(model: BertForGlue, b: Batch, keep: set[str]) -> EncoderOutput:
    model.eval()  # dropout off, whatever the caller left it in
    return model(b.input_ids, b.token_type_ids, b.attention_mask, keep=frozenset(keep))


# ---------------------------------------------------------------------------------------------
# Attention-map distances: pure functions of (B, H, S, S) maps -> (B, H)

def _rows(valid: Tensor) -> Tensor:
    return valid[:, None, :].to(torch.float32)  # (B, 1, S): valid query rows


def _lengths(valid: Tensor) -> Tensor:
    return valid.sum(-1, keepdim=True).to(torch.float32)  # (B, 1): s_b


def attn_kl(p_t: Tensor, p_s: Tensor, valid: Tensor) -> Tensor:
    """KL(T‖S) of attention probabilities: (1/s) Σ_{r,c<s} p_T (log p_T − log p_S), per sample and head -> (B, H),
    the same quantity the attn_map loss averages."""
    return row_kl(p_t, p_s, valid)


def attn_ranking_loss(p_t: Tensor, p_s: Tensor, valid: Tensor, max_elements: int = 1 << 24) -> Tensor:
    """Pairwise ranking loss Σ_r Σ_{i,j} max(0, −(P_S[r,i] − P_S[r,j])·sign(P_T[r,i] − P_T[r,j])) over valid rows r
    and valid keys i, j (each unordered pair counted twice), per sample and head -> (B, H). Rows go in chunks
    of at most max_elements (B, H, rows, S, S) entries."""
    B, H, S, _ = p_t.shape
    keys = (valid[:, :, None] & valid[:, None, :])[:, None, None]   # (B, 1, 1, S, S): valid (i, j)
    rows = _rows(valid)
    total = p_t.new_zeros(B, H)
    step = max(1, max_elements // (B * H * S * S))
    for r0 in range(0, S, step):
        ps, pt = p_s[:, :, r0:r0 + step], p_t[:, :, r0:r0 + step]  # (B, H, R, S)
        d = ps[..., :, None] - ps[..., None, :]                     # (B, H, R, S, S): P_S[r,i] − P_S[r,j]
        d *= torch.sign(pt[..., :, None] - pt[..., None, :])        # in place: these are the largest tensors
        d.clamp_(max=0).masked_fill_(~keys, 0)                      # max(0, −x) = −min(x, 0)
        total -= (d.sum((-1, -2)) * rows[..., r0:r0 + step]).sum(-1)
    return total


def attn_topk_cover_ratio(p_t: Tensor, p_s: Tensor, valid: Tensor, k: int = 5) -> Tensor:
    """Top-k cover-length ratio: for each valid row, the largest student rank (1-based: 1 = the student's most
    attended key) among the teacher's top-k keys, divided by the sample length s; mean over rows -> (B, H).
    Identical maps give min(k, s)/s (its minimum), a student that misses the teacher's focus up to 1."""
    keys = valid[:, None, None, :]                                    # (B, 1, 1, S)
    order = p_s.masked_fill(~keys, -1).argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1).to(torch.float32) + 1                # (B, H, S, S): student rank of each key
    k = min(k, p_t.shape[-1])
    top = p_t.masked_fill(~keys, -1).topk(k, dim=-1).indices          # (B, H, S, k): teacher's top-k keys
    top_valid = torch.gather(keys.expand_as(p_t), -1, top)            # padding only where s < k
    cover = torch.gather(rank, -1, top).masked_fill(~top_valid, 0).amax(-1)   # (B, H, S)
    return (cover / _lengths(valid)[:, :, None] * _rows(valid)).sum(-1) / _lengths(valid)


def attn_distance(p: Tensor, valid: Tensor) -> Tensor:
    """Attention distance (1/s) Σ_{r,c<s} P[r,c]·|r − c| / s: how far a head looks, as a fraction of the length -> (B, H)."""
    S = p.shape[-1]
    pos = torch.arange(S, device=p.device, dtype=p.dtype)
    dist = (pos[:, None] - pos[None, :]).abs()                                    # (S, S)
    per_row = (p * dist).masked_fill(~valid[:, None, None, :], 0).sum(-1)          # (B, H, S)
    return (per_row * _rows(valid)).sum(-1) / _lengths(valid).square()


def attention_map_distance(teacher: BertForGlue, student: BertForGlue, enc: utils_glue.Encoded,
                           batch_size: int = 1, top_k: int = 5) -> dict[str, np.ndarray]:
    """Per layer and head, mean over examples of attn_kl, attn_ranking_loss, attn_topk_cover_ratio and the
    attention distance of student and teacher. Returns {"kl", "ranking", "cover_ratio", "attn_distance",
    "attn_distance_teacher"} -> (L, H)."""
    check_comparable(teacher, student)
    L, H = teacher.shape.num_layers, teacher.shape.num_heads
    names = ("kl", "ranking", "cover_ratio", "attn_distance", "attn_distance_teacher")
    sums = {n: torch.zeros(L, H, dtype=torch.float64) for n in names}
    for b in _batches(enc, batch_size, _device(teacher)):
        t, s = _forward(teacher, b, {"probs"}), _forward(student, b.to(_device(student)), {"probs"})
        v = b.attention_mask
        for l, (lt, ls) in enumerate(zip(t.layers, s.layers)):
            pt, ps = lt.probs, ls.probs.to(lt.probs.device)
            for n, x in (("kl", attn_kl(pt, ps, v)), ("ranking", attn_ranking_loss(pt, ps, v)),
                         ("cover_ratio", attn_topk_cover_ratio(pt, ps, v, top_k)),
                         ("attn_distance", attn_distance(ps, v)), ("attn_distance_teacher", attn_distance(pt, v))):
                sums[n][l] += x.sum(0).double().cpu()
    return {n: (x / len(enc)).numpy() for n, x in sums.items()}


def compare_attention_maps(setup: Setup, batch_size: int = 1, top_k: int = 5) -> dict[str, dict[str, np.ndarray]]:
    """attention_map_distance of every student against the teacher: {student label: {metric: (L, H)}}."""
    return {label: attention_map_distance(setup.teacher, s, setup.dev, batch_size, top_k)
            for label, s in setup.students.items()}


# ---------------------------------------------------------------------------------------------
# Hessian spectrum: power iteration on Hessian-vector products, with deflation

def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _normalize(v: list[Tensor]) -> list[Tensor]:
    n = _dot(v, v).sqrt().clamp_min(1e-30)  # a zero Hessian-vector product stays zero instead of NaN
    return [x / n for x in v]


def _project_out(v: list[Tensor], basis: list[list[Tensor]]) -> list[Tensor]:
    for u in basis:  # Gram-Schmidt against the (orthonormal) eigenvectors found so far
        c = _dot(v, u)
        v = [x - c * y for x, y in zip(v, u)]
    return v


def hessian_vector_product(loss: Tensor, params: list[Tensor]) -> Callable[[list[Tensor]], list[Tensor]]:
    """v ↦ H v with H = ∇²loss w.r.t. params, by double backward (the gradient graph is kept for repeated calls).
    Through a student's quantizers the gradient is the STE's, so H is the Hessian of the STE surrogate."""
    with torch.enable_grad():
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(g, i) for i, g in enumerate(grads) if g is not None and g.requires_grad]  # others: Hessian rows 0

    def hvp(v: list[Tensor]) -> list[Tensor]:
        hv = torch.autograd.grad([g for g, _ in pairs], params, grad_outputs=[v[i] for _, i in pairs],
                                 retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, params)]

    return hvp


def hessian_eigenvalues(loss_fn: Callable[[], Tensor], params: list[Tensor], k: int = 3, tol: float = 1e-3,
                        max_iter: int = 100, seed: int = 0) -> list[float]:
    """Top-k eigenvalues (largest |λ| first) of the Hessian of loss_fn() w.r.t. params, by power iteration on
    Hessian-vector products, deflated by projecting out earlier eigenvectors (PyHessian, Yao et al. 2020).
    Each stops when |λ_t − λ_{t−1}| < tol·(|λ_{t−1}| + 1e-6) or after max_iter products."""
    with torch.enable_grad():
        hvp = hessian_vector_product(loss_fn(), params)
    gen = torch.Generator().manual_seed(seed)
    values, vectors = [], []
    for _ in range(k):
        v = _normalize(_project_out([torch.randn(p.shape, generator=gen).to(p) for p in params], vectors))
        lam = None
        for _ in range(max_iter):
            hv = hvp(v)
            new = _dot(hv, v).item()  # Rayleigh quotient vᵀHv of the unit vector v
            v = _normalize(_project_out(hv, vectors))
            done = lam is not None and abs(new - lam) < tol * (abs(lam) + 1e-6)
            lam = new
            if done:
                break
        values.append(lam)
        vectors.append(v)
    return values


def task_loss(model: BertForGlue, b: Batch, regression: bool, weight_decay: float = 0.01) -> Tensor:
    """Hessian objective: CE (regression: MSE) on the batch + weight_decay·Σ_params ‖p‖₂ (docs/algorithms.md §8).
    ‖p‖₂ is computed as sqrt(Σp² + 1e-12) so that it stays twice differentiable at p = 0."""
    logits = model(b.input_ids, b.token_type_ids, b.attention_mask).logits
    loss = F.mse_loss(logits[:, 0], b.labels.to(logits.dtype)) if regression else F.cross_entropy(logits, b.labels)
    return loss + weight_decay * sum((torch.dot(p.view(-1), p.view(-1)) + 1e-12).sqrt() for p in model.parameters())


def hessian_spectrum(model: BertForGlue, enc: utils_glue.Encoded, regression: bool, n_examples: int = 16,
                     k: int = 3, tol: float = 1e-3, max_iter: int = 100, weight_decay: float = 0.01,
                     seed: int = 0) -> np.ndarray:
    """Top-k Hessian eigenvalues of task_loss on one dev example at a time, w.r.t. all parameters (a student's
    latent weights, through its STE quantizers); eval mode. Returns (n_examples, k), largest |λ| first."""
    model.eval()
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    device = _device(model)
    out = []
    try:
        for p in params:
            p.requires_grad_(True)  # a frozen teacher works too
        for i in range(min(n_examples, len(enc))):
            b = collate(enc, [i], pad_to=None).to(device)
            out.append(hessian_eigenvalues(lambda: task_loss(model, b, regression, weight_decay), params, k, tol,
                                           max_iter, seed + i))
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
    return np.array(out, dtype=np.float64).reshape(-1, k)


def hessian_spectra(setup: Setup, n_examples: int = 16, k: int = 3, tol: float = 1e-3, max_iter: int = 100,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """hessian_spectrum of the teacher and every student on the same examples: {label: (n_examples, k)}."""
    return {label: hessian_spectrum(m, setup.dev, setup.task.is_regression, n_examples, k, tol, max_iter, seed=seed)
            for label, m in setup.models().items()}


# ---------------------------------------------------------------------------------------------
# Attention-output dynamic range

def attention_output_range(model: BertForGlue, enc: utils_glue.Encoded, batch_size: int = 1) -> dict[str, list[np.ndarray]]:
    """Per example, min and max over the hidden dimension of attn_output (post-LayerNorm FFN input) for every
    layer and valid token: {"min": [(L, s_b)], "max": [(L, s_b)]}."""
    res = {"min": [], "max": []}
    for b in _batches(enc, batch_size, _device(model)):
        out = _forward(model, b, {"attn_output"})
        x = torch.stack([lo.attn_output for lo in out.layers], 1)   # (B, L, S, D)
        lo, hi = x.amin(-1).cpu(), x.amax(-1).cpu()                  # (B, L, S)
        for i, n in enumerate(b.attention_mask.sum(-1).tolist()):
            res["min"].append(lo[i, :, :n].numpy())
            res["max"].append(hi[i, :, :n].numpy())
    return res


def attention_output_ranges(setup: Setup, batch_size: int = 1) -> dict[str, dict[str, list[np.ndarray]]]:
    return {label: attention_output_range(m, setup.dev, batch_size) for label, m in setup.models().items()}


def range_summary(r: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Per layer over all tokens of all examples: mean and extreme of the per-token min and max -> (L,) each."""
    lo, hi = np.concatenate(r["min"], axis=1), np.concatenate(r["max"], axis=1)  # (L, tokens)
    return {"mean_min": lo.mean(1), "mean_max": hi.mean(1), "min": lo.min(1), "max": hi.max(1)}


# ---------------------------------------------------------------------------------------------
# Norm-based analysis (Kobayashi et al. 2020, "Attention is not only a weight")

def token_classes(tokenizer, vocab_size: int | None = None) -> Tensor:
    """(vocab,) class of every token id, indexing TOKEN_CLASSES: [CLS], [SEP], punctuation (every character is
    punctuation or a symbol), other."""
    n = max(len(tokenizer), vocab_size or 0)
    classes = torch.full((n,), TOKEN_CLASSES.index("other"), dtype=torch.long)
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        piece = (tok or "").removeprefix("##")
        if piece and all(c in string.punctuation or unicodedata.category(c)[0] in "PS" for c in piece):
            classes[i] = TOKEN_CLASSES.index("punctuation")
    classes[tokenizer.cls_token_id] = TOKEN_CLASSES.index("[CLS]")
    classes[tokenizer.sep_token_id] = TOKEN_CLASSES.index("[SEP]")
    return classes


def output_weight(dense: torch.nn.Linear) -> Tensor:
    """W_O as the model uses it: the quantized weight of a student's QuantLinear, else the FP weight. (D, D)."""
    with torch.no_grad():
        return dense.weight_quantizer(dense.weight) if isinstance(dense, QuantLinear) else dense.weight.detach()


def kobayashi_norms(probs: Tensor, value: Tensor, w_o: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """f_h(x_j) = V_h[j]·W_O^h with W_O^h the columns of W_O (D, H·d_h) that read head h (bias excluded).
    probs (B, H, S, S) = α, value (B, H, S, d_h). Returns ‖f_h(x_j)‖ (B, H, S), ‖α_hij f_h(x_j)‖ (B, H, S, S)
    and ‖Σ_h α_hij f_h(x_j)‖ (B, S, S)."""
    H, dh = value.shape[1], value.shape[-1]
    w = w_o.view(w_o.shape[0], H, dh).permute(1, 2, 0)         # (D, H·d_h) -> (H, d_h, D)
    f = torch.einsum("bhjd,hde->bhje", value, w)                # (B, H, S, D)
    f_norm = f.norm(dim=-1)
    af_norm = probs * f_norm[:, :, None, :]                     # α ≥ 0, so ‖αf‖ = α‖f‖
    sum_af_norm = torch.einsum("bhij,bhje->bije", probs, f).norm(dim=-1)
    return f_norm, af_norm, sum_af_norm


def norm_analysis(model: BertForGlue, enc: utils_glue.Encoded, classes: Tensor, batch_size: int = 1) -> dict[str, np.ndarray]:
    """Means over (valid query i, valid key j of class c) pairs of every example, per layer, head and token class:
    "alpha" α_hij, "f_norm" ‖f_h(x_j)‖, "af_norm" ‖α f_h(x_j)‖ -> (L, H, C); "sum_af_norm" ‖Σ_h α f_h(x_j)‖ and
    "alpha_heads" Σ_h α_hij / H -> (L, C). C indexes TOKEN_CLASSES; NaN where a class never occurs."""
    L, H, C = model.shape.num_layers, model.shape.num_heads, len(TOKEN_CLASSES)
    sums = {n: torch.zeros(L, H, C, dtype=torch.float64) for n in ("alpha", "f_norm", "af_norm")}
    sums["sum_af_norm"] = torch.zeros(L, C, dtype=torch.float64)
    count = torch.zeros(C, dtype=torch.float64)
    device = _device(model)
    classes = classes.to(device)
    for b in _batches(enc, batch_size, device):
        out = _forward(model, b, {"probs", "value"})
        v = b.attention_mask.to(torch.float32)                                  # (B, S)
        key_class = F.one_hot(classes[b.input_ids], C).to(torch.float32) * v[..., None]   # (B, S, C), padding: 0
        n_rows = v.sum(-1)                                                      # (B,): valid query rows
        count += torch.einsum("bjc,b->c", key_class, n_rows).double().cpu()
        for l, lo in enumerate(out.layers):
            w_o = output_weight(model.bert.encoder.layer[l].attention.output.dense)
            f_norm, af_norm, sum_af = kobayashi_norms(lo.probs, lo.value, w_o)
            for n, x in (("alpha", lo.probs), ("af_norm", af_norm)):
                sums[n][l] += torch.einsum("bhij,bjc,bi->hc", x, key_class, v).double().cpu()
            sums["f_norm"][l] += torch.einsum("bhj,bjc,b->hc", f_norm, key_class, n_rows).double().cpu()
            sums["sum_af_norm"][l] += torch.einsum("bij,bjc,bi->c", sum_af, key_class, v).double().cpu()
    res = {n: (x / count).numpy() for n, x in sums.items()}  # count 0 -> NaN
    res["alpha_heads"] = res["alpha"].mean(1)
    return res


def norm_analyses(setup: Setup, batch_size: int = 1) -> dict[str, dict[str, np.ndarray]]:
    classes = token_classes(setup.tokenizer, setup.teacher.shape.vocab_size)
    return {label: norm_analysis(m, setup.dev, classes, batch_size) for label, m in setup.models().items()}


# ---------------------------------------------------------------------------------------------
# Heat maps

def attention_maps(model: BertForGlue, enc: utils_glue.Encoded, example: int = 0) -> np.ndarray:
    """Attention probabilities of one example, unpadded: (L, H, s, s)."""
    b = collate(enc, [example], pad_to=None).to(_device(model))
    return torch.stack([lo.probs[0] for lo in _forward(model, b, {"probs"}).layers]).cpu().numpy()


def attention_heatmaps(setup: Setup, example: int = 0) -> dict[str, np.ndarray]:
    """attention_maps of the teacher and every student for one dev example: {label: (L, H, s, s)}."""
    for label, s in setup.students.items():
        check_comparable(setup.teacher, s, label)
    return {label: attention_maps(m, setup.dev, example) for label, m in setup.models().items()}


def example_tokens(setup: Setup, example: int = 0) -> list[str]:
    return setup.tokenizer.convert_ids_to_tokens(setup.dev.input_ids[example])


# ---------------------------------------------------------------------------------------------
# JSON

def to_jsonable(x):
    """numpy/tensors -> nested lists; NaN and ±inf -> None (JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x
