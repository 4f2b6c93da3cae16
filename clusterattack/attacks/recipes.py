"""Named attack recipes: one registry of AttackConfig overrides used by every job and benchmark.

A recipe is a set of ``AttackConfig.override`` keys (dotted ones reach the nested surrogate
and estimator configs) with a line on what it is and what it costs. ``jobs/attack.py``,
``jobs/sweep.py`` and the benchmarks take ``--recipe NAME``; flags and ``--set key=value``
given with it win over it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["RECIPES", "Recipe", "apply_recipe", "get_recipe", "recipe_attack", "recipe_names"]


@dataclass(frozen=True)
class Recipe:
    """A named set of AttackConfig overrides and what it costs."""

    name: str
    summary: str
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from clusterattack.attacks.config import AttackConfig

        # A recipe that names a key AttackConfig does not have fails at import, not in a job.
        AttackConfig().override(**dict(self.overrides))
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))


_RECIPES = (
    Recipe("default", "the AttackConfig defaults: one small CNN surrogate, 3 refresh rounds, 20 epochs"),
    Recipe(
        "strong",
        # Measured on Fashion-MNIST at L-inf eps 0.1 (surrogate mode, one seed): NMI drop
        # 67-99% on the six demo victims for 575,000 image-queries; 30-60 min per victim on
        # 2 CPU cores, plus two attacker SimCLR pretexts (cached per data set and seed).
        "8 epochs, two surrogates on attacker SimCLR backbones of their own refreshed in 7 rounds; "
        "estimate mode: their gradient as prior with one random pair",
        {
            "epochs": 8,
            "surrogate.arch": "pretext",
            "surrogate.ensemble": 2,
            "surrogate.refresh_rounds": 7,
            "estimator.prior": "surrogate",
            "estimator.samples": 1,
        },
    ),
    Recipe(
        "fast",
        # Measured with benchmarks/attack_budget.py (docs/results/attack_budget_fashion_mnist.json):
        # the strong recipe's surrogate (two members on attacker SimCLR backbones of their own,
        # trained on the 20,000 pool images: about 1 min each on 2 CPU threads, cached per data
        # set, pool and seed) on 20,000 training images for 10 epochs, asking the victim online
        # about the half of each batch nearest the ensemble's decision boundary (at equal
        # queries this beat asking about every image: RUC 50.0% against 42.1% at 82,500), 2
        # refresh rounds of 2,500: 125,000 image-queries, about 6 min per victim on 2 threads.
        "two surrogates on attacker SimCLR backbones distilled from 20,000 memberships, 10 epochs over "
        "20,000 images asking online about the least sure half of each batch, 2 refresh rounds of 2,500: "
        "125,000 image-queries",
        {
            "epochs": 10,
            "train_limit": 20_000,
            "surrogate.arch": "pretext",
            "surrogate.ensemble": 2,
            "surrogate.distill_queries": 20_000,
            "surrogate.distill_epochs": 4,
            "surrogate.online_fraction": 0.5,
            "surrogate.refresh_rounds": 2,
            "surrogate.refresh_queries": 2_500,
            "estimator.prior": "surrogate",
            "estimator.samples": 1,
        },
    ),
)


#: name -> Recipe, in the order they are listed in ``--help``.
RECIPES: Mapping[str, Recipe] = MappingProxyType({r.name: r for r in _RECIPES})


def recipe_names() -> tuple[str, ...]:
    return tuple(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a clear error listing the known ones otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown attack recipe {name!r}, expected one of {list(RECIPES)}") from None


def apply_recipe(name: str, changes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The recipe's overrides with ``changes`` (flags, ``--set``) on top: what ``override`` takes."""
    return {**get_recipe(name).overrides, **dict(changes or {})}


def recipe_attack(name: str, changes: Mapping[str, Any] | None = None) -> Any:
    """The ``AttackConfig`` of recipe ``name`` with ``changes`` on top (validated)."""
    from clusterattack.attacks.config import AttackConfig

    return AttackConfig().override(**apply_recipe(name, changes))
