"""What one generator attack run produced (``AttackResult``) and the convergence rule that
fixes its query complexity (``ConvergenceTracker``); ``gan.train_generator`` fills them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clusterattack.attacks.config import AttackConfig
from clusterattack.attacks.counting import calls_of
from clusterattack.attacks.discriminator import Discriminator
from clusterattack.attacks.generator import Generator

__all__ = [
    "STOP_BUDGET", "STOP_CALLER", "STOP_COMPLETED", "STOP_CONVERGED", "AttackResult", "ConvergenceTracker", "EpochHook",
]  # fmt: skip

STOP_COMPLETED = "completed"
STOP_CONVERGED = "converged"
STOP_BUDGET = "budget_exhausted"
STOP_CALLER = "stopped_by_caller"

#: Called after every epoch with the result so far and the state to resume from (see
#: ``train_generator``); returning True ends training.
EpochHook = Callable[["AttackResult", dict[str, Any]], bool | None]


class ConvergenceTracker:
    """The convergence rule that fixes the query complexity of a run.

    After each epoch the epoch-mean generator loss is compared with the best mean so far.
    An epoch is *stale* when it improves the best by less than ``tol`` times the total
    improvement since the first epoch (at least ``1e-4``, so that a flat loss counts as
    converged). The loss has converged at the end of the first run of ``patience``
    consecutive stale epochs; the queries spent up to that point are the query complexity.
    Scaling by the total improvement makes the rule independent of the loss's offset and
    units (mutual information near 0, a negative distance, the GAN term).
    """

    def __init__(self, tol: float, patience: int) -> None:
        self.tol = tol
        self.patience = patience
        self.first: float | None = None
        self.best = math.inf
        self.stale = 0
        self.converged_epoch: int | None = None

    def update(self, epoch: int, loss: float) -> bool:
        """Record one epoch's mean loss; True the first time the rule is met."""
        if not math.isfinite(loss):
            self.stale = 0
            return False
        if self.first is None:
            self.first, self.best = loss, loss
            return False
        scale = max(self.first - self.best, 1e-4)
        if self.best - loss > self.tol * scale:
            self.stale = 0
        else:
            self.stale += 1
        self.best = min(self.best, loss)
        if self.converged_epoch is None and self.stale >= self.patience:
            self.converged_epoch = epoch
            return True
        return False


@dataclass
class AttackResult:
    """What a generator training run produced, complete or cut short.

    ``image_queries`` and ``calls`` are what the victim's own counters moved by during
    training (None when the victim keeps no counters); ``*_at_convergence`` are the same
    at the epoch the convergence rule fired (None if it never did). ``stopped`` is
    "completed", "converged" (with ``stop_at_convergence``) or "budget_exhausted".
    """

    config: AttackConfig
    generator: Generator
    discriminator: Discriminator
    source: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: str = STOP_COMPLETED
    error: str | None = None
    converged_epoch: int | None = None
    image_queries: int | None = None
    calls: int | None = None
    image_queries_at_convergence: int | None = None
    calls_at_convergence: int | None = None
    seconds: float = 0.0
    selected_epoch: int | None = None  # the epoch whose generator was kept (select_images)
    # Image-queries of the selection hold-out (its clean memberships, then one query per image
    # per epoch), as the victim's own counter moved; included in ``image_queries``.
    selection_image_queries: int | None = None
    # The MI term's temperature the run trained with (``mi_temperature`` "auto" resolved).
    mi_temperature: float | None = None

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    def summary(self) -> dict[str, Any]:
        """Flat record of the run: config essentials, stop reason, query complexity."""
        cfg = self.config
        return {
            "gradient_source": cfg.gradient_source,
            "black_box": cfg.black_box,
            "norm": cfg.norm,
            "eps": cfg.eps,
            "attack_loss": cfg.attack_loss,
            "mi_temperature": self.mi_temperature if self.mi_temperature is not None else cfg.mi_temperature,
            "target_cluster": cfg.target_cluster,
            "seed": cfg.seed,
            "stopped": self.stopped,
            "error": self.error,
            "epochs_run": self.epochs_run,
            "converged_epoch": self.converged_epoch,
            "image_queries": self.image_queries,
            "calls": self.calls,
            "calls_256": calls_of(self.image_queries, 256),
            "image_queries_at_convergence": self.image_queries_at_convergence,
            "calls_at_convergence": self.calls_at_convergence,
            "calls_256_at_convergence": calls_of(self.image_queries_at_convergence, 256),
            "selected_epoch": self.selected_epoch,
            "selection_image_queries": self.selection_image_queries,
            "train_seconds": round(self.seconds, 2),
        }
