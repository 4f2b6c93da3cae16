"""The interface every gradient source of the attack term implements, and the query helper."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any

import torch

from clusterattack.victims.base import Victim

__all__ = ["GradientSource", "query_memberships"]


def query_memberships(victim: Victim, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The victim's memberships of ``images``, asked in calls of at most ``batch_size`` images.

    The only way the black-box sources reach a victim: detached CPU inputs, no autograd,
    outputs copied into a fresh tensor, so nothing can flow back into (or read out of) the
    victim's parameters. Counting is the victim's business (ServedVictim and its ledger).
    A victim with ``predict_proba_batches`` (``ServedVictim``) gets all the images at once
    and asks them as the same calls of ``batch_size`` with several in flight.
    """
    if images.shape[0] == 0:
        return torch.empty(0, victim.num_clusters)
    batches = getattr(victim, "predict_proba_batches", None)
    with torch.no_grad():
        if callable(batches):
            # A served victim asks the same calls of batch_size with several in flight.
            whole = images.detach().to("cpu", torch.float32).contiguous()
            probs = torch.as_tensor(batches(whole, batch_size)).detach().to("cpu", torch.float32).clone()
        else:
            out = []
            for start in range(0, images.shape[0], batch_size):
                chunk = images[start : start + batch_size].detach().to("cpu", torch.float32)
                probs = victim.predict_proba(chunk.contiguous())
                out.append(torch.as_tensor(probs).detach().to("cpu", torch.float32).clone())
            probs = torch.cat(out)
    if probs.shape != (images.shape[0], victim.num_clusters):
        raise ValueError(
            f"victim returned memberships of shape {tuple(probs.shape)}, expected "
            f"{(images.shape[0], victim.num_clusters)}"
        )
    return probs


class GradientSource(abc.ABC):
    """Where the gradient of the attack term with respect to x_adv comes from.

    ``memberships(x_adv)`` returns N x K memberships of the perturbed images that are
    differentiable with respect to ``x_adv``: the attack term computed on them by the
    training loop backpropagates into the generator through whatever gradient the source
    provides (autograd through the victim, a query estimate, or a surrogate).
    """

    #: Name recorded with every result ("whitebox", "estimate", "surrogate").
    name: str = ""
    #: True when the source reaches the victim through queries only.
    black_box: bool = True
    #: True when ``memberships`` are the victim's own (so the loss tracks the victim).
    exact_memberships: bool = True

    def prepare(
        self,
        images: torch.Tensor,
        clean_memberships: torch.Tensor,
        progress: bool = False,
    ) -> None:
        """Called once before training with the training images and their cached M_i."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What ``resume`` needs to go on exactly where this source stands after an epoch
        (empty when the source keeps nothing between steps)."""
        return {}

    def resume(
        self,
        images: torch.Tensor,
        clean_memberships: torch.Tensor,
        state: Mapping[str, Any],
        progress: bool = False,
    ) -> None:
        """Called instead of ``prepare`` when a run resumes, with the ``state_dict()`` saved
        at the end of its last epoch; a source that keeps no state prepares afresh."""
        self.prepare(images, clean_memberships, progress)

    @abc.abstractmethod
    def memberships(self, x_adv: torch.Tensor) -> torch.Tensor:
        """Differentiable memberships N x K of the perturbed images."""

    def after_step(self) -> None:
        """Hook after each generator step (the online surrogate fine-tunes here)."""
        return None

    def end_of_epoch(
        self,
        epoch: int,
        perturb: Callable[[torch.Tensor], torch.Tensor],
        images: torch.Tensor,
    ) -> dict[str, float]:
        """Hook after each generator epoch (the surrogate refreshes here); returns metrics."""
        return {}

    def close(self) -> None:
        """Undo any change made to a local victim (white-box only)."""
        return None

    def describe(self) -> dict[str, Any]:
        """What to record about this source beside the results."""
        return {"gradient_source": self.name, "black_box": self.black_box}
