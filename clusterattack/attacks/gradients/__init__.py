"""Gradient sources of the attack term: whitebox (reference), estimate and surrogate (black-box)."""

from __future__ import annotations

from clusterattack.attacks.config import AttackConfig
from clusterattack.attacks.gradients.base import GradientSource, query_memberships
from clusterattack.attacks.gradients.estimate import EstimateSource, estimated_memberships
from clusterattack.attacks.gradients.surrogate import (
    SurrogateNet,
    SurrogateSource,
    without_queried_points,
)
from clusterattack.attacks.gradients.whitebox import WhiteBoxSource
from clusterattack.victims.base import Victim

__all__ = [
    "EstimateSource",
    "GradientSource",
    "SurrogateNet",
    "SurrogateSource",
    "WhiteBoxSource",
    "estimated_memberships",
    "make_gradient_source",
    "query_memberships",
    "without_queried_points",
]


def _surrogate(victim: Victim, config: AttackConfig) -> SurrogateSource:
    return SurrogateSource(
        victim,
        config.surrogate,
        eps=config.eps,
        norm=config.norm,
        epochs=config.epochs,
        seed=config.seed,
        query_batch=config.query_batch,
        device=config.device,
        precision=config.precision,
    )


def make_gradient_source(victim: Victim, config: AttackConfig) -> GradientSource:
    """The gradient source ``config.gradient_source`` names, bound to ``victim``."""
    if config.gradient_source == "whitebox":
        return WhiteBoxSource(victim)
    if config.gradient_source == "estimate":
        prior = _surrogate(victim, config) if config.estimator.prior == "surrogate" else None
        return EstimateSource(victim, config.estimator, config.seed, config.query_batch, prior=prior)
    if config.gradient_source == "surrogate":
        return _surrogate(victim, config)
    raise ValueError(
        f"gradient_source must be 'whitebox', 'estimate' or 'surrogate', got {config.gradient_source!r}"
    )
