"""Losses of the generator attack: attack term, norm constraint, and the GAN terms."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

from clusterattack.attacks.generator import perturbation_norms

__all__ = [
    "ATTACK_TERMS",
    "attack_objective",
    "config_objective",
    "constraint_penalty",
    "discriminator_loss",
    "generator_gan_loss",
    "mutual_info_term",
    "paper_term",
    "membership_distance",
    "resolve_mi_temperature",
    "soft_mutual_information",
    "term_config",
    "SOFT_MEMBERSHIPS",
    "SOFT_MI_TEMPERATURE",
]

log = logging.getLogger(__name__)

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


def paper_term(
    clean: torch.Tensor, perturbed: torch.Tensor, target_cluster: int | None, mi_temperature: float
) -> torch.Tensor:
    """The paper's term: minus the membership distance (the paper maximises L_attack); targeted
    (footnote 9), the distance to the one-hot vector of ``target_cluster``, pulled to 0."""
    if target_cluster is not None:
        onehot = torch.zeros_like(perturbed)
        onehot[:, target_cluster] = 1.0
        return membership_distance(onehot, perturbed)
    return -membership_distance(clean, perturbed)


def mutual_info_term(
    clean: torch.Tensor, perturbed: torch.Tensor, target_cluster: int | None, mi_temperature: float
) -> torch.Tensor:
    """The soft mutual information of clean and perturbed assignments, perturbed rows sharpened
    by ``mi_temperature`` so that flattening memberships without changing any argmax does not
    count as success; targeted, the cross-entropy -log M_t (its information-theoretic
    counterpart, which unlike the squared distance does not saturate when M_t is small)."""
    if target_cluster is not None:
        return -torch.log(perturbed[:, target_cluster].clamp_min(_TINY)).mean()
    return soft_mutual_information(clean, sharpen(perturbed, mi_temperature))


#: An attack term: (clean N x K, perturbed N x K, target cluster or None, mi_temperature) ->
#: the scalar the generator minimises (already signed; weighted by alpha_a).
AttackTerm = Callable[[torch.Tensor, torch.Tensor, "int | None", float], torch.Tensor]
#: name -> attack term: what ``AttackConfig.attack_loss`` names (see docs/extending.md to add one).
ATTACK_TERMS: dict[str, AttackTerm] = {"paper": paper_term, "mutual_info": mutual_info_term}


#: Below this mean largest clean membership a victim counts as soft (MiCE at its own
#: temperatures: 0.45 on Fashion-MNIST; the other demo victims: above 0.85).
SOFT_MEMBERSHIPS = 0.6
#: The MI term's temperature for soft victims under ``mi_temperature="auto"``: against MiCE v6
#: (mean largest membership 0.45) the white-box attack dropped NMI by 64% at 1 and by 94% at
#: 0.3, the surrogate attack by 41% and 69%; against sharp SCAN v4 0.3 lowered the surrogate
#: attack from 55.4% to 49.0% (docs/experiments/ruc-and-the-attack-term.md).
SOFT_MI_TEMPERATURE = 0.3


def resolve_mi_temperature(setting: float | str, clean: torch.Tensor) -> float:
    """The MI term's temperature: ``setting`` itself, or for "auto" :data:`SOFT_MI_TEMPERATURE`
    where the clean memberships ``clean`` (N x K, already queried) are soft and 1 otherwise."""
    if setting != "auto":
        return float(setting)
    if clean.numel() == 0:
        return 1.0
    return SOFT_MI_TEMPERATURE if float(clean.max(dim=1).values.mean()) < SOFT_MEMBERSHIPS else 1.0


def term_config(config: Any, clean: torch.Tensor) -> tuple[Any, float | None]:
    """(``config`` with its MI temperature a number, the temperature the term reads or None
    for a term that reads none): "auto" resolved once from ``clean``, the memberships of the
    whole pool (queried anyway, so counted), and said in the log; a soft victim met at an
    explicit temperature of 1 or more is warned about."""
    temperature = resolve_mi_temperature(config.mi_temperature, clean)
    resolved = config.override(mi_temperature=temperature)
    if config.attack_loss != "mutual_info" or config.target_cluster is not None or len(clean) == 0:
        return resolved, None
    confidence = float(clean.max(dim=1).values.mean())
    if config.mi_temperature == "auto":
        log.info(
            "mi_temperature auto: %g (mean largest clean membership %.2f, soft below %.2f)",
            temperature, confidence, SOFT_MEMBERSHIPS,
        )
    elif confidence < SOFT_MEMBERSHIPS and temperature >= 1.0:
        log.warning(
            "the victim's memberships are soft (mean largest membership %.2f < %.2f): the "
            "mutual_info term at mi_temperature %g sees few cluster changes; consider "
            "--set mi_temperature=auto (%g for such a victim)",
            confidence, SOFT_MEMBERSHIPS, temperature, SOFT_MI_TEMPERATURE,
        )
    return resolved, temperature


def attack_objective(
    clean: torch.Tensor,
    perturbed: torch.Tensor,
    attack_loss: str,
    target_cluster: int | None = None,
    mi_temperature: float = 1.0,
) -> torch.Tensor:
    """The attack term ``attack_loss`` names in :data:`ATTACK_TERMS`, checked and evaluated."""
    if clean.shape != perturbed.shape or clean.ndim != 2:
        raise ValueError(
            f"clean and perturbed memberships must both be N x K, got {tuple(clean.shape)} "
            f"and {tuple(perturbed.shape)}"
        )
    k = perturbed.shape[1]
    if target_cluster is not None and not 0 <= target_cluster < k:
        raise ValueError(f"target_cluster must lie in 0..{k - 1}, got {target_cluster}")
    term = ATTACK_TERMS.get(attack_loss)
    if term is None:
        raise ValueError(f"attack_loss must be one of {sorted(ATTACK_TERMS)}, got {attack_loss!r}")
    return term(clean, perturbed, target_cluster, mi_temperature)


def config_objective(clean: torch.Tensor, perturbed: torch.Tensor, config: Any) -> torch.Tensor:
    """``attack_objective`` with the attack-term settings of an ``AttackConfig`` (an "auto"
    temperature resolved from ``clean``, the batch's; ``train_generator`` resolves it once from
    the whole pool and passes the number)."""
    temperature = resolve_mi_temperature(config.mi_temperature, clean)
    return attack_objective(clean, perturbed, config.attack_loss, config.target_cluster, temperature)


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
