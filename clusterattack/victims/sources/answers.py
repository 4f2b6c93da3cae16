"""What a model answered, turned into the contract's tensors and checked: memberships, logits, labels.

Every victim resolved from a specification passes each answer through these checks, so a
model that answers something other than probabilities fails on its first answer with an
error that names the row and the value, instead of poisoning an attack.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["VictimAnswerError", "as_tensor", "check_labels", "check_memberships", "to_memberships"]

#: How far a row of memberships may sum from 1 (float32 softmax of float64 scores is ~1e-7 off).
ROW_SUM_ATOL = 1e-3


class VictimAnswerError(ValueError):
    """A victim answered something that is not what its specification says it answers."""


def as_tensor(out: Any, who: str) -> torch.Tensor:
    """A model's answer (tensor, numpy array, nested list, pandas object) as a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_numpy"):  # pandas DataFrame / Series from an MLflow pyfunc
        out = out.to_numpy()
    try:
        arr = np.asarray(out)
    except (TypeError, ValueError) as exc:
        raise VictimAnswerError(f"{who} answered a {type(out).__name__} that is not an array: {exc}") from exc
    if arr.dtype == object:
        raise VictimAnswerError(f"{who} answered a ragged or non-numeric array (dtype object, shape {arr.shape})")
    if arr.dtype.kind not in "biuf":
        raise VictimAnswerError(f"{who} answered {arr.dtype} values, expected numbers")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _first_bad_row(mask: torch.Tensor) -> int:
    return int(mask.nonzero()[0, 0])


def check_memberships(probs: torch.Tensor, n: int, k: int | None, who: str) -> torch.Tensor:
    """Raise VictimAnswerError unless ``probs`` are N x K probabilities (finite, >= 0, rows sum to 1)."""
    if probs.ndim != 2 or probs.shape[0] != n or (k is not None and probs.shape[1] != k):
        expected = f"{n} x {k}" if k is not None else f"{n} x K"
        raise VictimAnswerError(
            f"{who} answered memberships of shape {tuple(probs.shape)}, expected {expected} "
            f"(one row per image, one column per cluster)"
        )
    values = probs.detach().to(torch.float64)
    if not torch.is_floating_point(probs):
        raise VictimAnswerError(f"{who} answered {probs.dtype} memberships; use output=labels for cluster ids")
    if n == 0:
        return probs
    nan = torch.isnan(values).any(dim=1)
    if nan.any():
        row = _first_bad_row(nan)
        raise VictimAnswerError(f"{who} answered NaN memberships (row {row}: {values[row].tolist()})")
    inf = torch.isinf(values).any(dim=1)
    if inf.any():
        row = _first_bad_row(inf)
        raise VictimAnswerError(f"{who} answered infinite memberships (row {row}: {values[row].tolist()})")
    negative = (values < 0).any(dim=1)
    if negative.any():
        row = _first_bad_row(negative)
        raise VictimAnswerError(
            f"{who} answered negative memberships (row {row}: min {float(values[row].min()):.4g}); "
            "memberships are probabilities: if these are scores before a softmax, say output=logits"
        )
    sums = values.sum(dim=1)
    off = (sums - 1).abs() > ROW_SUM_ATOL
    if off.any():
        row = _first_bad_row(off)
        raise VictimAnswerError(
            f"{who} answered memberships whose rows do not sum to 1 (row {row} sums to "
            f"{float(sums[row]):.6g}); if these are scores before a softmax, say output=logits"
        )
    return probs


def to_memberships(out: torch.Tensor, output: str, n: int, k: int | None, who: str) -> torch.Tensor:
    """Float32 memberships from a ``memberships`` or ``logits`` answer, checked; keeps autograd."""
    if output == "logits":
        if out.ndim != 2 or out.shape[0] != n or (k is not None and out.shape[1] != k):
            expected = f"{n} x {k}" if k is not None else f"{n} x K"
            raise VictimAnswerError(f"{who} answered logits of shape {tuple(out.shape)}, expected {expected}")
        if not torch.isfinite(out.detach()).all():
            raise VictimAnswerError(f"{who} answered non-finite logits")
        out = torch.softmax(out.to(torch.float32), dim=1)
    elif output != "memberships":
        raise ValueError(f"output must be 'memberships' or 'logits' here, got {output!r}")
    check_memberships(out, n, k, who)
    return out.to(torch.float32)


def check_labels(out: torch.Tensor, n: int, k: int, who: str) -> torch.Tensor:
    """int64 cluster ids of shape N in 0..K-1 (a column N x 1 is accepted), or VictimAnswerError."""
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.ndim != 1 or out.shape[0] != n:
        raise VictimAnswerError(f"{who} answered labels of shape {tuple(out.shape)}, expected ({n},)")
    if torch.is_floating_point(out) and (not torch.isfinite(out).all() or not torch.equal(out, out.round())):
        raise VictimAnswerError(f"{who} answered non-integer labels; cluster ids must be integers 0..{k - 1}")
    labels = out.to(torch.int64)
    if n and (labels.min() < 0 or labels.max() >= k):
        bad = labels[(labels < 0) | (labels >= k)][0]
        raise VictimAnswerError(f"{who} answered cluster id {int(bad)}, outside 0..{k - 1} (clusters={k})")
    return labels
