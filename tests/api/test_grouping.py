"""The hidden grouping: cluster ids or features + clustering, album-local ids, service-chosen counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clusterattack.api.grouping import GroupingSpec, first_appearance_ids
from clusterattack.metrics import clustering_scores
from tests.api.tiny_models import PrototypeModel, make_blobs


def test_first_appearance_ids_hide_the_models_numbering():
    np.testing.assert_array_equal(first_appearance_ids(np.array([7, 7, 2, 9, 2])), [0, 0, 1, 2, 1])
    assert first_appearance_ids(np.array([], dtype=np.int64)).size == 0


def test_labels_grouping_is_the_models_argmax_renumbered():
    model = PrototypeModel()
    images, _ = make_blobs(12)
    spec = GroupingSpec("labels")
    records = spec.embed(model, images)
    assert records.dtype == np.int64 and records.shape == (12,)
    np.testing.assert_array_equal(records, model.predict_proba(images).argmax(1).numpy())
    np.testing.assert_array_equal(spec.group(records), first_appearance_ids(records))


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_feature_grouping_chooses_the_group_count_itself(method):
    model = PrototypeModel()
    images, truth = make_blobs(30)
    spec = GroupingSpec(method, max_groups=8)
    records = spec.embed(model, images)
    assert records.dtype == np.float32 and records.shape == (30, 64)
    np.testing.assert_allclose(np.linalg.norm(records, axis=1), 1.0, rtol=1e-5)
    groups = spec.group(records)
    assert np.unique(groups).size == 3
    assert clustering_scores(truth.numpy(), groups)["nmi"] == pytest.approx(1.0)
    np.testing.assert_array_equal(spec.group(records), groups)  # deterministic: free to repeat


def test_a_fixed_group_count_is_honoured_and_tiny_albums_are_one_group():
    records = GroupingSpec("kmeans").embed(PrototypeModel(), make_blobs(12)[0])
    assert np.unique(GroupingSpec("kmeans", num_groups=2).group(records)).size == 2
    auto = GroupingSpec("kmeans")
    np.testing.assert_array_equal(auto.group(records[:1]), [0])
    np.testing.assert_array_equal(auto.group(records[:2]), [0, 0])
    np.testing.assert_array_equal(auto.group(np.repeat(records[:1], 5, axis=0)), [0] * 5)
    two = np.concatenate([np.repeat(records[:1], 3, axis=0), np.repeat(records[1:2], 3, axis=0)])
    np.testing.assert_array_equal(auto.group(two), [0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "dbscan"}, "grouping method must be one of"),
        ({"method": "labels", "num_groups": 3}, "num_groups must be None"),
        ({"method": "kmeans", "num_groups": 0}, "num_groups must be an integer >= 1"),
        ({"method": "kmeans", "max_groups": 1}, "max_groups must be an integer >= 2"),
        ({"seed": "0"}, "seed must be an integer"),
    ],
)
def test_bad_grouping_specs_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupingSpec(**kwargs)


def test_a_model_without_what_the_grouping_needs_is_refused():
    class ScoresOnly(torch.nn.Module):
        input_shape = (1, 8, 8)

        def predict_proba(self, x):
            return torch.ones(len(x), 2) / 2

    GroupingSpec("labels").check_model(ScoresOnly())
    with pytest.raises(TypeError, match="needs a model with 'features'"):
        GroupingSpec("kmeans").check_model(ScoresOnly())
    with pytest.raises(ValueError, match="cannot group 0 images"):
        GroupingSpec("labels").group(np.zeros(0, np.int64))
