"""Per-image score-based baselines adapted to clustering (paper's Appendix E): NES, SPSA, Square.

``make_baseline("square", eps=0.1, max_queries=500).run(victim, images)`` attacks each image
away from its clean cluster within a per-image query budget; ``BASELINES`` maps names to
attack classes (each with its frozen config class).
"""

from __future__ import annotations

from typing import Any

from clusterattack.attacks.baselines.base import BaselineAttack, BaselineConfig, BaselineResult
from clusterattack.attacks.baselines.nes import NESAttack, NESConfig
from clusterattack.attacks.baselines.spsa import SPSAAttack, SPSAConfig
from clusterattack.attacks.baselines.square import SquareAttack, SquareConfig

__all__ = [
    "BASELINES",
    "BaselineAttack",
    "BaselineConfig",
    "BaselineResult",
    "NESAttack",
    "NESConfig",
    "SPSAAttack",
    "SPSAConfig",
    "SquareAttack",
    "SquareConfig",
    "make_baseline",
]

BASELINES: dict[str, type[BaselineAttack]] = {
    NESAttack.name: NESAttack,
    SPSAAttack.name: SPSAAttack,
    SquareAttack.name: SquareAttack,
}


def make_baseline(name: str, **config: Any) -> BaselineAttack:
    """The baseline ``name`` (one of ``BASELINES``) with its config built from ``config`` (validated)."""
    if name not in BASELINES:
        raise ValueError(f"baseline must be one of {tuple(BASELINES)}, got {name!r}")
    cls = BASELINES[name]
    return cls(cls.config_class(**config))
