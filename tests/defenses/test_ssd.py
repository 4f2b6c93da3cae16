"""SSD detector: the threshold keeps the stated false-positive rate, large perturbations are caught, trials count."""

from __future__ import annotations

import numpy as np
import pytest

from clusterattack.defenses import SSDDetector, detection_trials


def _clusters(n: int, rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    centres = np.eye(3, 16) * 4.0
    labels = rng.integers(0, 3, n)
    return centres[labels] + rng.normal(size=(n, 16)) + shift


@pytest.mark.parametrize("fpr", [0.05, 0.2])
def test_threshold_gives_the_stated_fpr_on_clean_data(rng, fpr):
    detector = SSDDetector(num_clusters=3, normalize=False).fit(_clusters(3000, rng))
    detector.calibrate(_clusters(4000, rng), target_fpr=fpr)
    flagged = detector.flag(_clusters(20000, rng)).mean()
    assert flagged == pytest.approx(fpr, abs=0.015)


def test_large_perturbations_are_detected(rng):
    detector = SSDDetector(num_clusters=3, normalize=False).fit(_clusters(2000, rng))
    detector.calibrate(_clusters(2000, rng), 0.05)
    far = _clusters(1000, rng) + rng.normal(scale=6.0, size=(1000, 16))
    assert detector.flag(far).mean() > 0.9


def test_victim_clusters_can_replace_kmeans(rng):
    x = _clusters(600, rng)
    labels = np.argmax(x[:, :3], axis=1)
    detector = SSDDetector(num_clusters=3, normalize=False).fit(x, labels)
    assert detector.means.shape == (3, 16)
    assert detector.score(x).shape == (600,)


def test_trials_protocol_counts():
    n = 8000
    flagged_clean = np.zeros(n, dtype=bool)
    flagged_clean[:400] = True  # 5% of clean images flagged
    flagged_adv = np.ones(n, dtype=bool)
    flagged_adv[: n // 4] = False  # 75% of perturbed images flagged
    out = detection_trials(flagged_clean, flagged_adv, images=n, trials=100, seed=0)
    assert out["images"] == n and out["trials"] == 100
    assert len(out["detection_rates"]) == 100 and len(out["fprs"]) == 100
    assert out["perturbed_mean"] == pytest.approx(n / 2, rel=0.02)
    assert out["detection_rate_mean"] == pytest.approx(0.75, abs=0.01)
    assert out["fpr_mean"] == pytest.approx(0.05, abs=0.005)
    assert 0 < out["detection_rate_std"] < 0.02 and 0 < out["fpr_std"] < 0.01
    again = detection_trials(flagged_clean, flagged_adv, images=n, trials=100, seed=0)
    assert again["detection_rates"] == out["detection_rates"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"images": 10}, "images"),
        ({"trials": 0}, "trials"),
        ({"perturb_probability": 1.0}, "perturb_probability"),
    ],
)
def test_bad_trial_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        detection_trials(np.zeros(5, bool), np.zeros(5, bool), **{"images": 5, **kwargs})


def test_bad_detector_use_is_rejected(rng):
    with pytest.raises(ValueError, match="target_fpr"):
        SSDDetector(num_clusters=3).fit(_clusters(100, rng)).calibrate(_clusters(50, rng), 1.5)
    with pytest.raises(RuntimeError, match="before fit"):
        SSDDetector().score(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="num_clusters"):
        SSDDetector(num_clusters=0)
