"""Seeded stratified train/test splits for data sets that ship without one."""

from __future__ import annotations

import numpy as np

__all__ = ["stratified_split"]


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> np.ndarray:
    """A ``split`` array ("train"/"test") holding out ``test_fraction`` of every class.

    Each class contributes ``round(test_fraction * n_class)`` test rows, chosen by a seeded
    permutation, so the same labels and seed always give the same split. A class keeps at
    least one training row (a one-image class is all train), because a clustering model
    trained without any image of a class would make its test rows meaningless.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    split = np.full(labels.shape[0], "train", dtype=object)
    # Classes in sorted order so the draw sequence does not depend on row order of classes.
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        n_test = min(int(round(test_fraction * rows.size)), rows.size - 1)
        if n_test > 0:
            split[rng.permutation(rows)[:n_test]] = "test"
    return split.astype(str)
