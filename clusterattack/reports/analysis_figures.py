"""Figures of the analyses (pure: arrays in, matplotlib Figure out): transfer heatmaps, norm curves, PCA, detection."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "detection_histogram",
    "equal_queries_figure",
    "norm_curves_figure",
    "pca_scatter_3d",
    "transfer_heatmap",
]

METRIC_NAMES = {"nmi": "NMI", "ari": "ARI", "acc": "ACC"}


def transfer_heatmap(
    post: Any,
    sources: Sequence[str],
    targets: Sequence[str],
    pre: Sequence[float],
    metric: str = "nmi",
    title: str | None = None,
) -> Figure:
    """The paper's Fig. 4: post-attack scores per (source generator, target victim) with pre-attack beside.

    ``post`` is sources x targets; ``pre`` holds the targets' clean scores, drawn as an
    extra row under the matrix so each column reads "before" below "after".
    """
    post = np.asarray(post, dtype=float)
    pre = np.asarray(pre, dtype=float)
    if post.shape != (len(sources), len(targets)) or pre.shape != (len(targets),):
        raise ValueError(
            f"post must be {len(sources)} x {len(targets)} and pre of length {len(targets)}, "
            f"got {post.shape} and {pre.shape}"
        )
    name = METRIC_NAMES.get(metric, metric)
    fig = Figure(figsize=(1.1 * len(targets) + 2.6, 0.75 * (len(sources) + 1) + 1.8), layout="constrained")
    ax_post, ax_pre = fig.subplots(
        2, 1, gridspec_kw={"height_ratios": [max(len(sources), 1), 1]}, sharex=True
    )
    for ax, values, ylabels in ((ax_post, post, list(sources)), (ax_pre, pre[None, :], ["pre-attack"])):
        im = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_yticks(range(len(ylabels)), ylabels)
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.5 else "black", fontsize=8)
    ax_post.set_ylabel("source generator")
    ax_pre.set_xticks(range(len(targets)), list(targets), rotation=30)
    ax_pre.set_xlabel("target victim")
    ax_post.set_title(title or f"post-attack {name} (transfer)")
    fig.colorbar(im, ax=[ax_post, ax_pre], label=name)
    return fig


def norm_curves_figure(rows: Sequence[Mapping[str, Any]], norm: str = "linf", title: str | None = None) -> Figure:
    """The paper's Fig. 3: NMI/ARI/ACC after the attack against eps, one line per victim.

    ``rows`` are dicts with ``victim``, ``eps``, ``<metric>_pre`` and ``<metric>_post``; the
    clean score is drawn at eps 0. Rows of several gradient sources (``gradient_source``:
    a black-box curve with its white-box reference) get one line per victim and source, the
    white-box one dashed.
    """
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    sources = sorted({str(r.get("gradient_source", "")) for r in rows})
    lines = sorted({(str(r["victim"]), str(r.get("gradient_source", ""))) for r in rows})
    colours = {v: f"C{i % 10}" for i, v in enumerate(sorted({v for v, _ in lines}))}
    for ax, metric in zip(axes, ("nmi", "ari", "acc"), strict=True):
        for victim, source in lines:
            mine = sorted(
                (r for r in rows if str(r["victim"]) == victim and str(r.get("gradient_source", "")) == source),
                key=lambda r: float(r["eps"]),
            )
            eps = [0.0] + [float(r["eps"]) for r in mine]
            pre = float(np.mean([float(r[f"{metric}_pre"]) for r in mine]))
            values = [pre] + [float(r[f"{metric}_post"]) for r in mine]
            label = victim if len(sources) == 1 else f"{victim} ({source})"
            style = "--" if source == "whitebox" and len(sources) > 1 else "-"
            ax.plot(eps, values, marker="o", linestyle=style, color=colours[victim], label=label)
        ax.set_xlabel(f"eps ({norm})")
        ax.set_title(METRIC_NAMES[metric])
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score after attack")
    axes[-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def pca_scatter_3d(
    clean: Any,
    adv: Any,
    explained_variance: Sequence[float] | None = None,
    title: str | None = None,
) -> Figure:
    """The paper's Fig. 5b: clean and adversarial images on their first three principal components."""
    clean = np.asarray(clean, dtype=float)
    adv = np.asarray(adv, dtype=float)
    if clean.ndim != 2 or clean.shape[1] != 3 or adv.ndim != 2 or adv.shape[1] != 3:
        raise ValueError(f"clean and adv must be N x 3 points, got {clean.shape} and {adv.shape}")
    fig = Figure(figsize=(6, 5.2), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    ax.scatter(*clean.T, s=4, alpha=0.4, label="clean", color="tab:blue")
    ax.scatter(*adv.T, s=4, alpha=0.4, label="adversarial", color="tab:red")
    ev = list(explained_variance or [])
    for i, setter in enumerate((ax.set_xlabel, ax.set_ylabel, ax.set_zlabel)):
        setter(f"PC{i + 1}" + (f" ({100 * ev[i]:.1f}%)" if i < len(ev) else ""))
    ax.legend()
    ax.set_title(title or "first three principal components")
    return fig


def detection_histogram(scores_clean: Any, scores_adv: Any, threshold: float, title: str | None = None) -> Figure:
    """Anomaly scores (Mahalanobis distance) of clean and adversarial images, with the threshold."""
    c = np.asarray(scores_clean, dtype=float)
    a = np.asarray(scores_adv, dtype=float)
    fig = Figure(figsize=(5.6, 3.4), layout="constrained")
    ax = fig.add_subplot()
    hi = np.quantile(np.concatenate([c, a]), 0.995)
    lo = min(c.min(), a.min())
    bins = np.linspace(lo, hi, 60)
    ax.hist(c, bins=bins, alpha=0.6, density=True, label="clean")
    ax.hist(a, bins=bins, alpha=0.6, density=True, label="adversarial")
    ax.axvline(threshold, color="black", linestyle="--", label="threshold")
    ax.set_xlabel("score (distance to nearest cluster mean)")
    ax.set_ylabel("density")
    ax.legend()
    ax.set_title(title or "SSD anomaly scores")
    return fig


def equal_queries_figure(
    rows: Sequence[Mapping[str, Any]], generator_queries: float, split_images: int, title: str | None = None
) -> Figure:
    """Appendix E at equal total queries: relative NMI drop against the image-queries spent over the
    whole test split (log scale): the generator once, each per-image attack per image.

    ``rows`` have ``method`` ("generator" or a baseline), ``total_image_queries`` and
    ``nmi_drop``; a dotted line marks the generator's total, where the comparison is fair.
    """
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    for i, method in enumerate(m for m in methods if m != "generator"):
        pts = sorted((float(r["total_image_queries"]), float(r["nmi_drop"])) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i + 1}", label=method)
    for r in rows:
        if r["method"] == "generator":
            ax.plot([float(r["total_image_queries"])], [float(r["nmi_drop"])], marker="*", markersize=14,
                    color="C0", linestyle="none", label="generator (one-off)")  # fmt: skip
    ax.axvline(float(generator_queries), color="0.4", linestyle=":", label="equal total")
    ax.set_xscale("log")
    ax.set_xlabel(f"image-queries over the {split_images:,}-image test split")
    ax.set_ylabel("relative NMI drop")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "generator vs per-image attacks at equal total queries")
    return fig
