"""Nearest-neighbour mining in embedding space (SCAN, NNM, SPICE, RUC), chunked to bound memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mine_neighbors(features: torch.Tensor, k: int, chunk_size: int = 2048) -> torch.Tensor:
    """Indices (N x k, int64, on the CPU) of each row's k most cosine-similar other rows.

    The similarities are computed where ``features`` live (a GPU when training there);
    the indices come back on the CPU, where training batches' indices are drawn.

    The similarity matrix is computed ``chunk_size`` rows at a time so 60,000 images need
    about 0.5 GB at a time instead of 14 GB. The row itself is never its own neighbour.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be N x D, got shape {tuple(features.shape)}")
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must lie in 1..{n - 1} for {n} rows, got {k}")
    z = F.normalize(features.float(), dim=1)
    out = torch.empty(n, k, dtype=torch.long, device=z.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sim = z[start:stop] @ z.t()
        sim[
            torch.arange(stop - start, device=z.device), torch.arange(start, stop, device=z.device)
        ] = -2.0
        out[start:stop] = sim.topk(k, dim=1).indices
    return out.cpu()


def batch_neighbors(features: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Within-batch nearest neighbours (B x k indices into the batch), as NNM's batch level."""
    b = features.shape[0]
    if not 1 <= k < b:
        raise ValueError(f"k must lie in 1..{b - 1} for a batch of {b}, got {k}")
    z = F.normalize(features, dim=1)
    sim = z @ z.t()
    sim.fill_diagonal_(-2.0)
    return sim.topk(k, dim=1).indices


def neighbor_agreement(labels: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
    """Fraction of each row's neighbours that carry the row's own label (N floats in [0, 1])."""
    if neighbors.shape[0] != labels.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels but {neighbors.shape[0]} neighbour rows")
    return (labels[neighbors] == labels.unsqueeze(1)).float().mean(dim=1)
