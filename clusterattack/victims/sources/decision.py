"""Which attacks a victim admits: decision-only victims take the label-based surrogate path.

A decision-only victim answers cluster ids and nothing more. The surrogate gradient
source can still learn from it: it distils its local models on the ids as one-hot
memberships (cross-entropy on the victim's decisions) and refreshes them on the ids of
adversarial points, which is the label-based path of the album-API attack
(``jobs/api_attack.py`` trains its surrogate without any query at all). The estimate mode
cannot: a finite difference of cluster ids is zero almost everywhere, so there is no
gradient to estimate; white-box needs autograd through a local torch model.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from clusterattack.victims.sources.spec import VictimSpecError

__all__ = [
    "DecisionOnlyError",
    "OneHotMemberships",
    "for_gradient_source",
    "is_decision_only",
    "is_differentiable",
]

log = logging.getLogger(__name__)


class DecisionOnlyError(VictimSpecError):
    """A decision-only victim given to an attack that needs its scores or its gradients."""


def is_decision_only(victim: Any) -> bool:
    """True when the victim answers cluster ids only (no ``predict_proba``, or served in labels mode)."""
    if getattr(victim, "mode", None) == "labels" or getattr(victim, "output", None) == "labels":
        return True
    return not callable(getattr(victim, "predict_proba", None))


def is_differentiable(victim: Any) -> bool:
    """True when autograd reaches through ``predict_proba`` (a local torch model)."""
    return isinstance(victim, nn.Module) or bool(getattr(victim, "differentiable", False))


class OneHotMemberships:
    """A decision-only victim seen as one that answers one-hot memberships.

    One call of ``predict_proba`` is one call of the victim's ``predict``: the victim's
    own counters (``image_queries``, ``calls``, ``counts()``), where it has them, are read
    through unchanged.
    """

    def __init__(self, victim: Any) -> None:
        if not callable(getattr(victim, "predict", None)):
            raise TypeError(f"{type(victim).__name__} has no predict(): not a decision-only victim")
        self._victim = victim
        self.num_clusters = int(victim.num_clusters)
        self.input_shape = tuple(int(v) for v in victim.input_shape)
        self.name = getattr(victim, "name", type(victim).__name__)
        self.output = "labels"

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(self._victim.predict(x)).to(torch.int64)
        return torch.nn.functional.one_hot(labels, self.num_clusters).to(torch.float32)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self._victim.predict(x)).to(torch.int64)

    @property
    def image_queries(self) -> int | None:
        return getattr(self._victim, "image_queries", None)

    @property
    def calls(self) -> int | None:
        return getattr(self._victim, "calls", None)

    def counts(self) -> dict[str, int]:
        counts = getattr(self._victim, "counts", None)
        return counts() if callable(counts) else {"image_queries": self.image_queries, "calls": self.calls}

    def describe(self) -> dict[str, Any]:
        inner = getattr(self._victim, "describe", None)
        return {**(inner() if callable(inner) else {}), "seen_as": "one-hot memberships of its labels"}


def for_gradient_source(victim: Any, gradient_source: str, name: str = "") -> Any:
    """The victim as the attack with ``gradient_source`` should see it, or DecisionOnlyError.

    A decision-only victim goes to the surrogate path as one-hot memberships; the estimate
    and white-box modes refuse it and say why. White-box also refuses a victim without
    autograd (ONNX, HTTP, numpy models).
    """
    who = name or getattr(victim, "name", "") or type(victim).__name__
    if is_decision_only(victim):
        if gradient_source == "surrogate":
            log.info(
                "victim %s answers cluster ids only: the surrogate distils on them as one-hot memberships",
                who,
            )
            return OneHotMemberships(victim)
        why = (
            "a finite difference of cluster ids is zero almost everywhere, so there is no gradient to estimate"
            if gradient_source == "estimate"
            else "white-box needs the gradients of a local torch model"
        )
        raise DecisionOnlyError(
            f"victim {who} is decision-only (it answers cluster ids, no memberships) and the "
            f"{gradient_source!r} gradient source needs its scores: {why}. Use --gradient-source "
            "surrogate (the label-based path: the surrogate distils on the ids), or "
            "jobs/api_attack.py (a surrogate trained without queries)"
        )
    if gradient_source == "whitebox" and not is_differentiable(victim):
        raise DecisionOnlyError(
            f"victim {who} ({type(victim).__name__}) has no autograd graph (an ONNX session, an HTTP "
            "service, a numpy model): 'whitebox' needs a local torch model; use 'surrogate' or 'estimate'"
        )
    return victim
