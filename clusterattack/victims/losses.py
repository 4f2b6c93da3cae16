"""Contrastive and clustering losses shared by the victims (SimCLR, CC, SCAN, FixMatch-style).

All functions take batches of logits, probabilities or embeddings and return scalar
tensors (or a named tuple of scalars when a method reports its parts separately).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

_EPS = 1e-8


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy (nats) of probability vectors along ``dim``."""
    return -(p * torch.log(p.clamp_min(_EPS))).sum(dim=dim)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy over 2N views (positives are the pairs).

    ``z1[i]`` and ``z2[i]`` are two views of image i (N x D, normalised here); every other
    view in the batch is a negative. Used by the pretext and by CC's instance head.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"nt_xent needs two N x D batches of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def cluster_contrastive(p1: torch.Tensor, p2: torch.Tensor, temperature: float) -> torch.Tensor:
    """CC's cluster-level loss (Li et al. 2021): columns of the soft assignments contrast.

    ``p1``/``p2`` are N x K memberships of two views. Cluster k of one view is the positive
    of cluster k of the other; the entropy of the mean assignment of each view is added
    as log K - H so that the loss stays >= 0 and penalises collapse into few clusters.
    """
    k = p1.shape[1]
    contrast = nt_xent(p1.t(), p2.t(), temperature)
    balance = 2 * math.log(k) - entropy(p1.mean(0)) - entropy(p2.mean(0))
    return contrast + balance


class ScanLoss(NamedTuple):
    total: torch.Tensor
    consistency: torch.Tensor
    entropy: torch.Tensor


def scan_loss(
    anchor_logits: torch.Tensor, neighbor_logits: torch.Tensor, entropy_weight: float
) -> ScanLoss:
    """SCAN's clustering loss (Van Gansbeke et al. 2020): neighbours agree, clusters stay used.

    consistency = -mean log <p(anchor), p(neighbour)>; the entropy of the batch's mean
    assignment is subtracted with ``entropy_weight`` (the paper's lambda, 5 by default) to
    prevent every image falling into one cluster.

    Logits of shape B x H x K (H cluster heads side by side) give one loss per head
    (tensors of shape H), as SCAN's several heads trained at once.
    """
    pa = torch.softmax(anchor_logits, dim=-1)
    pn = torch.softmax(neighbor_logits, dim=-1)
    consistency = -torch.log((pa * pn).sum(-1).clamp_min(_EPS)).mean(0)
    spread = entropy(pa.mean(0))
    return ScanLoss(consistency - entropy_weight * spread, consistency, spread)


def confident_cross_entropy(
    weak_logits: torch.Tensor,
    strong_logits: torch.Tensor,
    threshold: float,
    balance: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-labelling / FixMatch: confident weak-view predictions supervise the strong view.

    Images whose weak-view max probability exceeds ``threshold`` get that cluster as a hard
    label; with ``balance`` each cluster's term is weighted by the inverse of its frequency
    among the confident images (SCAN's fix for large clusters swallowing small ones).
    Returns (loss, fraction of images that were confident).
    """
    with torch.no_grad():
        prob = torch.softmax(weak_logits, dim=1)
        conf, target = prob.max(dim=1)
        mask = conf > threshold
    if not bool(mask.any()):
        return strong_logits.sum() * 0.0, mask.float().mean()
    weight = None
    if balance:
        counts = torch.bincount(target[mask], minlength=strong_logits.shape[1]).float()
        weight = torch.where(
            counts > 0, counts.sum() / counts.clamp_min(1), torch.zeros_like(counts)
        )
        weight = weight / weight[counts > 0].mean()
    loss = F.cross_entropy(strong_logits[mask], target[mask], weight=weight)
    return loss, mask.float().mean()


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy against soft targets (label smoothing, MixMatch's mixed labels)."""
    return -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()
