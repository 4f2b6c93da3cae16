"""PCA of clean against adversarial images (the paper's Fig. 5b) and a number for how much they overlap.

The first three principal components are fitted on clean and adversarial images together
(flattened pixels). Overlap is measured by how well a k-nearest-neighbour classifier
(k = 15, 5-fold stratified cross-validation, equal numbers of clean and adversarial
points) tells them apart in that 3-D space: its accuracy is 0.5 when the two clouds are
indistinguishable there and 1.0 when they are disjoint. (Chosen over a Bhattacharyya
coefficient because it assumes no Gaussian shape and reads directly as "could a detector
looking only at these three components catch the attack".)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["OVERLAP_METHOD", "PCAOverlap", "pca_overlap"]

OVERLAP_METHOD = "knn15_cv5_accuracy"


@dataclass(frozen=True)
class PCAOverlap:
    """Clean and adversarial points on the first components, their explained variance and the overlap."""

    clean_points: np.ndarray
    adv_points: np.ndarray
    explained_variance: tuple[float, ...]
    overlap: float
    overlap_method: str = OVERLAP_METHOD


def _flat(name: str, x) -> np.ndarray:
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if arr.ndim < 2 or arr.shape[0] < 2:
        raise ValueError(f"{name} must be N x ... with N >= 2, got shape {arr.shape}")
    return arr.reshape(arr.shape[0], -1).astype(np.float64)


def pca_overlap(clean, adv, n_components: int = 3, neighbours: int = 15, folds: int = 5, seed: int = 0) -> PCAOverlap:
    """Project clean and adversarial images (same shape) on the first ``n_components`` PCs of both.

    ``overlap`` is the cross-validated k-NN accuracy of clean vs adversarial in PC space
    (0.5: indistinguishable, 1.0: separable). The larger set is subsampled to the size of
    the smaller so that 0.5 is chance.
    """
    from sklearn.decomposition import PCA
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    a, b = _flat("clean", clean), _flat("adv", adv)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"clean and adv images differ in size: {a.shape[1]} vs {b.shape[1]} values each")
    if not 1 <= n_components <= a.shape[1]:
        raise ValueError(f"n_components must lie in 1..{a.shape[1]}, got {n_components}")
    rng = np.random.default_rng(seed)
    n = min(a.shape[0], b.shape[0])
    a = a[rng.choice(a.shape[0], n, replace=False)] if a.shape[0] > n else a
    b = b[rng.choice(b.shape[0], n, replace=False)] if b.shape[0] > n else b
    pca = PCA(n_components=n_components, random_state=seed).fit(np.concatenate([a, b]))
    pa, pb = pca.transform(a), pca.transform(b)
    points = np.concatenate([pa, pb])
    labels = np.concatenate([np.zeros(n, dtype=int), np.ones(n, dtype=int)])
    k = min(neighbours, max(1, n - 1))
    splits = min(folds, n)
    cv = StratifiedKFold(n_splits=splits, shuffle=True, random_state=seed)
    acc = cross_val_score(KNeighborsClassifier(k), points, labels, cv=cv).mean()
    return PCAOverlap(pa, pb, tuple(float(v) for v in pca.explained_variance_ratio_), float(acc))
