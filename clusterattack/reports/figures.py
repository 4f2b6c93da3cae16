"""Figures of the report: arrays in, matplotlib ``Figure`` out, and PNG files written into the report folder.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no global state), so
they work without a display and from any thread. The analysis figures (transfer heat
map, norm curves, PCA) are ``clusterattack.reports.analysis_figures``'s.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from clusterattack.reports import analysis_figures

__all__ = [
    "FIGURE_DIR",
    "confusion_pair_figure",
    "copy_figure",
    "equal_queries_figure",
    "image_grid_figure",
    "norm_curves_figure",
    "pca_figure",
    "save_figure",
    "transfer_figure",
]

log = logging.getLogger(__name__)

FIGURE_DIR = "figures"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def save_figure(fig: Figure, folder: str | Path, name: str, dpi: int = 100) -> str:
    """Write ``fig`` as ``<folder>/figures/<name>.png``; returns the path relative to ``folder``."""
    safe = _SAFE_NAME.sub("_", name).strip("._") or "figure"
    out = Path(folder) / FIGURE_DIR / f"{safe}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return f"{FIGURE_DIR}/{out.name}"


def confusion_pair_figure(
    before: np.ndarray,
    after: np.ndarray,
    titles: tuple[str, str] = ("before attack", "after attack"),
    class_names: Sequence[str] | None = None,
    cluster_ids: Sequence[int] | None = None,
) -> Figure:
    """Two confusion matrices (classes x clusters) on one colour scale, counts written in;
    ``cluster_ids`` labels the columns (default 0..K-1)."""
    before, after = np.asarray(before), np.asarray(after)
    if before.ndim != 2 or before.shape != after.shape:
        raise ValueError(
            f"confusion matrices must be 2-D and alike, got {before.shape} and {after.shape}"
        )
    fig = Figure(figsize=(10.5, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    top = max(int(before.max(initial=0)), int(after.max(initial=0)), 1)
    names = list(class_names) if class_names and len(class_names) == before.shape[0] else None
    for ax, table, title in zip(axes, (before, after), titles, strict=True):
        im = ax.imshow(table, cmap="Blues", vmin=0, vmax=top, aspect="auto")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("cluster")
        ticks = list(cluster_ids) if cluster_ids is not None else list(range(table.shape[1]))
        ax.set_xticks(range(table.shape[1]), labels=[str(int(t)) for t in ticks])
        ax.set_yticks(range(table.shape[0]))
        ax.set_yticklabels(names or range(table.shape[0]), fontsize=7)
        if table.size <= 400:
            for (i, j), count in np.ndenumerate(table):
                if count:
                    color = "white" if count > 0.6 * top else "black"
                    ax.text(
                        j, i, str(int(count)), ha="center", va="center", fontsize=6, color=color
                    )
    axes[0].set_ylabel("true class")
    fig.colorbar(im, ax=list(axes), label="images", shrink=0.9)
    return fig


def _show(ax: Any, image: np.ndarray) -> None:
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
    ax.imshow(np.clip(img, 0, 1), cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def image_grid_figure(
    clean: np.ndarray,
    adv: np.ndarray,
    labels: Sequence[int],
    clusters_pre: Sequence[int],
    clusters_post: Sequence[int],
    class_names: Sequence[str] | None = None,
    cluster_names: Mapping[int, str] | None = None,
) -> Figure:
    """The paper's Fig. 1: clean images (row 1) and their perturbed versions (row 2), with the
    cluster each was put in before and after; row 3 shows the perturbation, scaled to be seen.

    ``clean``/``adv`` are N x C x H x W floats in [0, 1]; ``cluster_names`` maps a cluster id
    to a readable name (e.g. the class it is matched to on clean images).
    """
    clean, adv = np.asarray(clean), np.asarray(adv)
    n = clean.shape[0]
    if clean.ndim != 4 or adv.shape != clean.shape or n == 0:
        raise ValueError(
            f"clean and adv must be alike N x C x H x W with N > 0, got {clean.shape} and {adv.shape}"
        )
    if not len(labels) == len(clusters_pre) == len(clusters_post) == n:
        raise ValueError(
            f"{n} images but {len(labels)} labels, {len(clusters_pre)} clusters before, {len(clusters_post)} after"
        )
    names = cluster_names or {}
    fig = Figure(figsize=(1.35 * n + 0.9, 4.7), layout="constrained")
    axes = np.asarray(fig.subplots(3, n, squeeze=False))
    delta = adv - clean
    scale = float(np.abs(delta).max()) or 1.0
    for j in range(n):
        cls = int(labels[j])
        title = class_names[cls] if class_names and cls < len(class_names) else f"class {cls}"
        c0, c1 = int(clusters_pre[j]), int(clusters_post[j])
        _show(axes[0, j], clean[j])
        axes[0, j].set_title(
            f"{title}\ncluster {c0}" + (f" ({names[c0]})" if c0 in names else ""), fontsize=7
        )
        _show(axes[1, j], adv[j])
        moved = c1 != c0
        axes[1, j].set_title(
            f"cluster {c1}" + (f" ({names[c1]})" if c1 in names else ""),
            fontsize=7,
            color="crimson" if moved else "black",
        )
        _show(axes[2, j], 0.5 + 0.5 * delta[j] / scale)
    axes[0, 0].set_ylabel("clean", fontsize=8)
    axes[1, 0].set_ylabel("perturbed", fontsize=8)
    axes[2, 0].set_ylabel(f"delta x{0.5 / scale:.1f}", fontsize=8)
    return fig


# ---------------------------------------------------------------- analysis figures
# The analysis figures themselves live in analysis_figures (shared with the analysis jobs,
# which log the same figures on their runs); re-exported so the report has one figure API.
transfer_figure = analysis_figures.transfer_heatmap
norm_curves_figure = analysis_figures.norm_curves_figure
pca_figure = analysis_figures.pca_scatter_3d
equal_queries_figure = analysis_figures.equal_queries_figure


def copy_figure(src: str | Path, folder: str | Path, name: str) -> str:
    """Copy a PNG (e.g. a figure an analysis run logged) into ``<folder>/figures``; returns its relative path."""
    src = Path(src)
    if src.suffix.lower() != ".png":
        raise ValueError(f"only PNG figures are embedded, got {src}")
    safe = _SAFE_NAME.sub("_", name).strip("._") or "figure"
    out = Path(folder) / FIGURE_DIR / f"{safe}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out)
    return f"{FIGURE_DIR}/{out.name}"
