"""SPSA baseline (Uesato et al., ICML 2018): the project's SPSA estimator inside a projected-gradient loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from clusterattack.attacks.baselines.base import (
    BaselineAttack,
    BaselineConfig,
    MemoPredict,
    check_fraction,
    check_int,
    check_positive,
    pgd_step_fraction,
    project_images,
)
from clusterattack.attacks.config import EstimatorConfig
from clusterattack.attacks.gradients.estimate import EstimateSource, estimated_memberships
from clusterattack.victims.base import Victim

__all__ = ["SPSAAttack", "SPSAConfig"]


@dataclass(frozen=True)
class SPSAConfig(BaselineConfig):
    """SPSA (Uesato et al., "Adversarial risk and the dangers of evaluating against weak attacks", 2018).

    Each iteration queries M(x_adv) (1 image-query) and ``samples`` antithetic Rademacher
    pairs x_adv +- sigma u (``2 * samples``) through ``gradients.estimate`` (method
    "spsa", directions on a grid of ``resolution`` times H and W, as the generator's
    ``estimate`` source draws them), turns them into an estimate of the gradient of the
    cross-entropy -log M_y of the clean cluster y, and takes a signed (L-inf) or
    normalised (L2) ascent step of ``step_fraction * eps``, projected back onto the ball
    and [0, 1]. Per image: 1 clean query + ``(1 + 2 * samples)`` per iteration.
    Defaults: q = 10 pairs (the cost of NES's iteration), sigma 0.01 (Uesato's delta).
    """

    samples: int = 10
    sigma: float = 0.01
    resolution: float = 0.25
    step_fraction: float | None = None  # PGD step / eps; None: min(1, 2.5 / iterations)

    def __post_init__(self) -> None:
        check_int("samples", self.samples, 1)
        check_positive("sigma", self.sigma)
        check_fraction("resolution", self.resolution)
        if self.step_fraction is not None:
            check_fraction("step_fraction", self.step_fraction)
        super().__post_init__()

    def min_queries(self) -> int:
        return 1 + (1 + 2 * self.samples)

    def iterations(self) -> int:
        return (self.max_queries - 1) // (1 + 2 * self.samples)


def _ascent_step(grad: torch.Tensor, norm: str, size: float) -> torch.Tensor:
    if norm == "linf":
        return size * grad.sign()
    flat = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return size * grad / flat.view(-1, *([1] * (grad.ndim - 1)))


class SPSAAttack(BaselineAttack):
    """Untargeted SPSA-PGD away from each image's clean cluster, L-inf or L2.

    Shapes: images N x C x H x W in [0, 1], attacked in chunks of ``query_batch``; the
    victim is reached only by ``query_memberships`` (its ``predict_proba``).
    """

    name = "spsa"
    config_class = SPSAConfig

    def _attack(
        self, victim: Victim, predict: MemoPredict, images: np.ndarray, clean: np.ndarray, progress: bool
    ) -> tuple[np.ndarray, dict[str, Any]]:
        cfg: SPSAConfig = self.config  # type: ignore[assignment]
        iterations = cfg.iterations()
        fraction = pgd_step_fraction(cfg.step_fraction, iterations)
        estimator = EstimatorConfig(method="spsa", samples=cfg.samples, sigma=cfg.sigma, resolution=cfg.resolution)
        source = EstimateSource(victim, estimator, seed=cfg.seed, query_batch=cfg.query_batch)
        x_all = torch.from_numpy(images)
        labels = torch.from_numpy(clean.argmax(1))
        out = x_all.clone()
        chunks = range(0, x_all.shape[0], cfg.query_batch)
        bar = tqdm(total=len(chunks) * iterations, desc="SPSA", disable=not progress, leave=False)
        for start in chunks:
            x = x_all[start : start + cfg.query_batch]
            y = labels[start : start + cfg.query_batch]
            adv = x.clone()
            for _ in range(iterations):
                adv.requires_grad_(True)
                memberships = estimated_memberships(adv, source)
                loss = -memberships.gather(1, y.view(-1, 1)).clamp_min(1e-12).log().sum()
                (grad,) = torch.autograd.grad(loss, adv)
                with torch.no_grad():
                    adv = project_images(x, adv + _ascent_step(grad, cfg.norm, fraction * cfg.eps), cfg.norm, cfg.eps)
                bar.update(1)
            out[start : start + cfg.query_batch] = adv.detach()
        bar.close()
        return out.numpy(), {"step_fraction": fraction, "queries_per_iteration": 1 + 2 * cfg.samples}
