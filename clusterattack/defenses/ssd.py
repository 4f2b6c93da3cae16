"""SSD: the self-supervised outlier detector of Sehwag et al. (ICLR 2021) turned on adversarial images.

Features of a contrastive encoder (here the victim's backbone, ``ClusteringModel.features``,
or any encoder given), L2-normalised as in SSD; per-cluster means (clusters from k-means on
clean training features, or the victim's own clusters) and one shared covariance; the score
of an image is its Mahalanobis distance to the nearest cluster mean. The threshold is the
(1 - target_fpr) quantile of scores on clean held-out images, so about ``target_fpr`` of
clean images are flagged. The paper's protocol (section 6.2): 8,000 test images, each
perturbed with probability 1/2, 100 trials; the detection rate is the fraction of
perturbed images flagged, the false-positive rate the fraction of clean ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["SSDDetector", "detection_trials", "extract_features"]

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    batch_size: int = 512,
    device: str = "cpu",
) -> np.ndarray:
    """``encoder`` applied to float images in batches without autograd; N x D float64 on the CPU."""
    from tqdm.auto import tqdm

    if images.ndim != 4:
        raise ValueError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
    out = []
    for start in tqdm(range(0, images.shape[0], batch_size), desc="features", leave=False, mininterval=5.0):
        feats = encoder(images[start : start + batch_size].to(device))
        out.append(feats.flatten(1).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def _normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


@dataclass
class SSDDetector:
    """Mahalanobis distance to the nearest cluster mean under a shared covariance (Sehwag et al.).

    ``num_clusters`` k-means clusters of the clean training features (ignored when
    ``fit`` is given cluster labels, e.g. the victim's own clusters). ``shrinkage`` adds
    that fraction of the mean variance to the covariance's diagonal so that the inverse
    exists for any feature size. ``normalize`` L2-normalises features first, as SSD does.
    """

    num_clusters: int = 10
    normalize: bool = True
    shrinkage: float = 1e-3
    seed: int = 0
    means: np.ndarray | None = None
    precision: np.ndarray | None = None
    threshold: float | None = None
    target_fpr: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_clusters, int) or self.num_clusters < 1:
            raise ValueError(f"num_clusters must be an integer >= 1, got {self.num_clusters!r}")
        if not 0 <= self.shrinkage < 1:
            raise ValueError(f"shrinkage must lie in [0, 1), got {self.shrinkage!r}")

    def _prep(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be N x D, got shape {f.shape}")
        return _normalise(f) if self.normalize else f

    def fit(self, features: np.ndarray, labels: np.ndarray | None = None) -> SSDDetector:
        """Cluster means and the shared covariance of clean ``features`` (labels: k-means if None)."""
        f = self._prep(features)
        if labels is None:
            from sklearn.cluster import KMeans

            if f.shape[0] < self.num_clusters:
                raise ValueError(f"need at least {self.num_clusters} clean images to fit, got {f.shape[0]}")
            labels = KMeans(self.num_clusters, n_init=3, random_state=self.seed).fit_predict(f)
        labels = np.asarray(labels)
        if labels.shape != (f.shape[0],):
            raise ValueError(f"labels must have shape ({f.shape[0]},), got {labels.shape}")
        ids = np.unique(labels)
        self.means = np.stack([f[labels == c].mean(0) for c in ids])
        centred = f - self.means[np.searchsorted(ids, labels)]
        cov = centred.T @ centred / max(f.shape[0] - 1, 1)
        cov += self.shrinkage * max(np.trace(cov) / cov.shape[0], 1e-12) * np.eye(cov.shape[0])
        self.precision = np.linalg.pinv(cov, hermitian=True)
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row to its nearest cluster mean (higher = more anomalous)."""
        if self.means is None or self.precision is None:
            raise RuntimeError("SSDDetector.score called before fit")
        f = self._prep(features)
        if f.shape[1] != self.means.shape[1]:
            raise ValueError(f"features have {f.shape[1]} dimensions, the detector was fit on {self.means.shape[1]}")
        best = np.full(f.shape[0], np.inf)
        for mean in self.means:
            d = f - mean
            best = np.minimum(best, np.einsum("ij,jk,ik->i", d, self.precision, d))
        return best

    def calibrate(self, clean_features: np.ndarray, target_fpr: float = 0.05) -> float:
        """Set the threshold so that ``target_fpr`` of clean held-out images score above it."""
        if not 0 < target_fpr < 1:
            raise ValueError(f"target_fpr must lie in (0, 1), got {target_fpr!r}")
        scores = self.score(clean_features)
        self.threshold = float(np.quantile(scores, 1.0 - target_fpr, method="higher"))
        self.target_fpr = float(target_fpr)
        return self.threshold

    def flag(self, features: np.ndarray) -> np.ndarray:
        """Boolean per row: flagged as anomalous (score above the calibrated threshold)."""
        if self.threshold is None:
            raise RuntimeError("SSDDetector.flag called before calibrate")
        return self.score(features) > self.threshold


def detection_trials(
    flagged_clean: np.ndarray,
    flagged_adv: np.ndarray,
    *,
    images: int = 8000,
    trials: int = 100,
    perturb_probability: float = 0.5,
    seed: int = 0,
) -> dict[str, float | int | list[float]]:
    """The paper's protocol on precomputed detector decisions: each trial perturbs each image w.p. 1/2.

    ``flagged_clean[i]`` / ``flagged_adv[i]`` say whether the detector flags test image i
    clean / perturbed (one feature pass for each, computed beforehand); a trial draws which
    of the first ``images`` are perturbed and reads the decisions off. Returns the detection
    rate (perturbed images flagged) and false-positive rate (clean images flagged), mean and
    std over trials, with per-trial values and the mean count of perturbed images.
    """
    fc = np.asarray(flagged_clean, dtype=bool)
    fa = np.asarray(flagged_adv, dtype=bool)
    if fc.shape != fa.shape or fc.ndim != 1:
        raise ValueError(f"flagged_clean and flagged_adv must be equal-length vectors, got {fc.shape} and {fa.shape}")
    if not isinstance(images, int) or not 1 <= images <= fc.shape[0]:
        raise ValueError(f"images must be an integer in 1..{fc.shape[0]} (decisions available), got {images!r}")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")
    if not 0 < perturb_probability < 1:
        raise ValueError(f"perturb_probability must lie in (0, 1), got {perturb_probability!r}")
    fc, fa = fc[:images], fa[:images]
    rng = np.random.default_rng(seed)
    detection, fpr, perturbed = [], [], []
    for _ in range(trials):
        chosen = rng.random(images) < perturb_probability
        n_adv = int(chosen.sum())
        detection.append(float(fa[chosen].sum() / max(n_adv, 1)))
        fpr.append(float(fc[~chosen].sum() / max(images - n_adv, 1)))
        perturbed.append(n_adv)
    return {
        "images": images,
        "trials": trials,
        "detection_rate_mean": float(np.mean(detection)),
        "detection_rate_std": float(np.std(detection)),
        "fpr_mean": float(np.mean(fpr)),
        "fpr_std": float(np.std(fpr)),
        "perturbed_mean": float(np.mean(perturbed)),
        "detection_rates": detection,
        "fprs": fpr,
    }
