"""A tiny seeded victim satisfying the Victim contract, for serving tests and nothing else."""

from __future__ import annotations

import time

import torch
from torch import nn


class TinyVictim(nn.Module):
    """Linear map of 1 x 8 x 8 images to 3 clusters, softmax memberships.

    ``delay_s`` sleeps in every forward so concurrent runs last long enough to kill a
    replica in the middle of one.
    """

    def __init__(self, seed: int = 0, num_clusters: int = 3, delay_s: float = 0.0) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.input_shape = (1, 8, 8)
        self.delay_s = delay_s
        generator = torch.Generator().manual_seed(seed)
        self.linear = nn.Linear(64, num_clusters)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(num_clusters, 64, generator=generator))
            self.linear.bias.zero_()

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay_s:
            time.sleep(self.delay_s)
        return torch.softmax(self.linear(x.flatten(1)), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict_proba(x)
