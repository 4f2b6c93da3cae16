"""NNM: Nearest Neighbor Matching for deep clustering (Dang et al., CVPR 2021).

SCAN's neighbour consistency, matched at two levels: globally, with neighbours re-mined
from the *current* model's features every epoch (so the matching improves as the
features do, instead of staying fixed at the pretext's), and locally, with each image's
nearest neighbour inside its own batch. An entropy term keeps clusters balanced, and the
same self-labelling step as SCAN finishes the recipe. Architecture: SCAN's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clusterattack.victims.augment import augment
from clusterattack.victims.backbones import BackboneConfig, check_model_config
from clusterattack.victims.losses import entropy, scan_loss
from clusterattack.victims.neighbors import batch_neighbors, mine_neighbors
from clusterattack.victims.scan import (
    SCAN,
    HeadWarmupStage,
    SCANRecipe,
    ScanStage,
    SelfLabelStage,
    init_from_pretext,
    scan_fingerprint,
)
from clusterattack.victims.training import (
    MeanMeter,
    TrainContext,
    TrainData,
    TrainOutcome,
    batches,
    run_stages,
    train_features,
)


@dataclass(frozen=True)
class NNMConfig:
    """Architecture: SCAN's backbone and linear head."""

    num_clusters: int
    input_shape: tuple[int, int, int]
    backbone: BackboneConfig

    def __post_init__(self) -> None:
        check_model_config("nnm", self.num_clusters, self.input_shape, self.backbone)


class NNM(SCAN):
    """SCAN's network trained with NNM's batch- and global-level neighbour matching."""

    name = "nnm"

    def __init__(self, config: NNMConfig) -> None:
        # SCAN's constructor only reads the shared fields, so NNM's config fits it as is.
        super().__init__(config)  # type: ignore[arg-type]


@dataclass(frozen=True)
class NNMRecipe(SCANRecipe):
    """NNM's recipe: SCAN's (same fields, defaults and presets) plus the weights of NNM's two
    neighbour terms; global neighbours are re-mined each epoch, one batch neighbour.

    ``head_epochs`` warms the head up on fixed pretext features as in SCAN's recipe here.
    """

    global_weight: float = 1.0
    batch_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 4:
            # The batch-level matching needs a neighbour for each image inside the batch.
            raise ValueError(f"nnm recipe needs batch_size >= 4, got {self.batch_size}")


class NNMStage(ScanStage):
    """SCAN step with global neighbours refreshed each epoch plus within-batch neighbour matching."""

    name = "nnm"

    def run_epoch(self, model, data, ctx, epoch):
        r = self.recipe
        if epoch > 0:
            # Global matching follows the features as they improve (epoch 0 uses the pretext's).
            self.neighbors = mine_neighbors(train_features(model, data, ctx), r.num_neighbors)
        meter = MeanMeter()
        for idx in batches(data.num_train, r.batch_size, f"nnm {epoch + 1}/{self.epochs}", ctx):
            x = data.batch(torch.cat([idx, self.neighbor_batch(idx)]), ctx.device)
            h = model.backbone(augment(x, r.view))
            logits = model.head(h)
            anchor_logits, neighbor_logits = logits.chunk(2)
            anchor_h = h[: idx.numel()]
            local = batch_neighbors(anchor_h.detach(), 1)[:, 0]
            global_part = scan_loss(anchor_logits, neighbor_logits, 0.0).consistency
            batch_part = scan_loss(anchor_logits, anchor_logits[local], 0.0).consistency
            spread = entropy(torch.softmax(anchor_logits, 1).mean(0))
            loss = (
                r.global_weight * global_part
                + r.batch_weight * batch_part
                - r.entropy_weight * spread
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            meter.add(
                loss=loss.detach(),
                global_loss=global_part.detach(),
                batch_loss=batch_part.detach(),
                entropy=spread.detach(),
            )
        return meter.means()


def train_nnm(model: NNM, data: TrainData, recipe: NNMRecipe, ctx: TrainContext) -> TrainOutcome:
    """Pretext (cached, shared with SCAN) -> NNM matching step -> self-labelling."""
    info = init_from_pretext(model, recipe.pretext, data, ctx)
    shared: dict = {}
    stages = [
        HeadWarmupStage(recipe, shared),
        NNMStage(recipe, shared=shared),  # type: ignore[arg-type]
        SelfLabelStage(
            recipe.selflabel_epochs,
            recipe.selflabel_lr,
            recipe.confidence,
            recipe.batch_size,
            recipe.weak_view,
            recipe.strong_view,
        ),
    ]
    history = run_stages(
        model, stages, data, ctx, scan_fingerprint(model, data, recipe, ctx.seed), tag="nnm"
    )
    return TrainOutcome(history, info)
