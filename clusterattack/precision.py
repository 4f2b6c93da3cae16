"""Mixed precision for training loops: one switch, ``fp32`` (default) or ``bf16`` autocast.

bf16 keeps fp32's exponent range, so no loss scaling is needed and every training loop
can run under the same ``autocast`` without a GradScaler threaded through it; fp16 would
need one per optimiser step in every stage and is not offered. Evaluation, served
inference and everything a result is computed from stay in fp32, so a number in a
table does not depend on the precision its model was trained in beyond the training
itself.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "autocast", "check_precision"]

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of PRECISIONS, else ValueError naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """A context that runs matmuls and convolutions in bf16 on ``device`` when asked.

    ``fp32`` returns a no-op context, so the default path is exactly the unwrapped code.
    """
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
