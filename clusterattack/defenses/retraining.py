"""Adversarial retraining (the paper's footnote 12): retrain a victim on images perturbed by trained generators.

The victim is trained again with its own recipe (``victims.registry``), starting from its
current weights, on training batches in which each image is replaced, with probability
``mix``, by its perturbation under one of the given generators (drawn at random per
image). Nothing in the recipes changes: the perturbation happens where a batch is drawn
(``AdversarialTrainData.batch``), so every victim's augmentations and losses apply to
clean and adversarial images alike.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from clusterattack.attacks.config import AttackConfig
from clusterattack.attacks.generator import Generator
from clusterattack.victims.base import ClusteringModel
from clusterattack.victims.registry import get_spec
from clusterattack.victims.training import TrainContext, TrainData, TrainOutcome

__all__ = ["AdversarialTrainData", "adversarial_retrain"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdversarialTrainData(TrainData):
    """``TrainData`` whose training batches are perturbed by ``generators`` with probability ``mix`` per image.

    ``generators`` are (generator, the AttackConfig it applies: norm, eps, hard_clamp).
    Test batches and anything that reads ``train_images`` directly (feature mining for
    neighbours, pseudo-labels) stay clean.
    """

    generators: tuple[tuple[Generator, AttackConfig], ...] = field(default=())
    mix: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.generators:
            raise ValueError("adversarial retraining needs at least one (generator, config) pair, got none")
        if not 0 < self.mix <= 1:
            raise ValueError(f"mix (fraction of adversarial images per batch) must lie in (0, 1], got {self.mix!r}")

    @classmethod
    def wrap(
        cls, data: TrainData, generators: Sequence[tuple[Generator, AttackConfig]], mix: float = 0.5
    ) -> AdversarialTrainData:
        base = {f.name: getattr(data, f.name) for f in dataclasses.fields(TrainData)}
        base["name"] = f"{data.name}+adv"  # keeps caches keyed on the data name apart
        return cls(**base, generators=tuple(generators), mix=mix)

    @torch.no_grad()
    def batch(self, index: torch.Tensor, device: torch.device, test: bool = False) -> torch.Tensor:
        x = super().batch(index, device, test)
        if test:
            return x
        pick = torch.rand(x.shape[0], device=x.device) < self.mix
        if not pick.any():
            return x
        which = torch.randint(len(self.generators), (x.shape[0],), device=x.device)
        out = x.clone()
        for g_index, (generator, config) in enumerate(self.generators):
            rows = pick & (which == g_index)
            if rows.any():
                generator.to(x.device).eval()
                x_adv, _, _ = generator.perturb(x[rows], config.norm, config.eps, config.hard_clamp)
                out[rows] = x_adv
        return out


def adversarial_retrain(
    model: ClusteringModel,
    data: TrainData,
    generators: Sequence[tuple[Generator, AttackConfig]],
    ctx: TrainContext,
    *,
    mix: float = 0.5,
    preset: str = "demo",
    recipe_overrides: dict[str, Any] | None = None,
) -> TrainOutcome:
    """Retrain ``model`` in place with its registry recipe on clean + adversarial batches.

    ``recipe_overrides`` change recipe fields (e.g. ``{"epochs": 2}`` for a short
    fine-tune). Returns the recipe's outcome (per-epoch history, scored on clean test images).
    """
    if not isinstance(model, ClusteringModel) or not model.name:
        raise TypeError(f"adversarial_retrain needs a registered ClusteringModel, got {type(model).__name__}")
    spec = get_spec(model.name)
    recipe = spec.recipe(preset, **(recipe_overrides or {}))
    for generator, _ in generators:
        generator.requires_grad_(False)
    adv_data = AdversarialTrainData.wrap(data, generators, mix)
    log.info(
        "adversarial retraining of %s on %s: %d generators, mix %.2f, recipe %s",
        model.name, data.name, len(generators), mix, recipe,
    )
    return spec.train(model, adv_data, recipe, ctx)
