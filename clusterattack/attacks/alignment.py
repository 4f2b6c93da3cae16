"""How well a surrogate's input gradient points where the victim's does: a white-box diagnostic.

The black-box gradient sources follow a surrogate's gradient (``surrogate``) or measure
the victim's slope along it (``estimate`` with the transfer prior), so the cosine between
that gradient and the victim's own is what bounds them. This module measures it with the
victim's weights, as a diagnostic of a gradient source and never as part of an attack:
at each point x the attack term L(M(x)) is evaluated over a batch as in training, g =
dL/dM is taken from the victim's memberships, and the victim's dL/dx (autograd through
the local victim) is compared with the surrogate's d(g . s(x))/dx, the very vector the
gradient sources use.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from clusterattack.attacks.config import AttackConfig
from clusterattack.attacks.losses import config_objective, resolve_mi_temperature

__all__ = ["gradient_alignment", "victim_input_gradient"]


def victim_input_gradient(
    victim: nn.Module, clean: torch.Tensor, x: torch.Tensor, config: AttackConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx through the victim, g = dL/dM) of the attack term over the batch ``x``."""
    if not isinstance(victim, nn.Module):
        raise TypeError(
            f"gradient alignment needs a local victim module (white-box reference), got {type(victim).__name__}"
        )
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        memberships = victim.predict_proba(x)
        if not memberships.requires_grad:
            raise TypeError(f"{type(victim).__name__}.predict_proba returned no autograd graph")
        leaf = memberships.detach().requires_grad_(True)
        loss = config_objective(clean, leaf, config)
        (g,) = torch.autograd.grad(loss, leaf)
        (grad,) = torch.autograd.grad((memberships * g).sum(), x)
    return grad.detach(), g.detach()


def gradient_alignment(
    victim: nn.Module,
    surrogate,
    clean: torch.Tensor,
    points: torch.Tensor,
    config: AttackConfig,
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-point cosine between the victim's and ``surrogate``'s input gradient of the attack term.

    ``surrogate`` is anything with ``input_gradient(x, weights)`` (a prepared
    ``SurrogateSource``); ``clean`` are the clean memberships of the images ``points``
    were made from (the attack term compares the two); batches of ``batch_size`` match
    the generator's batches, since the mutual-information term is a batch statistic.
    """
    if points.shape[0] != clean.shape[0]:
        raise ValueError(f"{points.shape[0]} points but {clean.shape[0]} clean memberships")
    if points.shape[0] == 0:
        raise ValueError("no points to measure the alignment at")
    # One temperature for every batch, as train_generator takes it from its whole pool.
    config = config.override(mi_temperature=resolve_mi_temperature(config.mi_temperature, clean))
    out = []
    for start in range(0, points.shape[0], batch_size):
        x, c = points[start : start + batch_size], clean[start : start + batch_size]
        true, g = victim_input_gradient(victim, c, x, config)
        other = surrogate.input_gradient(x, g).cpu()
        out.append(F.cosine_similarity(true.flatten(1), other.flatten(1), dim=1, eps=1e-12))
    return torch.cat(out)
