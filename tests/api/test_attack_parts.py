"""Pieces of the API attack that need no service: config checks, draws, 8-bit uploads, error bodies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clusterattack.api.attack import ApiAttackConfig, quantize_perturbed, sample_draw
from clusterattack.api.errors import AlbumEmpty, AlbumNotFound, album_error_from_payload
from clusterattack.attacks.config import AttackConfig
from clusterattack.serving.errors import BudgetExceeded


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attack": AttackConfig(gradient_source="surrogate")}, "must be 'whitebox'"),
        ({"draws": 0}, "draws must be an integer >= 1"),
        ({"per_class": 2.5}, "per_class must be an integer >= 1"),
        ({"surrogate_preset": "huge"}, "surrogate_preset must be one of"),
        ({"surrogate_epochs": -1}, "surrogate_epochs must be an integer >= 0"),
        ({"surrogate_width": 2}, "surrogate_width must be an integer >= 4"),
    ],
)
def test_api_attack_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ApiAttackConfig(dataset="digits", **kwargs)


def test_api_attack_config_flattens_for_mlflow():
    flat = ApiAttackConfig(dataset="digits", draws=3).flat()
    assert flat["draws"] == 3 and flat["attack.gradient_source"] == "whitebox"
    assert "attack" not in flat and flat["attack.eps"] == pytest.approx(0.1)
    with pytest.raises(KeyError, match="unknown victim model"):
        ApiAttackConfig(dataset="digits", surrogate_model="resnet")


def test_a_draw_holds_per_class_images_of_every_class_in_mixed_order():
    labels = np.repeat(np.arange(4), 6)
    idx = sample_draw(labels, 3, np.random.default_rng(0))
    assert np.bincount(labels[idx]).tolist() == [3, 3, 3, 3]
    assert len(set(idx.tolist())) == 12
    assert not np.array_equal(labels[idx], np.sort(labels[idx]))
    again = sample_draw(labels, 3, np.random.default_rng(0))
    np.testing.assert_array_equal(idx, again)
    with pytest.raises(ValueError, match="class 0 has 6 test images, fewer than per_class=7"):
        sample_draw(labels, 7, np.random.default_rng(0))


def test_uploads_are_8_bit_and_stay_within_the_bound():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (5, 1, 8, 8), generator=g).float() / 255
    adv = (clean + 0.1 * (2 * torch.rand(clean.shape, generator=g) - 1)).clamp(0, 1)
    sent = quantize_perturbed(clean, adv)
    np.testing.assert_allclose((sent * 255).numpy(), np.round((sent * 255).numpy()), atol=1e-4)
    assert float((sent - clean).abs().max()) <= 0.1
    assert torch.all((sent - clean).abs() <= (adv - clean).abs() + 1e-6)
    assert torch.all((sent - clean) * (adv - clean) >= 0)  # never flips a change's sign


def test_error_bodies_come_back_as_their_typed_errors():
    assert isinstance(album_error_from_payload(404, {"error": "AlbumNotFound", "detail": "no album"}), AlbumNotFound)
    empty = album_error_from_payload(409, {"error": "AlbumEmpty", "detail": "holds no images"})
    assert isinstance(empty, AlbumEmpty) and empty.status_code == 409
    budget = album_error_from_payload(
        429, {"error": "BudgetExceeded", "detail": "budget", "requested": 5, "remaining": 2}
    )
    assert isinstance(budget, BudgetExceeded) and budget.remaining == 2
