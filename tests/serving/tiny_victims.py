"""A tiny seeded victim satisfying the Victim contract, for serving tests and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import torch
from torch import nn

# An image of this constant value (exact in float32; the tests' random images never are
# constant) makes the replica that runs it wait at the trap gate, if one is up: a request
# held in a replica for as long as a test needs, to kill the replica in the middle of it.
TRAP_VALUE = 0.3125
TRAP_GATE = "tiny-victim-trap-gate"
TRAP_NAMESPACE = "clusterattack-tests"


def trap_image() -> np.ndarray:
    return np.full((1, 1, 8, 8), TRAP_VALUE, dtype=np.float32)


class TrapGate:
    """Ray actor (named ``TRAP_GATE``) that holds the first trapped forward until released.

    ``enter`` is called by a replica's forward that met the trap image: the first caller is
    told to hold (and ``held`` answers with its replica's actor name), later callers (the
    retry of the same request elsewhere) pass. ``entries`` counts them all.
    """

    def __init__(self) -> None:
        self._holder: str | None = None
        self._entries = 0
        self._entered = asyncio.Event()
        self._released = asyncio.Event()

    async def enter(self, replica: str) -> bool:
        self._entries += 1
        if self._holder is not None:
            return False
        self._holder = replica
        self._entered.set()
        return True

    async def held(self) -> str:
        await self._entered.wait()
        return self._holder

    async def wait_released(self, timeout_s: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._released.wait(), timeout_s)

    async def release(self) -> None:
        self._released.set()

    async def entries(self) -> int:
        return self._entries


def _hold_at_trap_gate() -> None:
    import ray

    try:
        gate = ray.get_actor(TRAP_GATE, namespace=TRAP_NAMESPACE)
    except ValueError:
        return  # no gate up: the trap image is an ordinary image
    if ray.get(gate.enter.remote(ray.get_runtime_context().get_actor_name() or "")):
        # Held until the test kills this replica (or gives up and releases it).
        ray.get(gate.wait_released.remote(120.0))


class TinyVictim(nn.Module):
    """Linear map of 1 x 8 x 8 images to 3 clusters, softmax memberships.

    ``delay_s`` sleeps in every forward so concurrent runs last long enough to kill a
    replica in the middle of one; the trap image (``TRAP_VALUE``) holds a forward at the
    trap gate when one is up.
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
        if bool((x == TRAP_VALUE).flatten(1).all(dim=1).any()):
            _hold_at_trap_gate()
        return torch.softmax(self.linear(x.flatten(1)), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict_proba(x)
