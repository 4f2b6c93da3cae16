"""How the album service turns an album into groups: a hidden model's cluster ids, or features + clustering.

Two steps, so that the model runs once per image, when the image is added (and charged):
``embed`` maps images to one hidden record per image (a cluster id, or an L2-normalised
feature vector), and ``group`` maps the records of a whole album to group ids. Group ids
are album-local, numbered 0, 1, ... in order of first appearance, so they reveal the
partition and nothing of the model's own cluster numbering; no score ever leaves here.

Methods (``GroupingSpec.method``):

- ``labels``: the argmax of a victim's memberships (any registered victim): the group
  count is however many clusters the album's images fall into.
- ``kmeans`` / ``agglomerative`` (Ward): a feature extractor (``model.features``, e.g.
  a victim's backbone) followed by that clustering of the album. The group count is
  ``num_groups`` when set; otherwise the service decides it, as Face++ did, by the best
  silhouette over 2 .. ``max_groups`` groups. Silhouette favours coarse splits where
  classes overlap: on Fashion-MNIST with the demo SCAN backbone it chose 2 groups
  (clothing vs. footwear and bags) for every album of 100 images, so set ``num_groups``
  there.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["GROUPING_METHODS", "GroupingSpec", "first_appearance_ids"]

GROUPING_METHODS = ("labels", "kmeans", "agglomerative")


def first_appearance_ids(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0, 1, ... in the order each first appears (int64)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.reshape(-1)]


@dataclass(frozen=True)
class GroupingSpec:
    """Which grouping the service runs (validated on construction; see the module docstring).

    ``seed`` makes k-means deterministic, so grouping an unchanged album twice gives the
    same groups: a repeated group call reveals nothing new, which is why it is free.
    """

    method: str = "labels"
    num_groups: int | None = None
    max_groups: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in GROUPING_METHODS:
            raise ValueError(f"grouping method must be one of {GROUPING_METHODS}, got {self.method!r}")
        if self.method == "labels" and self.num_groups is not None:
            raise ValueError(
                "grouping method 'labels' takes its groups from the model's clusters; "
                f"num_groups must be None, got {self.num_groups!r}"
            )
        if self.num_groups is not None and (
            isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int) or self.num_groups < 1
        ):
            raise ValueError(f"num_groups must be an integer >= 1 or None (auto), got {self.num_groups!r}")
        if isinstance(self.max_groups, bool) or not isinstance(self.max_groups, int) or self.max_groups < 2:
            raise ValueError(f"max_groups must be an integer >= 2, got {self.max_groups!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def model_method(self) -> str:
        """The model method ``embed`` calls: ``predict_proba`` or ``features``."""
        return "predict_proba" if self.method == "labels" else "features"

    def check_model(self, model: Any) -> None:
        """Raise TypeError naming what ``model`` lacks for this grouping."""
        for attribute in ("input_shape", self.model_method):
            if not hasattr(model, attribute):
                raise TypeError(
                    f"grouping {self.method!r} needs a model with {attribute!r}; "
                    f"{type(model).__name__} has none"
                )

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "num_groups": self.num_groups,
            "max_groups": self.max_groups,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ per image
    @torch.inference_mode()
    def embed(self, model: Any, images: torch.Tensor) -> np.ndarray:
        """The hidden record of each image: int64 cluster ids (N) or float32 features (N x D)."""
        if self.method == "labels":
            scores = model.predict_proba(images)
            if scores.ndim != 2 or scores.shape[0] != images.shape[0]:
                raise ValueError(
                    f"model returned memberships of shape {tuple(scores.shape)}, expected "
                    f"({images.shape[0]}, K)"
                )
            return scores.argmax(dim=1).to(torch.int64).cpu().numpy()
        feats = model.features(images).flatten(1).to(torch.float32)
        if feats.shape[0] != images.shape[0]:
            raise ValueError(
                f"model returned {feats.shape[0]} feature rows for {images.shape[0]} images"
            )
        feats = torch.nn.functional.normalize(feats, dim=1)
        out = feats.cpu().numpy()
        if not np.isfinite(out).all():
            raise ValueError("feature extractor returned non-finite features")
        return out

    # ------------------------------------------------------------------ per album
    def group(self, records: np.ndarray) -> np.ndarray:
        """Album-local group ids (int64, N) of the records of one album's images."""
        records = np.asarray(records)
        n = records.shape[0]
        if n == 0:
            raise ValueError("cannot group 0 images")
        if self.method == "labels":
            return first_appearance_ids(records.reshape(n))
        feats = records.reshape(n, -1).astype(np.float64)
        distinct = np.unique(feats, axis=0).shape[0]
        if self.num_groups is not None:
            return first_appearance_ids(self._cluster(feats, min(self.num_groups, distinct)))
        return first_appearance_ids(self._auto(feats, distinct))

    def _cluster(self, feats: np.ndarray, k: int) -> np.ndarray:
        if k <= 1:
            return np.zeros(feats.shape[0], dtype=np.int64)
        from sklearn.cluster import AgglomerativeClustering, KMeans

        if self.method == "kmeans":
            model = KMeans(n_clusters=k, n_init=3, random_state=self.seed)
        else:
            model = AgglomerativeClustering(n_clusters=k, linkage="ward")
        with warnings.catch_warnings():
            # Near-duplicate points can leave k-means with fewer distinct clusters than k;
            # the ids it returns are still a valid grouping.
            warnings.simplefilter("ignore")
            return model.fit_predict(feats).astype(np.int64)

    def _auto(self, feats: np.ndarray, distinct: int) -> np.ndarray:
        """The clustering with the best silhouette over 2 .. max_groups groups (ties: fewer)."""
        from sklearn.metrics import silhouette_score

        best, best_score = np.zeros(feats.shape[0], dtype=np.int64), -np.inf
        for k in range(2, min(self.max_groups, distinct, feats.shape[0] - 1) + 1):
            labels = self._cluster(feats, k)
            used = np.unique(labels).size
            if not 2 <= used <= feats.shape[0] - 1:
                continue
            score = float(silhouette_score(feats, labels))
            if score > best_score + 1e-9:
                best, best_score = labels, score
        return best
