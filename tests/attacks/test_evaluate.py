"""evaluate_attack: keys, ranges and figures on known inputs."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from clusterattack.attacks import evaluate_attack
from clusterattack.attacks.gan import ConvergenceTracker


def _onehot(labels, k=3):
    return np.eye(k)[labels]


def test_evaluation_of_a_collapsing_attack():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    clean = rng.random((60, 1, 4, 4))
    adv = np.clip(clean + rng.uniform(-0.1, 0.1, clean.shape), 0, 1)
    ev, figs = evaluate_attack(labels, _onehot(labels), _onehot(np.zeros(60, int)), clean, adv)
    assert ev["nmi_pre"] == pytest.approx(1.0) and ev["nmi_post"] == pytest.approx(0.0)
    assert ev["nmi_drop"] == pytest.approx(1.0) and ev["acc_drop"] == pytest.approx(2 / 3)
    assert ev["changed_fraction"] == pytest.approx(2 / 3)
    assert ev["cluster_sizes_pre"] == [20, 20, 20] and ev["cluster_sizes_post"] == [60, 0, 0]
    assert ev["largest_cluster_fraction_post"] == 1.0 and ev["clusters_used_post"] == 1
    assert 0 < ev["linf_mean"] <= ev["linf_max"] <= 0.1
    assert 0 < ev["l2_mean"] <= ev["l2_max"] <= 0.1 * 4
    assert set(figs) == {"confusion_pre", "confusion_post", "cluster_sizes"}
    assert all(isinstance(f, Figure) for f in figs.values())


def test_evaluation_of_a_no_op_attack_and_ranges():
    labels = np.array([0, 0, 1, 1, 2, 2])
    proba = _onehot(np.array([1, 1, 0, 0, 2, 0]))
    x = np.zeros((6, 1, 2, 2))
    ev, figs = evaluate_attack(labels, proba, proba, x, x, figures=False)
    assert figs == {}
    assert ev["nmi_drop"] == 0.0 and ev["changed_fraction"] == 0.0 and ev["linf_max"] == 0.0
    for key in ("nmi_pre", "ari_pre", "acc_pre", "nmi_post", "acc_post"):
        assert -1.0 <= ev[key] <= 1.0


def test_evaluation_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="disagree in size"):
        evaluate_attack(np.zeros(3, int), np.ones((3, 2)), np.ones((4, 2)), np.zeros((3, 1, 2, 2)), np.zeros((3, 1, 2, 2)))
    with pytest.raises(ValueError, match="labels must have 1 dimensions"):
        evaluate_attack(np.zeros((3, 1)), np.ones((3, 2)), np.ones((3, 2)), np.zeros((3, 1, 2, 2)), np.zeros((3, 1, 2, 2)))


def test_convergence_rule():
    tracker = ConvergenceTracker(tol=0.05, patience=2)
    losses = [1.0, 0.5, 0.3, 0.29, 0.289, 0.1]
    fired = [tracker.update(e, v) for e, v in enumerate(losses, start=1)]
    # 0.29 and 0.289 each improve the best by < 5% of the 0.7 fallen so far: stale twice.
    assert fired == [False, False, False, False, True, False]
    assert tracker.converged_epoch == 5
