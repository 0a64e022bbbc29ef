"""Figures: attention heat maps, sparsity and null rate per layer and head, AER-by-layer curves.

Every function writes PNG, and PDF too when ``pdf=True``; it returns the paths written.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ..attention_types import ATTENTION_TYPE, ATTENTION_TYPES
from ..errors import require

if TYPE_CHECKING:  # torch only for the type checker: the plots of saved statistics run without it
    import torch


def _pyplot() -> Any:
    matplotlib = require("matplotlib", "rela-analyze plot", install="pip install matplotlib  "
                                                                  "(or: pip install 'rela-fairseq[analysis]')")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str, pdf: bool) -> list[str]:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    base = path[:-4] if path.endswith(".png") else path
    written = [base + ".png"]
    fig.savefig(written[0], dpi=150, bbox_inches="tight")
    if pdf:
        written.append(base + ".pdf")
        fig.savefig(written[1], bbox_inches="tight")
    _pyplot().close(fig)
    return written


def heatmap(weights: torch.Tensor, src_tokens: Sequence[str], tgt_tokens: Sequence[str], path: str, title: str = "",
            pdf: bool = False) -> list[str]:
    """One panel per head: rows are target tokens (decoder steps), columns source tokens. Exact zeros are white;
    a null row (all zero: the head is switched off for that query) is marked with a red ∅ on its label."""
    return heatmap_grid({"": weights}, src_tokens, tgt_tokens, path, title, pdf, max_columns=4)


def heatmap_grid(weights_by_label: dict[str, Any], src_tokens: Sequence[str], tgt_tokens: Sequence[str],
                 path: str, title: str = "", pdf: bool = False, max_columns: Optional[int] = None) -> list[str]:
    """Heat maps of several models for one sentence: a row of head panels per label (``{label: weights [H, T, S]}``,
    same tokens); with one unlabelled model and ``max_columns``, its heads wrap onto several rows."""
    plt = _pyplot()

    panels = []  # (label, head, weights [T, S]) in reading order
    for label, weights in weights_by_label.items():
        weights = weights.float().numpy()
        panels += [(label, h, weights[h]) for h in range(weights.shape[0])]
    per_row = max(w.shape[0] for w in weights_by_label.values())
    cols = min(per_row, max_columns) if max_columns else per_row
    rows = -(-len(panels) // cols) if max_columns else len(weights_by_label)
    width = max(3.0, 0.28 * len(src_tokens) + 1.5)
    height = max(2.5, 0.28 * len(tgt_tokens) + 1.2)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * width, rows * height), squeeze=False)
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("white")
    for ax in axes.flat:
        ax.axis("off")
    for i, (label, head, w) in enumerate(panels):
        r, c = (divmod(i, cols) if max_columns else (list(weights_by_label).index(label), head))
        _heatmap_panel(fig, axes[r][c], cmap, w, src_tokens, tgt_tokens,
                       f"{label + ', ' if label else ''}head {head}")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, pdf)


def _heatmap_panel(fig: Any, ax: Any, cmap: Any, w: Any, src_tokens: Sequence[str], tgt_tokens: Sequence[str],
                   title: str) -> None:
    import numpy as np

    ax.axis("on")
    masked = np.ma.masked_where(w == 0, w)
    image = ax.imshow(masked, cmap=cmap, aspect="auto", interpolation="nearest", vmin=0,
                      vmax=max(float(w.max()), 1e-9))
    null = ~(w != 0).any(axis=1)
    ax.set_xticks(range(len(src_tokens)))
    ax.set_xticklabels(src_tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(len(tgt_tokens)))
    ax.set_yticklabels([("∅ " if null[i] else "") + t for i, t in enumerate(tgt_tokens)], fontsize=7)
    for label, is_null in zip(ax.get_yticklabels(), null):
        if is_null:
            label.set_color("red")
    ax.set_title(title + (f"  ({int(null.sum())} null rows)" if null.any() else ""), fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)


def layer_head_stats(summaries: dict[str, dict], path: str, metric: str = "sparsity", pdf: bool = False) -> list[str]:
    """A layer × head grid of ``metric`` (sparsity | null_rate | near_null_rate) per attention type, one row of panels
    per model.

    ``summaries``: {label: AttentionStats.summary()}."""
    plt = _pyplot()
    import numpy as np

    labels = list(summaries)
    attention_types = [t.name for t in ATTENTION_TYPES if any(t.name in s["types"] for s in summaries.values())]
    fig, axes = plt.subplots(len(labels), len(attention_types), figsize=(4.2 * len(attention_types), 3.0 * len(labels)),
                             squeeze=False)
    for r, label in enumerate(labels):
        for c, attention_type in enumerate(attention_types):
            ax = axes[r][c]
            layers = summaries[label]["types"].get(attention_type, {}).get("layers", [])
            if not layers:
                ax.axis("off")
                continue
            grid = np.array([[h[metric] if h.get(metric) is not None else np.nan for h in layer["heads"]]
                             for layer in layers]) * 100
            image = ax.imshow(grid, cmap="magma", vmin=0, vmax=100, aspect="auto")
            for (i, j), value in np.ndenumerate(grid):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 60 else "black")
            ax.set_xticks(range(grid.shape[1]))
            ax.set_yticks(range(grid.shape[0]))
            ax.set_yticklabels([str(layer["layer"] + 1) for layer in layers])
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"{label}: {ATTENTION_TYPE[attention_type].label}", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label=f"{metric.replace('_', ' ')} (%)")
    fig.tight_layout()
    return _save(fig, path, pdf)


def aer_curves(results: dict[str, dict], path: str, pdf: bool = False) -> list[str]:
    """AER by layer, best head (solid) and head average (dashed), normal and shifted side by side, one colour per
    model. ``results``: {label: align summary (``rows``: [{layer, best_head_normal, avg_normal, ...}])}."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, mode in zip(axes, ("normal", "shifted")):
        for i, (label, summary) in enumerate(results.items()):
            layers = [row["layer"] + 1 for row in summary["rows"]]
            color = f"C{i}"
            ax.plot(layers, [row[f"best_head_{mode}"]["aer"] for row in summary["rows"]], "-o", color=color,
                    label=f"{label}, best head")
            ax.plot(layers, [row[f"avg_{mode}"]["aer"] for row in summary["rows"]], "--s", color=color,
                    label=f"{label}, head average")
        layers = sorted({row["layer"] + 1 for summary in results.values() for row in summary["rows"]})
        ax.set_xticks(layers)
        ax.set_title(f"{mode} attention" + (" (Chen et al. 2020)" if mode == "shifted" else ""))
        ax.set_xlabel("decoder layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("AER (lower is better)")
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path, pdf)


def learning_curve_plot(curves: dict, path: str, title: str = "", pdf: bool = False) -> list[str]:
    """Validation loss and validation BLEU against updates, one colour per model and one line per seed.

    ``curves``: {label: {seed: [{"updates", "valid_loss", "valid_bleu"}]}} (pipeline/curves.py)."""
    plt = _pyplot()
    fig, (loss_ax, bleu_ax) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")
    for i, (label, by_seed) in enumerate(curves.items()):
        for j, (seed, points) in enumerate(sorted(by_seed.items())):
            for ax, key in ((loss_ax, "valid_loss"), (bleu_ax, "valid_bleu")):
                xy = [(p["updates"], p[key]) for p in points if p.get(key) is not None]
                if xy:
                    ax.plot(*zip(*xy), styles[j % len(styles)], color=colours[i % len(colours)], marker=".",
                            label=f"{label}, seed {seed}")
    for ax, name in ((loss_ax, "validation loss (fairseq, label-smoothed, base 2)"), (bleu_ax, "validation BLEU")):
        ax.set_xlabel("updates")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    bleu_ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, pdf)
