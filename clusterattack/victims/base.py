"""The Victim contract: what every attack sees of a clustering model.

A victim is anything with ``num_clusters``, ``input_shape`` and ``predict_proba``: local
torch models, Serve-backed clients (``clusterattack.serving.ServedVictim``) and
label-only APIs (which expose ``predict`` only) all satisfy it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Victim(Protocol):
    """Score-based black box: float images in [0, 1], N x C x H x W -> memberships N x K."""

    num_clusters: int
    input_shape: tuple[int, int, int]

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Soft cluster memberships, rows summing to 1."""
        ...


@runtime_checkable
class DecisionVictim(Protocol):
    """Decision-only black box: returns cluster ids and nothing more."""

    num_clusters: int
    input_shape: tuple[int, int, int]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster id per image, int64 of shape N."""
        ...


def check_images(x: torch.Tensor, input_shape: tuple[int, int, int]) -> None:
    """Raise ValueError naming what is wrong unless x is a float N x C x H x W batch in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise ValueError(f"images must be floating point in [0, 1], got dtype {x.dtype}")
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"images must have shape N x {' x '.join(map(str, input_shape))}, got {tuple(x.shape)}"
        )
    if x.numel() and (torch.isnan(x).any() or x.min() < 0 or x.max() > 1):
        raise ValueError("images must be finite and lie in [0, 1]")
