"""AdvGAN-style perturbation generator, sized from the input shape, with a norm-ball projection."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Generator", "project_perturbation", "perturbation_norms"]


def perturbation_norms(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image L2 and L-inf norms of an N x C x H x W perturbation."""
    flat = delta.flatten(1)
    return flat.norm(p=2, dim=1), flat.abs().amax(dim=1)


def _bound_below(eps: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` not above ``eps``: float32 rounding of eps can exceed it."""
    t = torch.tensor(eps, dtype=dtype)
    if float(t) > eps:
        t = torch.nextafter(t, torch.tensor(0.0, dtype=dtype))
    return float(t)


def project_perturbation(raw: torch.Tensor, norm: str, eps: float, hard_clamp: bool) -> torch.Tensor:
    """Map the generator's raw output onto the ``norm`` ball of radius ``eps``.

    L-inf: ``eps * raw`` (raw is a tanh output in [-1, 1]) or, with ``hard_clamp``, raw
    clamped at +-eps as the authors' code did. L2: raw scaled down onto the ball when it
    lies outside it (``hard_clamp`` makes no difference). Either way every returned
    perturbation satisfies the bound.
    """
    if norm == "linf":
        bound = _bound_below(eps, raw.dtype)
        delta = raw.clamp(-bound, bound) if hard_clamp else bound * raw
        # Guard against rounding pushing bound * tanh a hair past eps.
        return delta.clamp(-bound, bound)
    if norm == "l2":
        n = raw.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
        # A tiny margin keeps float32 rounding from landing just outside the ball.
        scale = torch.clamp((eps * (1 - 1e-5)) / n, max=1.0)
        return raw * scale.view(-1, *([1] * (raw.ndim - 1)))
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=False),
            nn.InstanceNorm2d(channels, affine=True),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=False),
            nn.InstanceNorm2d(channels, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """G(x) -> perturbation: 3-conv encoder, residual blocks, 3-layer decoder with tanh.

    The layout of AdvGAN (Xiao et al. 2018) as used by the authors' released code.
    ``input_shape`` is C x H x W of the images; any H, W >= 8 works (the decoder output is
    resized to H x W when strides do not divide them). ``forward`` returns the raw tanh
    output in [-1, 1]; ``perturb`` applies the norm-ball projection and the [0, 1] clamp.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        width: int = 16,
        blocks: int = 4,
    ) -> None:
        super().__init__()
        c, h, w = (int(v) for v in input_shape)
        if c < 1 or h < 8 or w < 8:
            raise ValueError(f"input_shape must be C x H x W with H, W >= 8, got {tuple(input_shape)}")
        self.input_shape = (c, h, w)

        def down(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.InstanceNorm2d(cout, affine=True),
                nn.ReLU(inplace=True),
            ]

        def up(cin: int, cout: int) -> list[nn.Module]:
            # Upsample + conv instead of transposed convs: no checkerboard, any H and W.
            return [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.InstanceNorm2d(cout, affine=True),
                nn.ReLU(inplace=True),
            ]

        self.encoder = nn.Sequential(
            *down(c, width, 1), *down(width, 2 * width, 2), *down(2 * width, 4 * width, 2)
        )
        self.blocks = nn.Sequential(*[_ResidualBlock(4 * width) for _ in range(blocks)])
        self.decoder = nn.Sequential(
            *up(4 * width, 2 * width), *up(2 * width, width), nn.Conv2d(width, c, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.blocks(self.encoder(x)))
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.tanh(out)

    def perturb(
        self, x: torch.Tensor, norm: str, eps: float, hard_clamp: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_adv, delta, g): x_adv = clamp(x + delta, 0, 1) with delta in the eps-ball.

        ``g`` is G(x) in perturbation units before the projection (what the paper's
        constraint term measures): eps * tanh(...) for smooth L-inf, the tanh output
        itself for hard-clamped L-inf and for L2. The clamp to [0, 1] can only shrink each
        coordinate of delta, so the bound still holds for the effective x_adv - x.
        """
        raw = self(x)
        g = eps * raw if norm == "linf" and not hard_clamp else raw
        delta = project_perturbation(g, norm, eps, hard_clamp=True)
        return (x + delta).clamp(0.0, 1.0), delta, g
