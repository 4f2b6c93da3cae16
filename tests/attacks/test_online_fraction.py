"""Online queries on a share of each batch: the least sure images are asked, the rest keep the surrogate's answer."""

from __future__ import annotations

import math

import pytest
import torch

from clusterattack.attacks import CountingVictim, train_generator
from clusterattack.attacks.gradients import make_gradient_source


def _prepared(victim, blobs, config, fraction):
    train = blobs[0]
    counted = CountingVictim(victim)
    source = make_gradient_source(counted, config(gradient_source="surrogate", **{"surrogate.online_fraction": fraction}))
    with torch.no_grad():
        clean = victim.predict_proba(train)
    source.prepare(train, clean)
    return source, counted


def test_a_fraction_asks_the_least_sure_images_and_keeps_the_surrogate_elsewhere(victim, blobs, config):
    source, counted = _prepared(victim, blobs, config, 0.25)
    x = (blobs[0][:40] + 0.1).clamp(0, 1).requires_grad_(True)
    before = counted.image_queries
    out = source.memberships(x)
    assert counted.image_queries - before == 10  # ceil(0.25 x 40)
    with torch.no_grad():
        local = source._ensemble_probs(x)
        top = local.topk(2, dim=1).values
        lead = top[:, 0] - top[:, 1]
        answers = victim.predict_proba(x)
    asked = torch.zeros(40, dtype=torch.bool)
    asked[lead.argsort()[:10]] = True
    # The victim's value on the ten least sure rows, the surrogate's on the others.
    assert torch.allclose(out[asked], answers[asked], atol=1e-6)
    assert torch.allclose(out[~asked], local[~asked], atol=1e-6)
    assert float(lead[asked].max()) <= float(lead[~asked].min())
    # The gradient flows through every row (the surrogate's Jacobian), asked or not.
    (grad,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert bool((grad.flatten(1).abs().sum(1) > 0).all())
    # The surrogate is then fine-tuned on exactly what was asked.
    assert source._pending[0].shape[0] == 10


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_online_queries_per_epoch_follow_the_fraction(victim, blobs, config, fraction):
    cfg = config(gradient_source="surrogate", epochs=2, **{"surrogate.online_fraction": fraction,
                                                          "surrogate.refresh_rounds": 0})  # fmt: skip
    counted = CountingVictim(victim)
    result = train_generator(counted, blobs[0], cfg, progress=False)
    n, batch = blobs[0].shape[0], cfg.batch_size
    per_epoch = sum(math.ceil(fraction * min(batch, n - start)) for start in range(0, n, batch))
    # Clean memberships of the pool once, then the online share of each batch every epoch.
    assert result.image_queries == n + 2 * per_epoch == counted.image_queries


def test_online_fraction_is_validated_and_named():
    from clusterattack.attacks.config import AttackConfig
    from clusterattack.tracking.attacks import attack_run_name

    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="surrogate.online_fraction must lie in"):
            AttackConfig().override(**{"surrogate.online_fraction": bad})
    cfg = AttackConfig().override(**{"surrogate.online_fraction": 0.25})
    assert attack_run_name("cc", cfg) == "cc-surrogate-linf-eps0.1-of0.25-s0"
