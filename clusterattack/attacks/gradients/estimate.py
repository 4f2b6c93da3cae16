"""Estimated gradient source: the victim's Jacobian seen only through score queries (NES or SPSA).

The forward pass asks the victim for the memberships of each perturbed image and of
``2 q`` points around it (antithetic pairs x +- sigma u); the backward pass turns the
incoming gradient g = dL/dM of any attack term into the estimate

    dL/dx ~ 1 / (2 sigma q) * sum_j [g . (M(x + sigma u_j) - M(x - sigma u_j))] u_j,

i.e. NES (Ilyas et al., ICML 2018) on the scalar g . M(x), reusing the same queries for
every loss. Directions are drawn on a coarse grid and upsampled: a 7 x 7 grid for 28 x 28
images leaves 16 times fewer unknowns per query.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F

from clusterattack.attacks.config import EstimatorConfig
from clusterattack.attacks.gradients.base import GradientSource, query_memberships
from clusterattack.victims.base import Victim

__all__ = ["EstimateSource", "estimated_memberships", "sample_directions"]


def sample_directions(
    n: int,
    samples: int,
    shape: tuple[int, int, int],
    method: str,
    resolution: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Directions u of shape n x samples x C x H x W, unit variance per coordinate.

    NES draws Gaussian coordinates, SPSA Rademacher ones (+-1); both on a grid of
    ``resolution`` times H and W, upsampled to full size (nearest neighbour, so SPSA
    directions stay +-1).
    """
    c, h, w = shape
    gh, gw = max(1, math.ceil(h * resolution)), max(1, math.ceil(w * resolution))
    if method == "nes":
        u = torch.randn(n * samples, c, gh, gw, generator=generator)
    elif method == "spsa":
        u = torch.randint(0, 2, (n * samples, c, gh, gw), generator=generator).float() * 2 - 1
    else:
        raise ValueError(f"estimator method must be 'nes' or 'spsa', got {method!r}")
    if (gh, gw) != (h, w):
        u = F.interpolate(u, size=(h, w), mode="nearest")
    return u.view(n, samples, c, h, w)


