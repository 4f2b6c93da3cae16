"""White-box gradient source: autograd through a local victim, as the authors' released code did.

A reference point only: a victim behind an API returns numbers, not gradients, so results
of this source must never be reported as black-box.
"""

from __future__ import annotations

import torch
from torch import nn

from clusterattack.attacks.gradients.base import GradientSource
from clusterattack.victims.base import Victim

__all__ = ["WhiteBoxSource"]


class WhiteBoxSource(GradientSource):
    """Memberships straight from ``victim.predict_proba`` with the autograd graph kept."""

    name = "whitebox"
    black_box = False
    exact_memberships = True

    def __init__(self, victim: Victim) -> None:
        self.victim = victim
        self._frozen: list[tuple[nn.Parameter, bool]] = []
        if isinstance(victim, nn.Module):
            # The victim's weights are constants of the attack: no gradient is accumulated
            # in them (memory and time), and the flags are restored by ``close``.
            victim.eval()
            for p in victim.parameters():
                self._frozen.append((p, p.requires_grad))
                p.requires_grad_(False)

    def memberships(self, x_adv: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            probs = self.victim.predict_proba(x_adv)
        if not isinstance(probs, torch.Tensor) or not probs.requires_grad:
            raise TypeError(
                "gradient source 'whitebox' needs a local victim whose predict_proba is "
                f"differentiable; {type(self.victim).__name__} returned no autograd graph. "
                "Use 'estimate' or 'surrogate' for a served or opaque victim."
            )
        return probs

    def close(self) -> None:
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self._frozen = []
