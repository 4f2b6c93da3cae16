"""Discriminator of the generator attack: clean vs perturbed images, sized from the input shape."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Discriminator"]


class Discriminator(nn.Module):
    """D(x) -> one logit per image: 3 strided convs (AdvGAN layout) and a linear read-out.

    The authors' code ends in a sigmoid; here the logit is returned and the GAN loss
    (least squares or log) applies the sigmoid, which keeps the log loss numerically safe.
    Layer norm (GroupNorm with one group) rather than instance norm so that small images,
    whose last feature map is 1 x 1, still normalise.
    """

    def __init__(self, input_shape: tuple[int, int, int], width: int = 16) -> None:
        super().__init__()
        c, h, w = (int(v) for v in input_shape)
        if c < 1 or h < 8 or w < 8:
            raise ValueError(f"input_shape must be C x H x W with H, W >= 8, got {tuple(input_shape)}")
        self.input_shape = (c, h, w)
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.GroupNorm(1, 2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.GroupNorm(1, 4 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)
