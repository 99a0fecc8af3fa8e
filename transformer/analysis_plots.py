"""Figures for `transformer.analysis` results. Object-oriented matplotlib (no pyplot state, no backend choice),
so the same functions serve the CLI (PNG files) and notebooks (the returned Figure is displayed inline).

Every function takes the {model label: result} dict of the matching analysis function, returns the Figure and,
with `out`, saves it as PNG at `dpi` (100 by default: a few hundred KB at most). The teacher is drawn in black.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from transformer.analysis import TEACHER, TOKEN_CLASSES, range_summary

DPI = 100
MAX_TOKEN_LABELS = 24  # label axes with the tokens themselves only for sequences this short

DISTANCE_LABELS = {
    "kl": "KL(T‖S) of attention probs",
    "ranking": "ranking loss (Σ over rows, key pairs)",
    "cover_ratio": "top-5 cover-length ratio",
    "attn_distance": "attention distance (fraction of length)",
}
NORM_LABELS = {
    "alpha_heads": "attention weight α",
    "f_norm": "‖f(x)‖",
    "af_norm": "‖α f(x)‖",
    "sum_af_norm": "‖Σ_h α f(x)‖",
}


def fig_path(folder: str | Path | None, name: str) -> Path | None:
    """folder/name, or None (figure only returned, not saved) when folder is None."""
    return None if folder is None else Path(folder) / name


def _save(fig: Figure, out: str | Path | None, dpi: int) -> Figure:
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
    return fig


def _colors(labels) -> dict[str, str]:
    others = iter(f"C{i}" for i in range(10))
    return {label: "black" if label == TEACHER else next(others) for label in labels}


def _layers(n: int) -> np.ndarray:
    return np.arange(1, n + 1)  # layers and heads are numbered from 1 on every figure


def plot_attention_map_distance(dist: dict[str, dict[str, np.ndarray]], out=None, dpi: int = DPI) -> Figure:
    """One panel per metric, per layer (mean over heads), one line per student; the attention-distance panel
    also shows the teacher. `dist` is `analysis.compare_attention_maps(...)`."""
    colors = _colors([TEACHER, *dist])
    fig = Figure(figsize=(4.2 * len(DISTANCE_LABELS), 3.6), layout="constrained")
    axes = fig.subplots(1, len(DISTANCE_LABELS))
    for ax, (metric, label) in zip(axes, DISTANCE_LABELS.items()):
        for name, d in dist.items():
            ax.plot(_layers(len(d[metric])), d[metric].mean(1), "o-", color=colors[name], label=name)
        if metric == "attn_distance":
            t = next(iter(dist.values()))["attn_distance_teacher"]
            ax.plot(_layers(len(t)), t.mean(1), "s--", color=colors[TEACHER], label=TEACHER)
        ax.set(xlabel="layer", ylabel="mean over heads", title=label)
        ax.set_xticks(_layers(len(next(iter(dist.values()))[metric])))
        ax.legend(fontsize="small")
    return _save(fig, out, dpi)


def plot_attention_map_distance_heads(dist: dict[str, dict[str, np.ndarray]], out=None, dpi: int = DPI) -> Figure:
    """Layer × head maps of each teacher–student distance: one row per student, one column per metric; the colour
    scale of a metric is shared by all students."""
    metrics = ["kl", "ranking", "cover_ratio"]
    fig = Figure(figsize=(4.4 * len(metrics), 3.2 * len(dist)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(dist), len(metrics), squeeze=False))
    for j, metric in enumerate(metrics):
        lo = min(d[metric].min() for d in dist.values())
        hi = max(d[metric].max() for d in dist.values())
        for i, (name, d) in enumerate(dist.items()):
            ax = axes[i, j]
            L, H = d[metric].shape
            im = ax.imshow(d[metric], vmin=lo, vmax=hi, cmap="viridis", aspect="auto", origin="lower",
                           extent=(0.5, H + 0.5, 0.5, L + 0.5))
            ax.set(xlabel="head", ylabel="layer", title=f"{name}\n{DISTANCE_LABELS[metric]}",
                   xticks=_layers(H), yticks=_layers(L))
            ax.title.set_fontsize("small")
            fig.colorbar(im, ax=ax, shrink=0.9)
    return _save(fig, out, dpi)


def plot_hessian_spectrum(spectra: dict[str, np.ndarray], out=None, dpi: int = DPI, bins: int = 20) -> Figure:
    """Models side by side: histograms of the top Hessian eigenvalue λ_max (largest |λ|) of each example, positive
    and negative λ_max apart, over log10|λ_max|. `spectra` is `analysis.hessian_spectra(...)`: (n, k) each."""
    top = {name: e[:, 0] for name, e in spectra.items()}
    logs = np.log10(np.abs(np.concatenate(list(top.values()))).clip(1e-12))
    edges = np.linspace(logs.min() - 0.05, logs.max() + 0.05, bins + 1)
    fig = Figure(figsize=(4.2 * len(top), 3.6), layout="constrained")
    axes = fig.subplots(1, len(top), sharex=True, sharey=True, squeeze=False)[0]
    for ax, (name, lam) in zip(axes, top.items()):
        n = len(lam)
        for sign, color, label in ((1, "C0", "positive λ_max"), (-1, "C3", "negative λ_max")):
            sel = lam[np.sign(lam) == sign]
            ax.hist(np.log10(np.abs(sel).clip(1e-12)), bins=edges, weights=np.full(len(sel), 1 / n), color=color,
                    alpha=0.6, label=f"{label} ({len(sel)}/{n})")
        ax.set(xlabel="log10 |λ_max| (one dev example each)", ylabel="fraction of examples", title=name)
        ax.legend(fontsize="small")
    return _save(fig, out, dpi)


def _grid(fig: Figure, n: int, ncols: int = 3):
    ncols = min(ncols, n)
    axes = fig.subplots(-(-n // ncols), ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def plot_attention_output_range(ranges: dict[str, dict[str, list[np.ndarray]]], example: int = 0,
                                tokens: list[str] | None = None, out=None, dpi: int = DPI) -> Figure:
    """One panel per layer: per-token max (solid) and min (dashed) over the hidden dimension of attn_output for one
    example, one colour per model. `ranges` is `analysis.attention_output_ranges(...)`."""
    colors = _colors(ranges)
    L, s = next(iter(ranges.values()))["max"][example].shape
    fig = Figure(figsize=(12, 3.2 * -(-L // 3)), layout="constrained")
    for l, ax in enumerate(_grid(fig, L)):
        for name, r in ranges.items():
            for stat, style in (("max", "-"), ("min", "--")):
                ax.plot(np.arange(s), r[stat][example][l], style, color=colors[name], label=f"{name} {stat}")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel="token", ylabel="attn_output value", title=f"layer {l + 1}")
        if tokens is not None and s <= MAX_TOKEN_LABELS:
            ax.set_xticks(np.arange(s), tokens, rotation=90, fontsize="x-small")
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    fig.suptitle(f"attention-output dynamic range per token (dev example {example})")
    return _save(fig, out, dpi)


def plot_attention_output_range_summary(ranges: dict[str, dict[str, list[np.ndarray]]], out=None,
                                        dpi: int = DPI) -> Figure:
    """Per layer over all tokens of all examples: left, the mean of the per-token max (▲, solid) and min (▼, dashed);
    right, the largest max and the smallest min. One colour per model."""
    colors = _colors(ranges)
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for name, r in ranges.items():
        s = range_summary(r)
        x = _layers(len(s["max"]))
        for ax, (hi, lo) in zip(axes, (("mean_max", "mean_min"), ("max", "min"))):
            ax.plot(x, s[hi], "^-", color=colors[name], label=f"{name} max")
            ax.plot(x, s[lo], "v--", color=colors[name], label=f"{name} min")
    axes[0].set(title="mean over tokens of the per-token max / min", ylabel="attn_output value (over hidden dim)")
    axes[1].set(title="extremes over all tokens", ylabel="attn_output value (over hidden dim)")
    for ax in axes:
        ax.set(xlabel="layer", xticks=x)
        ax.axhline(0, color="grey", lw=0.5)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    fig.suptitle(f"attention-output dynamic range ({len(next(iter(ranges.values()))['max'])} dev examples)")
    return _save(fig, out, dpi)


def plot_norm_analysis(norms: dict[str, dict[str, np.ndarray]], out=None, dpi: int = DPI) -> Figure:
    """Kobayashi et al.: rows α, ‖f(x)‖, ‖αf(x)‖ (means over heads) and ‖Σ_h αf(x)‖; one column per model;
    x = layer, one line per class of the attended token. `norms` is `analysis.norm_analyses(...)`."""
    fig = Figure(figsize=(3.3 * len(norms), 2.3 * len(NORM_LABELS)), layout="constrained")
    axes = fig.subplots(len(NORM_LABELS), len(norms), sharex=True, sharey="row", squeeze=False)
    for j, (name, r) in enumerate(norms.items()):
        for i, (key, label) in enumerate(NORM_LABELS.items()):
            ax = axes[i, j]
            y = r[key] if r[key].ndim == 2 else r[key].mean(1)  # (L, H, C) -> mean over heads; NaN: class absent
            for c, cls in enumerate(TOKEN_CLASSES):
                ax.plot(_layers(len(y)), y[:, c], "o-", color=f"C{c}", label=cls)
            ax.set(xlabel="layer", ylabel=label)
            ax.set_xticks(_layers(len(y)))
            if i == 0:
                ax.set_title(name)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), title="attended token", loc="outside right upper",
               fontsize="small")
    return _save(fig, out, dpi)


def plot_attention_heatmaps(maps: dict[str, np.ndarray], layer: int, tokens: list[str] | None = None,
                            heads: list[int] | None = None, out=None, dpi: int = DPI) -> Figure:
    """Attention probabilities of one example in `layer` (1-based, as on every figure): a row per model, then a
    row per student − teacher difference; a column per head (1-based too). `maps` is `analysis.attention_heatmaps(...)`."""
    H = next(iter(maps.values())).shape[1]
    heads = list(range(H)) if heads is None else [h - 1 for h in heads]
    layer -= 1
    teacher = maps[TEACHER][layer]
    rows = [(name, m[layer], "probs") for name, m in maps.items()]
    rows += [(f"{name} − teacher", m[layer] - teacher, "diff") for name, m in maps.items() if name != TEACHER]
    vmax = max(m[layer][heads].max() for m in maps.values())
    dmax = max([np.abs(m[heads]).max() for _, m, kind in rows if kind == "diff"] + [1e-12])
    fig = Figure(figsize=(1.7 * len(heads) + 1, 1.8 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(heads), squeeze=False)
    s = teacher.shape[-1]
    for i, (name, m, kind) in enumerate(rows):
        for j, h in enumerate(heads):
            ax = axes[i, j]
            if kind == "probs":
                im = ax.imshow(m[h], cmap="viridis", vmin=0, vmax=vmax)
            else:
                im = ax.imshow(m[h], cmap="RdBu_r", vmin=-dmax, vmax=dmax)
            ax.set_title(f"{name}\nhead {h + 1}" if j == 0 else f"head {h + 1}", fontsize="small")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == len(rows) - 1:
                ax.set_xlabel("key token", fontsize="small")
                if tokens is not None and s <= MAX_TOKEN_LABELS:
                    ax.set_xticks(np.arange(s), tokens, rotation=90, fontsize=5)
            if j == 0:
                ax.set_ylabel("query token", fontsize="small")
                if tokens is not None and s <= MAX_TOKEN_LABELS:
                    ax.set_yticks(np.arange(s), tokens, fontsize=5)
        fig.colorbar(im, ax=axes[i, :].tolist(), shrink=0.8,
                     label="probability" if kind == "probs" else "difference")
    fig.suptitle(f"attention maps, layer {layer + 1}")
    return _save(fig, out, dpi)
