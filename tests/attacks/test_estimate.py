"""Estimated gradients: the NES/SPSA estimate points the way the true gradient does."""

from __future__ import annotations

import pytest
import torch

from clusterattack.attacks import CountingVictim, EstimateSource, EstimatorConfig, SurrogateSource
from clusterattack.attacks.config import SurrogateConfig
from clusterattack.attacks.gradients.estimate import sample_directions


def _true_and_estimated(victim, x, source):
    weights = torch.rand(x.shape[0], victim.num_clusters, generator=torch.Generator().manual_seed(1))
    x_true = x.clone().requires_grad_()
    (victim.predict_proba(x_true) * weights).sum().backward()
    x_est = x.clone().requires_grad_()
    probs = source.memberships(x_est)
    (probs * weights).sum().backward()
    assert torch.allclose(probs, victim.predict_proba(x).detach(), atol=1e-6)
    cosine = torch.nn.functional.cosine_similarity(x_est.grad.flatten(1), x_true.grad.flatten(1), dim=1)
    return float(cosine.mean())


@pytest.mark.parametrize(
    ("method", "resolution"), [("nes", 1.0), ("spsa", 1.0), ("nes", 0.5), ("spsa", 0.5)]
)
def test_estimate_correlates_with_the_true_gradient(victim, blobs, method, resolution):
    cfg = EstimatorConfig(method=method, samples=200, sigma=0.01, resolution=resolution)
    source = EstimateSource(CountingVictim(victim), cfg, seed=0, query_batch=256)
    # A coarse grid sees only the projection of the gradient on it, hence a lower bar.
    assert _true_and_estimated(victim, blobs[0][:16], source) > (0.6 if resolution == 1.0 else 0.3)


def test_surrogate_prior_aims_the_few_queries_it_makes(victim, blobs):
    train = blobs[0]
    counted = CountingVictim(victim)
    prior = SurrogateSource(
        counted, SurrogateConfig(distill_epochs=40, width=8, lr=1e-2, batch_size=64, augment=False),
        eps=0.1, norm="linf", epochs=1, seed=0, query_batch=256,
    )
    prior.prepare(train, victim.predict_proba(train).detach())
    cfg = EstimatorConfig(samples=0, sigma=0.01, prior="surrogate")
    source = EstimateSource(counted, cfg, seed=0, query_batch=256, prior=prior)
    before = counted.image_queries
    # Three queries per image, yet closer to the truth than 2 x 4 random NES queries.
    with_prior = _true_and_estimated(victim, train[:16], source)
    assert counted.image_queries - before == 16 * cfg.queries_per_image() == 48
    plain = EstimateSource(counted, EstimatorConfig(samples=4, sigma=0.01, resolution=1.0), seed=0, query_batch=256)
    assert with_prior > 0.4
    assert with_prior > _true_and_estimated(victim, train[:16], plain)


def test_prior_needs_a_surrogate_and_allows_zero_samples(victim):
    assert EstimatorConfig(samples=0, prior="surrogate").queries_per_image() == 3
    with pytest.raises(ValueError, match="estimator.samples"):
        EstimatorConfig(samples=0)
    with pytest.raises(ValueError, match="needs a surrogate"):
        EstimateSource(victim, EstimatorConfig(prior="surrogate"), seed=0, query_batch=256)


def test_estimate_costs_one_plus_two_q_queries_per_image(victim, blobs):
    counted = CountingVictim(victim)
    cfg = EstimatorConfig(samples=3)
    x = blobs[0][:10].clone().requires_grad_()
    EstimateSource(counted, cfg, seed=0, query_batch=16).memberships(x).sum().backward()
    assert counted.image_queries == 10 * (1 + 2 * 3) == 70  # 10 images, q = 3 pairs each
    assert counted.calls == 1 + -(-60 // 16)  # the 10 points, then 60 in calls of 16


def test_directions_are_upsampled_from_a_coarse_grid():
    g = torch.Generator().manual_seed(0)
    u = sample_directions(2, 3, (1, 8, 8), "spsa", 0.25, g)
    assert u.shape == (2, 3, 1, 8, 8)
    assert set(u.unique().tolist()) <= {-1.0, 1.0}
    # Each 4 x 4 block of an upsampled 2 x 2 grid is constant.
    assert torch.equal(u[..., :4, :4], u[..., :1, :1].expand(2, 3, 1, 4, 4))
    with pytest.raises(ValueError, match="'gauss'"):
        sample_directions(1, 1, (1, 8, 8), "gauss", 1.0, g)