def _finite_differences(
    victim: Victim,
    base: torch.Tensor,
    directions: torch.Tensor,
    sigma: float,
    query_batch: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query x +- sigma u for n x m directions; returns (M+ - M-, realised step, points, answers).

    The clamp to [0, 1] shortens some steps; the realised step length along u (projection
    of the actual displacement on u) replaces 2 sigma, keeping each finite difference on
    the scale of the move that was really made at the box edges.
    """
    n, m = directions.shape[:2]
    step = sigma * directions
    plus = (base.unsqueeze(1) + step).clamp(0.0, 1.0)
    minus = (base.unsqueeze(1) - step).clamp(0.0, 1.0)
    points = torch.cat([plus.flatten(0, 1), minus.flatten(0, 1)])
    answers = query_memberships(victim, points, query_batch)
    diff = answers[: n * m].view(n, m, -1) - answers[n * m :].view(n, m, -1)
    realised = ((plus - minus) * directions).flatten(2).sum(2) / directions.flatten(2).pow(2).sum(2).clamp_min(1e-12)
    return diff, realised.clamp_min(1e-3 * sigma), points, answers


class _EstimatedMemberships(torch.autograd.Function):
    """M(x) in the forward pass; a query estimate of the vector-Jacobian product in the backward.

    The backward pass knows g = dL/dM, so it can (with a transfer prior) aim queries at
    the direction a surrogate predicts for the scalar g . M(x) before measuring it.
    """

    @staticmethod
    def forward(ctx, x, source):  # type: ignore[override]
        base = x.detach().cpu()
        clean = query_memberships(source.victim, base, source.query_batch)
        ctx.source = source
        ctx.save_for_backward(base)
        return clean.to(x.device)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (base,) = ctx.saved_tensors
        source: EstimateSource = ctx.source
        cfg = source.config
        g = grad_output.detach().cpu()
        n = base.shape[0]
        shape = tuple(base.shape[1:])
        grad = torch.zeros_like(base)
        prior = None
        if source.prior is not None:
            dim = base[0].numel()
            prior = source.prior.input_gradient(base, g).cpu()
            prior = prior / prior.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            # Step along sqrt(D) v: the same per-pixel size as the random directions.
            scaled = prior * dim**0.5
            diff, realised, points, answers = _finite_differences(
                source.victim, base, scaled.unsqueeze(1), cfg.sigma, source.query_batch
            )
            slope = (diff * g.unsqueeze(1)).sum(2) / realised  # n x 1: grad . scaled
            grad += (slope.view(n, 1, 1, 1) / dim**0.5) * prior  # (grad . v) v
            # The answers are fresh victim data near x_adv: the prior learns from them.
            source.prior.fit_step(points, answers)
        if cfg.samples:
            u = sample_directions(n, cfg.samples, shape, cfg.method, cfg.resolution, source.generator)
            if prior is not None:
                # Explore what the prior misses, measured as a projection onto a few extra
                # unit directions (RGF without the D/q rescaling): biased towards the prior's
                # subspace, but without the D/q-fold noise that would swamp its signal.
                along = (u * prior.unsqueeze(1)).flatten(2).sum(2)
                u = u - along.view(n, cfg.samples, 1, 1, 1) * prior.unsqueeze(1)
                u = u * (dim**0.5 / u.flatten(2).norm(dim=2).clamp_min(1e-12)).view(n, cfg.samples, 1, 1, 1)
            diff, realised, _, _ = _finite_differences(source.victim, base, u, cfg.sigma, source.query_batch)
            slope = (diff * g.unsqueeze(1)).sum(2) / realised  # n x q directional derivatives
            if prior is not None:
                grad += (slope.view(n, cfg.samples, 1, 1, 1) * u).sum(1) / dim
            else:
                grad += (slope.view(n, cfg.samples, 1, 1, 1) * u).mean(1)
        return grad.to(grad_output.device), None


def estimated_memberships(x: torch.Tensor, source: EstimateSource) -> torch.Tensor:
    """Victim memberships of ``x`` whose backward pass is ``source``'s query estimate."""
    return _EstimatedMemberships.apply(x, source)


class EstimateSource(GradientSource):
    """Gradient source ``estimate``: finite differences of victim memberships around each x_adv.

    Each generator step costs per image 1 query (M(x_adv)), 2 per antithetic pair, and 2
    more along the prior direction when ``config.prior`` is "surrogate" (P-RGF style,
    Cheng et al., NeurIPS 2019: a surrogate distilled from queries proposes the direction,
    the victim's answers measure the slope along it, so a wrong prior costs accuracy but
    never flips the sign).
    """

    name = "estimate"
    black_box = True
    exact_memberships = True

    def __init__(
        self,
        victim: Victim,
        config: EstimatorConfig,
        seed: int,
        query_batch: int,
        prior: GradientSource | None = None,
    ) -> None:
        if config.prior == "surrogate" and prior is None:
            raise ValueError("estimator.prior 'surrogate' needs a surrogate source to take the prior from")
        self.victim = victim
        self.config = config
        self.query_batch = query_batch
        self.prior = prior if config.prior == "surrogate" else None
        self.generator = torch.Generator().manual_seed(seed + 7919)

    def prepare(self, images: torch.Tensor, clean_memberships: torch.Tensor, progress: bool = False) -> None:
        if self.prior is not None:
            self.prior.prepare(images, clean_memberships, progress)

    def state_dict(self) -> dict[str, Any]:
        """The direction RNG and the prior surrogate's state."""
        return {
            "name": self.name,
            "rng": self.generator.get_state(),
            "prior": {} if self.prior is None else self.prior.state_dict(),
        }

    def resume(
        self,
        images: torch.Tensor,
        clean_memberships: torch.Tensor,
        state: Mapping[str, Any],
        progress: bool = False,
    ) -> None:
        if state and state.get("name") != self.name:
            raise ValueError(f"the saved state is of gradient source {state.get('name')!r}, not {self.name!r}")
        if state:
            self.generator.set_state(state["rng"])
        if self.prior is not None:
            self.prior.resume(images, clean_memberships, state.get("prior") or {}, progress)

    def memberships(self, x_adv: torch.Tensor) -> torch.Tensor:
        return estimated_memberships(x_adv, self)

    def describe(self) -> dict:
        out = super().describe()
        out.update({f"estimator.{k}": v for k, v in vars(self.config).items()})
        if self.prior is not None:
            out.update({k: v for k, v in self.prior.describe().items() if k.startswith("surrogate.")})
        return out
