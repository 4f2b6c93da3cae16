"""The attacker's own self-supervised backbone, for surrogates with ``arch`` "pretext".

Deep clustering victims are built on contrastive (SimCLR-style) features, so a surrogate
that starts from contrastive features of its own shares the victim's invariances and
its gradients transfer far better than those of a CNN distilled from scratch. The
attacker trains that backbone itself, without a label or a query, on the unlabelled
images the attack already holds, with a seed of its own (never the victim's weights or
its pretext checkpoint), and caches it by (images, backbone, recipe, seed).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clusterattack.victims.backbones import Backbone, BackboneConfig, backbone_for, mlp
from clusterattack.victims.pretext import PretextRecipe, pretext_backbone
from clusterattack.victims.training import DEFAULT_CACHE_DIR, TrainContext, TrainData

__all__ = [
    "PretextSurrogate",
    "attacker_backbone",
    "attacker_backbones",
    "attacker_cache_dir",
    "pretext_surrogate_shell",
]

log = logging.getLogger(__name__)

CACHE_ENV = "CLUSTERATTACK_CACHE_DIR"


def attacker_cache_dir() -> Path | None:
    """Where attacker backbones are cached: ``$CLUSTERATTACK_CACHE_DIR``, else the victims'
    cache (``DEFAULT_CACHE_DIR``, as jobs/train_victims.py); an empty value disables it."""
    value = os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR)
    return Path(value) if value else None


class PretextSurrogate(nn.Module):
    """The attacker's contrastive backbone and a two-layer head to K cluster logits."""

    def __init__(self, backbone: BackboneConfig, state: dict, num_clusters: int) -> None:
        super().__init__()
        self.backbone = Backbone(backbone)
        self.backbone.load_state_dict(state)
        d = self.backbone.out_dim
        self.head = mlp(d, d, num_clusters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def pretext_surrogate_shell(input_shape: tuple[int, int, int], num_clusters: int) -> PretextSurrogate:
    """A ``PretextSurrogate`` of the architecture ``attacker_backbone`` gives for this input
    shape, with untrained weights: the frame a saved surrogate's state dict is loaded into,
    so a resumed attack does not need the attacker pretext (or its cache) again."""
    config = backbone_for("demo", tuple(int(v) for v in input_shape))
    return PretextSurrogate(config, Backbone(config).state_dict(), num_clusters)


def _no_evaluation(*_args) -> dict[str, float]:
    return {}  # the attacker has no labels to score its pretext with


def attacker_backbone(
    images: torch.Tensor,
    epochs: int,
    seed: int,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = False,
    wait: bool = True,
) -> tuple[BackboneConfig, dict]:
    """(backbone config, state dict) of a SimCLR backbone trained on ``images`` (float, [0, 1]).

    The backbone is the one the demo preset sizes for this input shape; the recipe the
    shared pretext recipe with ``epochs`` epochs. The global RNGs are left as they were,
    so a run draws the same numbers whether the backbone came from the cache or not.
    ``wait=False``: raise ``CacheBusy`` if another process is building this backbone now.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be N x C x H x W, got {tuple(images.shape)}")
    if epochs < 1:
        raise ValueError(f"pretext epochs must be >= 1, got {epochs}")
    config = backbone_for("demo", tuple(int(v) for v in images.shape[1:]))
    u8 = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    digest = hashlib.sha256(u8.numpy().tobytes()).hexdigest()[:16]
    # The digest names the data set, so the cache key covers exactly these images. The
    # pretext scores nothing (no labels): the two-image "test split" is a stand-in.
    data = TrainData(f"attacker-{digest}", u8, u8[:2], np.zeros(2, dtype=np.int64), 2)
    ctx = TrainContext(
        device=torch.device(device), seed=seed, cache_dir=Path(cache_dir) if cache_dir else None,
        progress=progress,
    )
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        result = pretext_backbone(
            config, PretextRecipe(epochs=epochs), data, ctx, evaluate=_no_evaluation,
            cache_kind="attacker-pretext", wait=wait,
        )
    random.setstate(py_state)
    np.random.set_state(np_state)
    log.info("attacker pretext (%d epochs, seed %d): %s", epochs, seed, "cached" if result.cached else "trained")
    return config, {k: v.detach().cpu() for k, v in result.backbone_state.items()}


def attacker_backbones(
    images: torch.Tensor, epochs: int, seeds: list[int], device: str = "cpu", progress: bool = False
) -> dict[int, tuple[BackboneConfig, dict]]:
    """``attacker_backbone`` of each seed, cached under ``attacker_cache_dir()``.

    A backbone another process is building right now (two trials started side by side on
    the same images and seeds) is taken up after the others: the two build different ones
    and each then reads the other's, instead of the second waiting through both builds.
    """
    from clusterattack.victims.training import CacheBusy

    cache = attacker_cache_dir()
    out: dict[int, tuple[BackboneConfig, dict]] = {}
    for wait in (False, True):
        for seed in dict.fromkeys(seeds):
            if seed in out:
                continue
            try:
                out[seed] = attacker_backbone(images, epochs, seed, device, cache, progress, wait=wait)
            except CacheBusy:
                log.info("attacker pretext (seed %d) is being built by another process: later", seed)
    return out
