"""PCA overlap: about 0.5 for one distribution, about 1 for clearly shifted ones."""

from __future__ import annotations

import numpy as np
import pytest

from clusterattack.defenses import pca_overlap


def test_identical_distributions_overlap(rng):
    a = rng.uniform(0, 1, size=(600, 1, 8, 8))
    b = rng.uniform(0, 1, size=(600, 1, 8, 8))
    out = pca_overlap(a, b, seed=0)
    assert out.overlap == pytest.approx(0.5, abs=0.07)
    assert out.clean_points.shape == (600, 3) and out.adv_points.shape == (600, 3)
    assert len(out.explained_variance) == 3 and all(0 < v < 1 for v in out.explained_variance)


def test_shifted_distributions_separate(rng):
    a = rng.uniform(0, 0.5, size=(400, 1, 8, 8))
    b = a + 0.4
    assert pca_overlap(a, b, seed=0).overlap > 0.95


def test_unequal_sizes_are_balanced_and_bad_input_rejected(rng):
    out = pca_overlap(rng.uniform(size=(300, 64)), rng.uniform(size=(100, 64)))
    assert out.clean_points.shape == (100, 3)
    with pytest.raises(ValueError, match="differ in size"):
        pca_overlap(np.zeros((10, 64)), np.zeros((10, 63)))
    with pytest.raises(ValueError, match="n_components"):
        pca_overlap(np.zeros((10, 2)), np.zeros((10, 2)), n_components=3)
