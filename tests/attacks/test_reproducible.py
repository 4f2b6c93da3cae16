"""A run is reproducible from its seed, and the seed matters."""

from __future__ import annotations

import pytest
import torch

from clusterattack.attacks import CountingVictim, train_generator


def _weights(result):
    return torch.cat([p.detach().flatten() for p in result.generator.parameters()])


@pytest.mark.parametrize(
    ("source", "changes"),
    [("whitebox", {}), ("estimate", {}), ("surrogate", {}), ("surrogate", {"surrogate.online": False})],
)
def test_same_seed_same_generator_and_history(victim, blobs, source, changes, config):
    runs = [
        train_generator(
            CountingVictim(victim), blobs[0], config(gradient_source=source, seed=s, **changes), progress=False
        )
        for s in (3, 3, 4)
    ]
    assert torch.equal(_weights(runs[0]), _weights(runs[1]))
    assert runs[0].history == runs[1].history
    assert runs[0].image_queries == runs[1].image_queries
    assert not torch.equal(_weights(runs[0]), _weights(runs[2]))
