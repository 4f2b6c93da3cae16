"""Property tests of the clustering metrics against scikit-learn and their invariances."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from clusterattack.metrics import (
    aligned_confusion,
    cluster_accuracy,
    clustering_scores,
    hungarian_matching,
    relative_drop,
)

labels = st.lists(st.integers(0, 5), min_size=2, max_size=60)


@st.composite
def label_pairs(draw):
    y = draw(labels)
    c = draw(st.lists(st.integers(0, 7), min_size=len(y), max_size=len(y)))
    return np.array(y), np.array(c)


def brute_force_acc(y: np.ndarray, c: np.ndarray) -> float:
    """Best one-to-one matching by exhaustive search (small cases only)."""
    from itertools import permutations

    classes, clusters = np.unique(y), np.unique(c)
    best = 0
    k = max(len(classes), len(clusters))
    padded_classes = list(classes) + [None] * (k - len(classes))
    for perm in permutations(padded_classes, k):
        mapping = dict(zip(clusters, perm, strict=False))
        best = max(best, int(sum(mapping.get(ci) == yi for yi, ci in zip(y, c, strict=True))))
    return best / len(y)


@given(label_pairs())
@settings(max_examples=150, deadline=None)
def test_agrees_with_scikit_learn(pair):
    y, c = pair
    s = clustering_scores(y, c)
    assert s["nmi"] == pytest.approx(normalized_mutual_info_score(y, c), abs=1e-12)
    assert s["ari"] == pytest.approx(adjusted_rand_score(y, c), abs=1e-12)
    assert 0.0 <= s["acc"] <= 1.0


@given(label_pairs(), st.randoms(use_true_random=False))
@settings(max_examples=150, deadline=None)
def test_invariant_to_relabelling_clusters(pair, rnd):
    y, c = pair
    ids = np.unique(c)
    new_ids = ids.copy()
    rnd.shuffle(new_ids)
    new_ids = new_ids + 100  # also move the ids away from 0..K-1
    relabelled = np.array([dict(zip(ids, new_ids, strict=True))[v] for v in c])
    a, b = clustering_scores(y, c), clustering_scores(y, relabelled)
    for key in ("nmi", "ari", "acc"):
        assert a[key] == pytest.approx(b[key], abs=1e-12)


@given(labels, st.permutations(range(6)))
@settings(max_examples=100, deadline=None)
def test_perfect_clustering_scores_one(y, perm):
    y = np.array(y)
    c = np.array([perm[v] for v in y])
    s = clustering_scores(y, c)
    assert s["acc"] == 1.0
    if len(np.unique(y)) > 1:
        assert s["nmi"] == pytest.approx(1.0)
        assert s["ari"] == pytest.approx(1.0)


@given(st.lists(st.integers(0, 3), min_size=1, max_size=7), st.data())
@settings(max_examples=100, deadline=None)
def test_acc_matches_brute_force_with_unequal_cluster_counts(y, data):
    y = np.array(y)
    c = np.array(data.draw(st.lists(st.integers(0, 4), min_size=len(y), max_size=len(y))))
    assert cluster_accuracy(y, c) == pytest.approx(brute_force_acc(y, c))


def test_single_cluster_and_empty_clusters():
    y = np.array([0, 0, 1, 1, 2, 2])
    one = np.zeros(6, dtype=int)
    s = clustering_scores(y, one)
    assert s["nmi"] == pytest.approx(0.0)
    assert s["ari"] == pytest.approx(0.0)
    assert s["acc"] == pytest.approx(2 / 6)
    # 10 requested clusters, only one used: empty columns show as zeros, the used one is matched.
    conf = aligned_confusion(y, one, num_classes=3, num_clusters=10)
    assert conf.shape == (3, 10)
    assert conf.sum() == 6
    assert conf[0, 0] == 2 and conf[:, 0].sum() == 6


def test_aligned_confusion_puts_matches_on_the_diagonal():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    c = np.array([7, 7, 5, 3, 3, 5, 5, 7])
    conf = aligned_confusion(y, c)
    assert np.trace(conf) == hungarian_matching(y, c).matched
    assert conf.sum() == len(y)


def test_more_clusters_than_classes():
    y = np.array([0, 0, 1, 1])
    c = np.array([0, 1, 2, 3])
    assert cluster_accuracy(y, c) == pytest.approx(0.5)
    m = hungarian_matching(y, c)
    assert len(m.cluster_to_class) == 2


def test_relative_drop():
    assert relative_drop(0.8, 0.2) == pytest.approx(0.75)
    assert relative_drop(0.5, 0.6) == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="positive score before"):
        relative_drop(0.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        relative_drop(float("nan"), 0.1)


@pytest.mark.parametrize(
    ("y", "c", "message"),
    [
        ([0, 1], [0], "same length"),
        ([], [], "empty"),
        ([[0, 1]], [[0, 1]], "1-D"),
        ([0.5, 1.0], [0, 1], "integer labels"),
    ],
)
def test_bad_input_is_named(y, c, message):
    with pytest.raises(ValueError, match=message):
        clustering_scores(y, c)
