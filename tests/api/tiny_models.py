"""A tiny seeded prototype model and clustered 8x8 images, for the album service tests only."""

from __future__ import annotations

import torch
from torch import nn

SHAPE = (1, 8, 8)
K = 3


def prototypes(k: int = K, seed: int = 0) -> torch.Tensor:
    """k well separated 1 x 8 x 8 prototype images in [0.15, 0.85]."""
    g = torch.Generator().manual_seed(seed)
    return (0.5 + 0.35 * torch.sign(torch.randn(k, *SHAPE, generator=g))).clamp(0, 1)


def make_blobs(n: int, k: int = K, noise: float = 0.08, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images N x 1 x 8 x 8 in [0, 1], labels N): noisy copies of the prototypes, classes cycling."""
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.arange(n) % k
    images = (prototypes(k)[labels] + noise * torch.randn(n, *SHAPE, generator=g)).clamp(0, 1)
    return images, labels


class PrototypeModel(nn.Module):
    """Linear softmax over centred prototypes (``predict_proba``) and raw pixels as ``features``.

    It clusters ``make_blobs`` images by prototype, so both grouping methods have
    something to find; it is not a CC model, as the service's model must not be.
    """

    def __init__(self, k: int = K, scale: float = 3.0) -> None:
        super().__init__()
        self.num_clusters = k
        self.input_shape = SHAPE
        p = prototypes(k)
        w = (p - p.mean(0, keepdim=True)).flatten(1)
        self.linear = nn.Linear(w.shape[1], k)
        with torch.no_grad():
            self.linear.weight.copy_(scale * w)
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - 0.5).flatten(1))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x), dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5).flatten(1)
