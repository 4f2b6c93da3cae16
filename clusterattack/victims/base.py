"""The Victim contract: what every attack sees of a clustering model.

A victim is anything with ``num_clusters``, ``input_shape`` and ``predict_proba``: local
torch models, Serve-backed clients (``clusterattack.serving.ServedVictim``) and
label-only APIs (which expose ``predict`` only) all satisfy it. ``ClusteringModel`` is the
base of the local torch victims of this package.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Victim(Protocol):
    """Score-based black box: float images in [0, 1], N x C x H x W -> memberships N x K.

    A victim may also offer ``predict_proba_batches(x, batch_size)``: the same answers,
    asked as calls of at most ``batch_size`` images that it may overlap (``ServedVictim``
    keeps several in flight); ``attacks.gradients.query_memberships`` uses it when present.
    """

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


class ClusteringModel(nn.Module):
    """Base of every local deep clustering victim: ``forward`` gives logits over K clusters.

    ``predict_proba`` is the softmax of ``forward`` and stays differentiable, so a white-box
    reference attack can backpropagate through it; ``features`` exposes the backbone
    embedding for defenses (anomaly detection, linear probes). Subclasses set ``name`` (the
    registry key) and keep the frozen dataclass they were built from in ``config``.
    """

    name: str = ""

    def __init__(self, config, num_clusters: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        if int(num_clusters) < 2:
            raise ValueError(f"num_clusters must be >= 2, got {num_clusters}")
        if len(tuple(input_shape)) != 3 or min(input_shape) < 1:
            raise ValueError(
                f"input_shape must be (C, H, W) with positive sizes, got {input_shape}"
            )
        self.config = config
        self.num_clusters = int(num_clusters)
        self.input_shape = tuple(int(v) for v in input_shape)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone embedding N x D of images in [0, 1]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster logits N x K of images in [0, 1]."""
        raise NotImplementedError

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Soft memberships N x K (rows sum to 1); differentiable with respect to ``x``.

        Inputs are moved to the model's device and the memberships come back on the
        input's device, so a victim on a GPU answers CPU queries (``.to`` keeps autograd).
        """
        check_images(x, self.input_shape)
        param = next(self.parameters(), None)
        if param is not None and param.device != x.device:
            return torch.softmax(self(x.to(param.device)), dim=1).to(x.device)
        return torch.softmax(self(x), dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Hard cluster id per image (argmax of the memberships), int64 of shape N."""
        return self.predict_proba(x).argmax(dim=1)
