"""Fixtures of the analysis tests: tiny seeded linear victims on 8 x 8 blobs and a tiny attack config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clusterattack.attacks import AttackConfig
from tests.attacks.conftest import make_blobs, one_torch_thread  # noqa: F401  (autouse fixture)


class TinyVictim(nn.Module):
    """Linear softmax clustering by prototype, with ``features`` (the centred pixels) for detectors."""

    def __init__(self, prototypes: torch.Tensor, scale: float = 3.0, seed: int = 0) -> None:
        super().__init__()
        self.num_clusters = int(prototypes.shape[0])
        self.input_shape = tuple(int(v) for v in prototypes.shape[1:])
        w = (prototypes - prototypes.mean(0, keepdim=True)).flatten(1)
        g = torch.Generator().manual_seed(seed)
        self.linear = nn.Linear(w.shape[1], self.num_clusters)
        with torch.no_grad():
            self.linear.weight.copy_(scale * w + 0.05 * seed * torch.randn(w.shape, generator=g))
            self.linear.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x), dim=1)


@pytest.fixture
def blobs():
    """(train images, test images, test labels, prototypes): 8 x 8 images, 3 clusters."""
    images, labels, prototypes = make_blobs(480)
    return images[:320], images[320:], labels[320:], prototypes


@pytest.fixture
def victims(blobs) -> dict[str, TinyVictim]:
    return {"a": TinyVictim(blobs[3], seed=0).eval(), "b": TinyVictim(blobs[3], scale=2.0, seed=1).eval()}


def tiny_attack(**changes) -> AttackConfig:
    """A white-box config that trains in well under a second on 8 x 8 images."""
    base = AttackConfig(
        epochs=2,
        batch_size=64,
        eps=0.2,
        gradient_source="whitebox",
        generator_width=4,
        generator_blocks=1,
        discriminator_width=4,
        train_limit=320,
    )
    return base.override(**changes)
