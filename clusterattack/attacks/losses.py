"""Losses of the generator attack: attack term, norm constraint, and the GAN terms."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from clusterattack.attacks.generator import perturbation_norms

__all__ = [
    "attack_objective",
    "config_objective",
    "constraint_penalty",
    "discriminator_loss",
    "flip_margin",
    "generator_gan_loss",
    "membership_distance",
    "soft_mutual_information",
]

_TINY = 1e-8


def membership_distance(clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """L_attack of the paper: mean over images of ||M_i - C(x_i + G(x_i))||_2^2.

    Squared, as the authors' code summed squared differences of the victim's outputs.
    """
    return (clean - perturbed).pow(2).sum(dim=1).mean()


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Rows of p raised to 1/temperature and renormalised (temperature 1: unchanged)."""
    if temperature == 1.0:
        return p
    return F.softmax(torch.log(p.clamp_min(_TINY)) / temperature, dim=1)


def soft_mutual_information(clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """Mutual information (nats) between clean and perturbed soft assignments over a batch.

    The joint is J = clean^T perturbed / N (K x K). When it is 0 the perturbed clustering
    tells nothing about the clean one, which is what NMI measures after the attack; the
    paper's distance term instead rewards moving a whole cluster to another one, which
    keeps NMI high.
    """
    joint = clean.transpose(0, 1) @ perturbed / clean.shape[0]
    joint = joint.clamp_min(_TINY)
    joint = joint / joint.sum()
    outer = joint.sum(dim=1, keepdim=True) @ joint.sum(dim=0, keepdim=True)
    return (joint * (joint.log() - outer.log())).sum()


def flip_margin(
    clean: torch.Tensor, perturbed: torch.Tensor, kappa: float, target_cluster: int | None = None
) -> torch.Tensor:
    """Mean over images of a log-membership margin that reaches its floor once the image moves.

    Untargeted: log M'_y - max_{j != y} log M'_j with y the clean argmax, floored at
    -kappa. It is positive while the image stays in its clean cluster and stops counting
    once the image sits in another with a lead of kappa (nats), so flattening memberships
    without moving an argmax earns little, and images already moved stop taking the
    generator's capacity. Targeted: max_{j != t} log M'_j - log M'_t, floored alike.
    """
    logp = torch.log(perturbed.clamp_min(_TINY))
    k = perturbed.shape[1]
    y = clean.argmax(dim=1) if target_cluster is None else torch.full_like(clean[:, 0], target_cluster, dtype=torch.long)
    own = F.one_hot(y, k).bool()
    at_y = logp.gather(1, y[:, None]).squeeze(1)
    best_other = logp.masked_fill(own, float("-inf")).max(dim=1).values
    margin = at_y - best_other if target_cluster is None else best_other - at_y
    return margin.clamp_min(-kappa).mean()


def attack_objective(
    clean: torch.Tensor,
    perturbed: torch.Tensor,
    attack_loss: str,
    target_cluster: int | None = None,
    mi_temperature: float = 1.0,
    margin_kappa: float = 1.0,
) -> torch.Tensor:
    """The attack term the generator minimises (already signed; weighted by alpha_a).

    - untargeted "paper": minus the membership distance (the paper maximises L_attack);
    - untargeted "mutual_info": the soft mutual information of clean and perturbed
      assignments, perturbed rows sharpened by ``mi_temperature`` so that flattening the
      memberships without changing any argmax does not count as success;
    - targeted (footnote 9), "paper": the distance between the perturbed memberships and
      the one-hot vector of ``target_cluster``, pulled to 0;
    - targeted, "mutual_info": the cross-entropy -log M_t (the information-theoretic
      counterpart, which unlike the squared distance does not saturate when M_t is small);
    - "margin", either way: ``flip_margin`` with floor ``margin_kappa``, a term that counts
      cluster changes and nothing else.
    """
    if clean.shape != perturbed.shape or clean.ndim != 2:
        raise ValueError(
            f"clean and perturbed memberships must both be N x K, got {tuple(clean.shape)} "
            f"and {tuple(perturbed.shape)}"
        )
    k = perturbed.shape[1]
    if target_cluster is not None and not 0 <= target_cluster < k:
        raise ValueError(f"target_cluster must lie in 0..{k - 1}, got {target_cluster}")
    if attack_loss == "margin":
        return flip_margin(clean, perturbed, margin_kappa, target_cluster)
    if target_cluster is not None:
        if attack_loss == "mutual_info":
            return -torch.log(perturbed[:, target_cluster].clamp_min(_TINY)).mean()
        onehot = torch.zeros_like(perturbed)
        onehot[:, target_cluster] = 1.0
        return membership_distance(onehot, perturbed)
    if attack_loss == "paper":
        return -membership_distance(clean, perturbed)
    if attack_loss == "mutual_info":
        return soft_mutual_information(clean, sharpen(perturbed, mi_temperature))
    raise ValueError(f"attack_loss must be 'paper', 'mutual_info' or 'margin', got {attack_loss!r}")


def config_objective(clean: torch.Tensor, perturbed: torch.Tensor, config: Any) -> torch.Tensor:
    """``attack_objective`` with the attack-term settings of an ``AttackConfig``."""
    return attack_objective(
        clean, perturbed, config.attack_loss, config.target_cluster, config.mi_temperature, config.margin_kappa
    )


def constraint_penalty(g: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """-L_constraint = mean max(||G(x)|| - eps, 0): the paper's hinge on the generator output.

    ``g`` is G(x) before the projection onto the ball (see ``Generator.perturb``). The
    projection makes the bound hold anyway; the hinge keeps G(x) inside the ball so that
    the projection rarely acts, and with ``hard_clamp`` it pulls saturated (zero-gradient)
    pixels back into the live range, as the authors' norm term did.
    """
    l2, linf = perturbation_norms(g)
    size = l2 if norm == "l2" else linf
    return F.relu(size - eps).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """max_D of L_GAN written as a loss: clean images labelled 1, perturbed ones 0."""
    if kind == "lsgan":
        # The authors' code: MSE on sigmoid outputs (least-squares GAN).
        return F.mse_loss(torch.sigmoid(real_logits), torch.ones_like(real_logits)) + F.mse_loss(
            torch.sigmoid(fake_logits), torch.zeros_like(fake_logits)
        )
    if kind == "log":
        return F.binary_cross_entropy_with_logits(
            real_logits, torch.ones_like(real_logits)
        ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    raise ValueError(f"gan_loss must be 'lsgan' or 'log', got {kind!r}")


def generator_gan_loss(fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's side of L_GAN: make perturbed images look clean to D."""
    if kind == "lsgan":
        return F.mse_loss(torch.sigmoid(fake_logits), torch.ones_like(fake_logits))
    if kind == "log":
        # Non-saturating form, the usual practice for the log loss.
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    raise ValueError(f"gan_loss must be 'lsgan' or 'log', got {kind!r}")
