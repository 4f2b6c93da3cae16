"""Defenses against the generator attack (one file each): SSD detection, PCA overlap, adversarial retraining."""

from clusterattack.defenses.pca import OVERLAP_METHOD, PCAOverlap, pca_overlap
from clusterattack.defenses.retraining import AdversarialTrainData, adversarial_retrain
from clusterattack.defenses.ssd import SSDDetector, detection_trials, extract_features

__all__ = [
    "OVERLAP_METHOD",
    "AdversarialTrainData",
    "PCAOverlap",
    "SSDDetector",
    "adversarial_retrain",
    "detection_trials",
    "extract_features",
    "pca_overlap",
]
