"""Clustering quality metrics: NMI, ARI, ACC (Hungarian matching), aligned confusion, relative drop.

Pure functions: integer label arrays in, numbers or arrays out. Cluster ids are arbitrary
integers; the number of clusters may differ from the number of classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

__all__ = [
    "CLUSTERING_METRICS",
    "Matching",
    "aligned_confusion",
    "cluster_accuracy",
    "clustering_scores",
    "contingency",
    "hungarian_matching",
    "relative_drop",
]


#: The keys of :func:`clustering_scores`, in the order tables show them.
CLUSTERING_METRICS = ("nmi", "ari", "acc")


def _as_labels(name: str, values) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_pair(labels_true, labels_pred) -> tuple[np.ndarray, np.ndarray]:
    y = _as_labels("labels_true", labels_true)
    c = _as_labels("labels_pred", labels_pred)
    if y.shape != c.shape:
        raise ValueError(
            f"labels_true and labels_pred must have the same length, got {y.size} and {c.size}"
        )
    if y.size == 0:
        raise ValueError("cannot score an empty clustering (0 labels)")
    return y, c


def contingency(labels_true, labels_pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts table: rows are the distinct classes, columns the distinct clusters.

    Returns (table, classes, clusters) where classes/clusters are the sorted distinct ids.
    """
    y, c = _check_pair(labels_true, labels_pred)
    classes, yi = np.unique(y, return_inverse=True)
    clusters, ci = np.unique(c, return_inverse=True)
    table = np.zeros((classes.size, clusters.size), dtype=np.int64)
    np.add.at(table, (yi, ci), 1)
    return table, classes, clusters


@dataclass(frozen=True)
class Matching:
    """A one-to-one matching of clusters to classes maximising agreement (Hungarian)."""

    cluster_to_class: dict[int, int]
    matched: int  # number of images whose matched class equals the true class
    total: int


def hungarian_matching(labels_true, labels_pred) -> Matching:
    """Best one-to-one cluster -> class assignment. Unmatched clusters map to nothing.

    Works when the number of clusters differs from the number of classes: the cost
    matrix is rectangular and extra clusters (or classes) stay unmatched.
    """
    table, classes, clusters = contingency(labels_true, labels_pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    mapping = {int(clusters[j]): int(classes[i]) for i, j in zip(rows, cols, strict=True)}
    return Matching(mapping, int(table[rows, cols].sum()), int(table.sum()))


def cluster_accuracy(labels_true, labels_pred) -> float:
    """ACC: fraction of images correct under the best one-to-one cluster-class matching."""
    m = hungarian_matching(labels_true, labels_pred)
    return m.matched / m.total


def clustering_scores(labels_true, labels_pred) -> dict[str, float]:
    """NMI (arithmetic normalisation, as scikit-learn), ARI and ACC in one dict.

    Keys: ``nmi``, ``ari``, ``acc``.
    """
    y, c = _check_pair(labels_true, labels_pred)
    return {
        "nmi": float(normalized_mutual_info_score(y, c)),
        "ari": float(adjusted_rand_score(y, c)),
        "acc": float(cluster_accuracy(y, c)),
    }


def aligned_confusion(
    labels_true, labels_pred, num_classes: int | None = None, num_clusters: int | None = None
) -> np.ndarray:
    """Confusion matrix (classes x clusters) with columns reordered by the Hungarian matching.

    Column j holds the cluster matched to class j (for j < number of matched clusters);
    unmatched clusters follow in increasing id order. Classes are ``0..num_classes-1`` and
    clusters ``0..num_clusters-1`` when given (so empty clusters show up as zero columns),
    otherwise the ids present.
    """
    y, c = _check_pair(labels_true, labels_pred)
    classes = np.arange(num_classes) if num_classes is not None else np.unique(y)
    clusters = np.arange(num_clusters) if num_clusters is not None else np.unique(c)
    if np.setdiff1d(y, classes).size:
        raise ValueError(f"labels_true has ids outside 0..{num_classes - 1}")
    if np.setdiff1d(c, clusters).size:
        raise ValueError(f"labels_pred has ids outside 0..{num_clusters - 1}")
    class_pos = {int(v): i for i, v in enumerate(classes)}
    cluster_pos = {int(v): j for j, v in enumerate(clusters)}
    table = np.zeros((classes.size, clusters.size), dtype=np.int64)
    np.add.at(
        table,
        (np.array([class_pos[int(v)] for v in y]), np.array([cluster_pos[int(v)] for v in c])),
        1,
    )
    rows, cols = linear_sum_assignment(table, maximize=True)
    order = [int(cols[np.argsort(rows)][k]) for k in range(len(rows))]
    order += [j for j in range(clusters.size) if j not in set(order)]
    return table[:, order]


def relative_drop(before: float, after: float) -> float:
    """(before - after) / before: 0.6 means a 60% drop. Negative if the score rose.

    Raises when ``before`` is not positive, since a drop from nothing is undefined.
    """
    if not np.isfinite(before) or not np.isfinite(after):
        raise ValueError(f"scores must be finite, got before={before}, after={after}")
    if before <= 0:
        raise ValueError(f"relative drop needs a positive score before, got {before}")
    return float((before - after) / before)
