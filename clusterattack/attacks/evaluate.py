"""Evaluation of an attack on a test split: metrics before/after, norms, breakdown, figures (pure)."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from clusterattack.metrics import aligned_confusion, clustering_scores, relative_drop

__all__ = ["confusion_figure", "cluster_size_figure", "evaluate_attack"]


def _as_array(name: str, value: Any, ndim: int) -> np.ndarray:
    arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    return arr


def _drop(before: float, after: float) -> float:
    return relative_drop(before, after) if before > 0 else float("nan")


def evaluate_attack(
    labels: Any,
    clean_proba: Any,
    adv_proba: Any,
    clean_images: Any,
    adv_images: Any,
    *,
    class_names: tuple[str, ...] | None = None,
    figures: bool = True,
) -> tuple[dict[str, Any], dict[str, Figure]]:
    """Score an attack on one split: arrays in, a metrics dict and matplotlib figures out.

    ``labels`` are the true classes (N), ``clean_proba``/``adv_proba`` the victim's
    memberships (N x K) of the clean and perturbed images, ``clean_images``/``adv_images``
    the images themselves (N x C x H x W in [0, 1]; only their difference is used).

    Keys: ``nmi_pre``/``ari_pre``/``acc_pre``, ``nmi_post``/..., relative drops
    ``nmi_drop``/``ari_drop``/``acc_drop`` (0.6 = 60%, NaN when the clean score is 0),
    ``changed_fraction`` (images whose cluster changed), perturbation norms ``l2_mean``,
    ``l2_max``, ``linf_mean``, ``linf_max`` of x_adv - x, cluster sizes before/after
    (``cluster_sizes_pre``/``_post``, lists of K counts), ``largest_cluster_fraction_*``,
    ``clusters_used_*`` (non-empty clusters) and ``n_images``. Figures (when asked):
    ``confusion_pre``, ``confusion_post`` (Hungarian-aligned, classes x clusters) and
    ``cluster_sizes`` (the paper's "clustering breakdown").
    """
    y = _as_array("labels", labels, 1).astype(np.int64)
    p0 = _as_array("clean_proba", clean_proba, 2)
    p1 = _as_array("adv_proba", adv_proba, 2)
    x0 = _as_array("clean_images", clean_images, 4).astype(np.float64)
    x1 = _as_array("adv_images", adv_images, 4).astype(np.float64)
    n = y.shape[0]
    if p0.shape != p1.shape or p0.shape[0] != n or x0.shape != x1.shape or x0.shape[0] != n:
        raise ValueError(
            f"inputs disagree in size: labels {y.shape}, clean_proba {p0.shape}, adv_proba "
            f"{p1.shape}, clean_images {x0.shape}, adv_images {x1.shape}"
        )
    if n == 0:
        raise ValueError("cannot evaluate an attack on 0 images")
    k = p0.shape[1]
    c0, c1 = p0.argmax(axis=1), p1.argmax(axis=1)
    pre, post = clustering_scores(y, c0), clustering_scores(y, c1)
    delta = (x1 - x0).reshape(n, -1)
    l2 = np.linalg.norm(delta, axis=1)
    linf = np.abs(delta).max(axis=1)
    sizes0 = np.bincount(c0, minlength=k)
    sizes1 = np.bincount(c1, minlength=k)
    out: dict[str, Any] = {"n_images": int(n), "num_clusters": int(k)}
    for key in ("nmi", "ari", "acc"):
        out[f"{key}_pre"] = pre[key]
        out[f"{key}_post"] = post[key]
        out[f"{key}_drop"] = _drop(pre[key], post[key])
    out.update(
        changed_fraction=float(np.mean(c0 != c1)),
        l2_mean=float(l2.mean()),
        l2_max=float(l2.max()),
        linf_mean=float(linf.mean()),
        linf_max=float(linf.max()),
        cluster_sizes_pre=sizes0.tolist(),
        cluster_sizes_post=sizes1.tolist(),
        largest_cluster_fraction_pre=float(sizes0.max() / n),
        largest_cluster_fraction_post=float(sizes1.max() / n),
        clusters_used_pre=int((sizes0 > 0).sum()),
        clusters_used_post=int((sizes1 > 0).sum()),
    )
    figs: dict[str, Figure] = {}
    if figures:
        num_classes = max(int(y.max()) + 1, len(class_names or ()))
        before = aligned_confusion(y, c0, num_classes=num_classes, num_clusters=k)
        after = aligned_confusion(y, c1, num_classes=num_classes, num_clusters=k)
        figs["confusion_pre"] = confusion_figure(before, f"before attack (NMI {pre['nmi']:.3f})", class_names)
        figs["confusion_post"] = confusion_figure(after, f"after attack (NMI {post['nmi']:.3f})", class_names)
        figs["cluster_sizes"] = cluster_size_figure(sizes0, sizes1)
    return out, figs


def confusion_figure(table: np.ndarray, title: str, class_names: tuple[str, ...] | None = None) -> Figure:
    """Heat map of a classes x clusters count table (columns in Hungarian order)."""
    fig = Figure(figsize=(5.2, 4.4), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(table, cmap="Blues", aspect="auto")
    fig.colorbar(im, ax=ax, label="images")
    ax.set_title(title)
    ax.set_xlabel("cluster (matched order)")
    ax.set_ylabel("class")
    ax.set_yticks(range(table.shape[0]))
    if class_names and len(class_names) == table.shape[0]:
        ax.set_yticklabels(class_names, fontsize=7)
    ax.set_xticks(range(table.shape[1]))
    return fig


def cluster_size_figure(sizes_pre: np.ndarray, sizes_post: np.ndarray) -> Figure:
    """Cluster sizes before and after the attack, largest first: the clustering breakdown."""
    fig = Figure(figsize=(5.2, 3.2), layout="constrained")
    ax = fig.add_subplot()
    k = len(sizes_pre)
    width = 0.4
    xs = np.arange(k)
    ax.bar(xs - width / 2, np.sort(sizes_pre)[::-1], width, label="before")
    ax.bar(xs + width / 2, np.sort(sizes_post)[::-1], width, label="after")
    ax.set_xlabel("cluster rank by size")
    ax.set_ylabel("images")
    ax.set_title("cluster sizes (clustering breakdown)")
    ax.legend()
    return fig
