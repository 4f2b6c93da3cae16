"""Contract of every registered attack term and gradient source, generated from the registries.

Adding a term to ``losses.ATTACK_TERMS`` or a source to ``gradients.GRADIENT_SOURCE_FACTORIES``
puts it through these checks without a line of test code (docs/extending.md).
"""

from __future__ import annotations

import pytest
import torch

from clusterattack.attacks import CountingVictim, train_generator
from clusterattack.attacks.evaluate import evaluate_attack
from clusterattack.attacks.gradients import GRADIENT_SOURCE_FACTORIES, make_gradient_source
from clusterattack.attacks.losses import ATTACK_TERMS, attack_objective


def _memberships(n: int = 12, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.softmax(3 * torch.randn(n, k, generator=g), 1)
    logits = torch.randn(n, k, generator=g).requires_grad_(True)
    return clean, logits


@pytest.mark.parametrize("name", sorted(ATTACK_TERMS))
@pytest.mark.parametrize("target", [None, 1])
def test_every_attack_term_is_a_finite_scalar_with_a_gradient(name, target):
    clean, logits = _memberships()
    value = attack_objective(clean, torch.softmax(logits, 1), name, target_cluster=target, mi_temperature=0.5)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", sorted(ATTACK_TERMS))
def test_every_attack_term_prefers_moved_assignments_to_unmoved_ones(name):
    # The generator minimises the term: perturbed = clean must score worse (higher) than
    # perturbed memberships that moved every image to another cluster.
    clean = torch.eye(3).repeat(4, 1) * 0.97 + 0.01
    moved = clean.roll(1, dims=1)[torch.randperm(12, generator=torch.Generator().manual_seed(1))]
    assert attack_objective(clean, clean, name) > attack_objective(clean, moved, name)
    # Targeted: inside the target cluster scores better than outside it.
    inside = torch.full((12, 3), 0.01).index_fill_(1, torch.tensor([2]), 0.98)
    assert attack_objective(clean, inside, name, target_cluster=2) < attack_objective(clean, clean, name, target_cluster=2)


@pytest.mark.parametrize("source", sorted(GRADIENT_SOURCE_FACTORIES))
def test_every_gradient_source_trains_a_bounded_generator_that_hurts_the_victim(source, victim, blobs, config):
    train, test, labels, _ = blobs
    cfg = config(gradient_source=source, epochs=3)
    counted = CountingVictim(victim)
    made = make_gradient_source(counted, cfg)
    assert made.name == source and made.black_box == cfg.black_box
    result = train_generator(counted, train, cfg, progress=False, source=made)
    assert result.stopped == "completed" and result.epochs_run == 3
    assert result.image_queries == counted.image_queries > 0
    assert result.source["gradient_source"] == source
    with torch.no_grad():
        adv = result.generator.perturb(test, cfg.norm, cfg.eps, cfg.hard_clamp)[0]
        scores, _ = evaluate_attack(labels, victim.predict_proba(test), victim.predict_proba(adv), test, adv, figures=False)
    assert scores["linf_max"] <= cfg.eps + 1e-6  # the norm bound, on every image
    assert scores["nmi_post"] < scores["nmi_pre"]  # and it does what an attack is for


def test_an_unregistered_source_or_term_is_refused_by_name(victim, config):
    cfg = config()
    object.__setattr__(cfg, "gradient_source", "oracle")  # past validation, as a stale record could be
    with pytest.raises(ValueError, match="gradient_source must be one of .*'oracle'"):
        make_gradient_source(victim, cfg)
    clean, logits = _memberships()
    with pytest.raises(ValueError, match="attack_loss must be one of .*'margin'"):
        attack_objective(clean, torch.softmax(logits, 1), "margin")
