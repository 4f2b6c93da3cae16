"""Your own clustering model as a victim: PCA + Gaussian mixture on scikit-learn's 8x8 digits.

A victim is any object with ``num_clusters``, ``input_shape`` and ``predict_proba`` taking
images in [0, 1] (here numpy N x 1 x 8 x 8) and answering memberships N x K; nothing of
clusterattack is needed to write one. The factories are named in a victim spec::

    python jobs/attack.py --victim py:examples.sklearn_digits:build --dataset digits ...
    python jobs/attack.py --victim examples/sklearn_digits.py:build?components=20 --dataset digits ...
    python jobs/serve.py --victim digits-gmm=py:examples.sklearn_digits:build --key red-team:5000

``build`` returns the wrapper below; ``build_pipeline`` returns the bare scikit-learn
pipeline (it takes flat rows: ``?input=flat``); ``build_labels`` answers cluster ids only
(a decision-only victim). The model is fitted on the training split of the ``digits``
data set (the test split, which attacks are scored on, is never seen).
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from sklearn.pipeline import Pipeline, make_pipeline

INPUT_SHAPE = (1, 8, 8)


def _train_rows() -> np.ndarray:
    from clusterattack.data import load_dataset

    images, _ = load_dataset("digits").subset("train").as_float()
    return images.numpy().reshape(len(images), -1)


def build_pipeline(components: int = 16, clusters: int = 10, seed: int = 0) -> Pipeline:
    """PCA to ``components`` dimensions, then a ``clusters``-component Gaussian mixture, fitted."""
    model = make_pipeline(
        PCA(n_components=components, random_state=seed),
        GaussianMixture(n_components=clusters, covariance_type="full", n_init=2, random_state=seed),
    )
    return model.fit(_train_rows())


class DigitsGMM:
    """The fitted pipeline behind the Victim contract: numpy images in, numpy memberships out."""

    input_shape = INPUT_SHAPE

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.num_clusters = int(pipeline[-1].n_components)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return self.pipeline.predict_proba(images.reshape(len(images), -1))


class DigitsGMMLabels:
    """The same model answering cluster ids only (``predict``): a decision-only victim."""

    input_shape = INPUT_SHAPE

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.num_clusters = int(pipeline[-1].n_components)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.pipeline.predict(images.reshape(len(images), -1))


def build(components: int = 16, clusters: int = 10, seed: int = 0) -> DigitsGMM:
    """The victim: PCA + Gaussian mixture fitted on the digits' training split."""
    return DigitsGMM(build_pipeline(components, clusters, seed))


def build_labels(components: int = 16, clusters: int = 10, seed: int = 0) -> DigitsGMMLabels:
    """The decision-only victim (cluster ids only)."""
    return DigitsGMMLabels(build_pipeline(components, clusters, seed))
