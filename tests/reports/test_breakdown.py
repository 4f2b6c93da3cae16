"""Recomputing confusion matrices and the image grid from a generator and a victim (tiny, seeded, no store)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clusterattack.attacks import AttackConfig, Generator
from clusterattack.metrics import clustering_scores
from clusterattack.reports import ReportData, write_report
from clusterattack.reports.breakdown import (
    ARRAY_FIELDS,
    breakdown_from_record,
    breakdown_to_record,
    compute_breakdown,
    grid_indices,
)
from tests.reports.helpers import read_page


class QuadrantVictim:
    """3 clusters from the brightness of three image quadrants: enough to be moved by a perturbation."""

    num_clusters = 3
    input_shape = (1, 8, 8)

    def __init__(self) -> None:
        self.queries = 0

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        self.queries += x.shape[0]
        q = torch.stack(
            [
                x[:, 0, :4, :4].mean((1, 2)),
                x[:, 0, :4, 4:].mean((1, 2)),
                x[:, 0, 4:, :].mean((1, 2)),
            ],
            1,
        )
        return torch.softmax(20 * q, dim=1)


def test_breakdown_scores_tables_and_grid(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    images = (rng.random((30, 1, 8, 8)) * 80).astype(np.uint8)
    for i, c in enumerate(labels):  # each class bright in its own quadrant
        region = [
            (slice(0, 4), slice(0, 4)),
            (slice(0, 4), slice(4, 8)),
            (slice(4, 8), slice(0, 8)),
        ][c]
        images[i, 0][region] += 150
    victim = QuadrantVictim()
    attack = AttackConfig(norm="linf", eps=0.1, generator_width=4, generator_blocks=1)
    generator = Generator((1, 8, 8), width=4, blocks=1)
    provenance = {"model": "quad", "dataset": "tiny", "victim": "victim-quad-tiny/1", "generator": "g/1",
                  "generator_run_id": "r1", "gradient_source": "whitebox", "norm": "linf", "eps": 0.1, "seed": 0}  # fmt: skip
    b = compute_breakdown(victim, generator, attack, images, labels, grid_images=5, sample_seed=1,
                          class_names=("a", "b", "c"), provenance=provenance)  # fmt: skip

    x = torch.from_numpy(images).float() / 255
    clean = victim.predict_proba(x).argmax(1).numpy()
    assert b.scores["nmi_pre"] == clustering_scores(labels, clean)["nmi"]
    assert b.image_queries == 60 and b.n_images == 30
    assert b.confusion_pre.sum() == b.confusion_post.sum() == 30
    assert np.array_equal(b.confusion_pre.sum(1), np.bincount(labels))
    assert b.confusion_pre.trace() == round(
        b.scores["acc_pre"] * 30
    )  # columns in the clean matching's order
    assert sorted(b.cluster_order.tolist()) == [0, 1, 2]
    assert b.grid_clean.shape == b.grid_adv.shape == (5, 1, 8, 8)
    assert np.abs(b.grid_adv - b.grid_clean).max() <= 0.1 + 1e-6
    pick = grid_indices(labels, 5, seed=1)
    assert np.array_equal(b.grid_pre, clean[pick]) and np.allclose(b.grid_clean, x[pick].numpy())
    assert np.array_equal(b.grid_labels, labels[pick])
    assert set(b.cluster_names.values()) <= {"a", "b", "c"}

    page = read_page(write_report(ReportData("t", "u", "now", breakdowns=[b]), tmp_path))
    assert page.sections["confusion"] and page.sections["grid"]
    # one figure pair per row: victim, data set, gradient source and eps name it
    key = f"quad-tiny-{b.gradient_source}-eps0.1"
    assert {f"figures/confusion_{key}.png", f"figures/grid_{key}.png"} <= set(page.images)

    # what an analysis run stores (JSON fields and arrays) gives the same Breakdown back
    fields, arrays = breakdown_to_record(b)
    back = breakdown_from_record(json.loads(json.dumps(fields)), arrays)
    assert fields["cluster_sizes_ordered_post"] == b.confusion_post.sum(0).tolist()
    for name in ARRAY_FIELDS:
        assert np.array_equal(getattr(back, name), getattr(b, name)), name
    assert (back.scores, back.cluster_names, back.class_names) == (b.scores, b.cluster_names, b.class_names)
    with pytest.raises(ValueError, match="lacks the arrays"):
        breakdown_from_record(fields, {})
