"""Query counts of a victim, and a counting wrapper for local victims that have no counter.

Accounting belongs to the served victim (``ServedVictim`` and the server's ledger); an
attack only reads the counters. A local model has none, so ``CountingVictim`` gives it
the same two counters (and, optionally, the same typed budget error), letting a local
run report image-queries and calls exactly as a served one does.
"""

from __future__ import annotations

import math

import torch

from clusterattack.serving.errors import BudgetExceeded
from clusterattack.victims.base import Victim

__all__ = ["CountingVictim", "calls_of", "read_counts"]


def read_counts(victim: object) -> tuple[int | None, int | None]:
    """(image_queries, calls) the victim reports, or None for a counter it does not have."""
    images = getattr(victim, "image_queries", None)
    calls = getattr(victim, "calls", None)
    return (
        None if images is None else int(images),
        None if calls is None else int(calls),
    )


def calls_of(image_queries: int | None, batch: int = 256) -> int | None:
    """Image-queries expressed as calls of ``batch`` images (the paper's Table 2 unit)."""
    if image_queries is None:
        return None
    return math.ceil(image_queries / batch)


class CountingVictim:
    """Victim view of a local model that counts image-queries and calls.

    Exposes only the Victim contract (``num_clusters``, ``input_shape``,
    ``predict_proba``), so an attack holding it cannot reach the model's parameters by
    attribute access. With ``budget`` set, a call that would exceed it raises
    ``clusterattack.serving.errors.BudgetExceeded`` and is not charged, as the server does.
    """

    def __init__(self, victim: Victim, budget: int | None = None) -> None:
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be a non-negative number of image-queries, got {budget}")
        self._victim = victim
        self.num_clusters = int(victim.num_clusters)
        self.input_shape = tuple(int(v) for v in victim.input_shape)
        self.budget = budget
        self.image_queries = 0
        self.calls = 0

    @property
    def remaining(self) -> int | None:
        """Image-queries left under the budget (None: unlimited)."""
        return None if self.budget is None else self.budget - self.image_queries

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])
        if self.budget is not None and self.image_queries + n > self.budget:
            raise BudgetExceeded(
                f"query budget of {self.budget} image-queries exhausted: {n} requested, "
                f"{self.budget - self.image_queries} remaining",
                requested=n,
                remaining=self.budget - self.image_queries,
            )
        self.image_queries += n
        self.calls += 1
        return self._victim.predict_proba(x)

    def __repr__(self) -> str:
        return (
            f"CountingVictim({type(self._victim).__name__}, image_queries={self.image_queries}, "
            f"calls={self.calls}, budget={self.budget})"
        )
