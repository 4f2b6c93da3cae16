"""Gradient sources of the attack term: whitebox (reference), estimate and surrogate (black-box)."""

from __future__ import annotations

from collections.abc import Callable

from clusterattack.attacks.config import GRADIENT_SOURCES, AttackConfig
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
    "GRADIENT_SOURCE_FACTORIES",
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


def _whitebox(victim: Victim, config: AttackConfig) -> GradientSource:
    return WhiteBoxSource(victim)


def _estimate(victim: Victim, config: AttackConfig) -> GradientSource:
    prior = _surrogate(victim, config) if config.estimator.prior == "surrogate" else None
    return EstimateSource(victim, config.estimator, config.seed, config.query_batch, prior=prior)


#: name -> factory(victim, config) of a gradient source (see docs/extending.md to add one).
GRADIENT_SOURCE_FACTORIES: dict[str, Callable[[Victim, AttackConfig], GradientSource]] = {
    "whitebox": _whitebox,
    "estimate": _estimate,
    "surrogate": _surrogate,
}
if set(GRADIENT_SOURCE_FACTORIES) != set(GRADIENT_SOURCES):
    raise ImportError(
        f"gradient sources out of step: factories for {sorted(GRADIENT_SOURCE_FACTORIES)}, "
        f"AttackConfig accepts {sorted(GRADIENT_SOURCES)}"
    )


def make_gradient_source(victim: Victim, config: AttackConfig) -> GradientSource:
    """The gradient source ``config.gradient_source`` names, bound to ``victim``."""
    factory = GRADIENT_SOURCE_FACTORIES.get(config.gradient_source)
    if factory is None:
        raise ValueError(
            f"gradient_source must be one of {sorted(GRADIENT_SOURCE_FACTORIES)}, got {config.gradient_source!r}"
        )
    return factory(victim, config)
