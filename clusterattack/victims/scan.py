"""SCAN: Semantic Clustering by Adopting Nearest neighbors (Van Gansbeke et al., ECCV 2020).

Three steps: (1) a contrastive pretext (SimCLR, shared and cached, see ``pretext``);
(2) mine the k nearest neighbours of every image in pretext feature space and train a
cluster head (and the backbone) so that an image and its neighbours get the same cluster,
with an entropy term that keeps all clusters in use; (3) self-labelling: confident
predictions on weak views become labels for strong views, class-balanced cross entropy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from clusterattack.victims.augment import STRONG, STRONGER, WEAK, AugmentConfig, augment
from clusterattack.victims.backbones import Backbone, BackboneConfig, check_model_config
from clusterattack.victims.base import ClusteringModel
from clusterattack.victims.losses import confident_cross_entropy, entropy, scan_loss
from clusterattack.victims.neighbors import mine_neighbors
from clusterattack.victims.pretext import PretextRecipe, pretext_backbone
from clusterattack.victims.training import (
    MeanMeter,
    Stage,
    TrainContext,
    TrainData,
    TrainOutcome,
    batches,
    fingerprint_of,
    has_checkpoint,
    run_stages,
    store_cached,
    train_features,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SCANConfig:
    """Architecture: backbone and a linear cluster head over K clusters."""

    num_clusters: int
    input_shape: tuple[int, int, int]
    backbone: BackboneConfig

    def __post_init__(self) -> None:
        check_model_config("scan", self.num_clusters, self.input_shape, self.backbone)


class SCAN(ClusteringModel):
    """Backbone -> linear head; NNM and RUC reuse this architecture."""

    name = "scan"

    def __init__(self, config: SCANConfig) -> None:
        super().__init__(config, config.num_clusters, config.input_shape)
        self.backbone = Backbone(config.backbone)
        self.head = nn.Linear(self.backbone.out_dim, config.num_clusters)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass(frozen=True)
class SCANRecipe:
    """SCAN's recipe: k=20 neighbours, entropy weight 5, Adam 1e-4, threshold 0.99 for self-labels.

    ``head_epochs`` first trains the cluster head alone on fixed pretext features with the
    SCAN loss (SCAN's head-only variant; seconds, since no image passes through the
    backbone), so that ``epochs`` of the full clustering step start from formed clusters;
    ``selflabel_epochs`` is the self-labelling step. ``num_heads`` heads are warmed up side
    by side and the one with the lowest SCAN loss over the training set is kept, SCAN's own
    selection: measured here on the demo pretext (five heads, eight settings of k, entropy
    weight, learning rate and epochs), single heads reached NMI 0.52-0.67 depending only on
    their initialisation, and the lowest-loss head was the best of the five every time.
    """

    pretext: PretextRecipe = field(default_factory=PretextRecipe)
    num_neighbors: int = 20
    num_heads: int = 10
    head_epochs: int = 30
    epochs: int = 3
    batch_size: int = 256
    lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 1e-4
    entropy_weight: float = 5.0
    view: AugmentConfig = STRONG
    selflabel_epochs: int = 5
    selflabel_lr: float = 1e-4
    confidence: float = 0.99
    weak_view: AugmentConfig = WEAK
    strong_view: AugmentConfig = STRONGER

    def __post_init__(self) -> None:
        if (
            min(self.head_epochs, self.epochs, self.selflabel_epochs) < 0
            or self.num_neighbors < 1
            or self.num_heads < 1
            or self.batch_size < 2
        ):
            raise ValueError(
                "scan recipe needs num_neighbors >= 1, num_heads >= 1, epochs >= 0, "
                f"batch_size >= 2; got {self}"
            )
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence}")

    @classmethod
    def preset(cls, name: str) -> SCANRecipe:
        if name == "demo":
            return cls()
        if name == "full":
            return cls(pretext=PretextRecipe(epochs=300), epochs=50, selflabel_epochs=50)
        raise ValueError(f"unknown preset {name!r}, expected 'demo' or 'full'")


def param_groups(
    model: ClusteringModel, backbone_lr: float, head_lr: float, weight_decay: float
) -> list[dict]:
    """Backbone and head at their own rates: a fresh head needs to move faster than a pretrained backbone."""
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    return [
        {
            "params": list(model.backbone.parameters()),
            "lr": backbone_lr,
            "weight_decay": weight_decay,
        },
        {"params": head, "lr": head_lr, "weight_decay": weight_decay},
    ]


class HeadWarmupStage(Stage):
    """SCAN loss on cluster heads alone over fixed (pretext) features of the clean training images.

    ``recipe.num_heads`` linear heads train side by side (one matrix); after every epoch
    the one with the lowest SCAN loss over the whole training set (all mined neighbours)
    becomes the model's head, so evaluations and later stages see the selected head.
    Head 0 starts from the model's own head. Mines the neighbours the later clustering
    stage reuses (through ``shared``).
    """

    name = "scan_head"
    eval_every = 10  # an epoch here takes less time than scoring the test split

    def __init__(self, recipe, shared: dict) -> None:
        super().__init__(recipe.head_epochs)
        self.recipe = recipe
        self.shared = shared
        self.feats: torch.Tensor | None = None
        self.heads: nn.Linear | None = None

    def start(self, model, data, ctx, state):
        r = self.recipe
        k = model.head.out_features
        # Drawn from its own generator: a resumed run restores the global RNG before
        # ``start`` and must not see it consumed by heads its checkpoint then replaces.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            self.heads = nn.Linear(model.head.in_features, k * r.num_heads)
        self.heads.to(ctx.device)
        with torch.no_grad():
            self.heads.weight[:k] = model.head.weight
            self.heads.bias[:k] = model.head.bias
        self.optimizer = torch.optim.Adam(
            self.heads.parameters(), lr=r.head_lr, weight_decay=r.weight_decay
        )
        self.restore(state)
        # Recomputed rather than checkpointed: the backbone does not move in this stage.
        self.feats = train_features(model, data, ctx).to(ctx.device)
        self.shared["neighbors"] = mine_neighbors(self.feats, r.num_neighbors)

    def extra_state(self):
        return {"heads": self.heads.state_dict()}

    def load_extra_state(self, state):
        if "heads" in state:
            self.heads.load_state_dict(state["heads"])

    def head_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """B x H x K logits of all heads."""
        return self.heads(feats).unflatten(-1, (self.recipe.num_heads, -1))

    @torch.no_grad()
    def head_losses(self, chunk_size: int = 4096) -> torch.Tensor:
        """Each head's SCAN loss over the training set, every mined neighbour counted (H)."""
        p = torch.softmax(self.head_logits(self.feats).float(), dim=-1)
        nb = self.shared["neighbors"].to(p.device)
        consistency = torch.zeros(p.shape[1], device=p.device)
        for start in range(0, p.shape[0], chunk_size):
            pa = p[start : start + chunk_size].unsqueeze(1)  # c x 1 x H x K
            pn = p[nb[start : start + chunk_size]]  # c x k x H x K
            consistency -= torch.log((pa * pn).sum(-1).clamp_min(1e-8)).sum((0, 1))
        consistency /= nb.numel()
        return consistency - self.recipe.entropy_weight * entropy(p.mean(0))

    def run_epoch(self, model, data, ctx, epoch):
        r = self.recipe
        nb = self.shared["neighbors"]
        meter = MeanMeter()
        for idx in batches(
            data.num_train, r.batch_size, f"scan-head {epoch + 1}/{self.epochs}", ctx
        ):
            pick = nb[idx, torch.randint(0, nb.shape[1], (idx.numel(),))]
            logits = self.head_logits(self.feats[torch.cat([idx, pick]).to(ctx.device)])
            loss = scan_loss(*logits.chunk(2), r.entropy_weight)
            self.optimizer.zero_grad(set_to_none=True)
            loss.total.sum().backward()
            self.optimizer.step()
            meter.add(
                loss=loss.total.detach().mean(),
                consistency=loss.consistency.detach().mean(),
                entropy=loss.entropy.detach().mean(),
            )
        losses = self.head_losses()
        best = int(losses.argmin())
        k = model.head.out_features
        with torch.no_grad():
            model.head.weight.copy_(self.heads.weight[best * k : (best + 1) * k])
            model.head.bias.copy_(self.heads.bias[best * k : (best + 1) * k])
        return {
            **meter.means(),
            "selected_head": float(best),
            "selected_head_loss": float(losses[best]),
            "worst_head_loss": float(losses.max()),
        }


class ScanStage(Stage):
    """SCAN step: anchors and one random mined neighbour each, consistency plus entropy."""

    name = "scan"

    def __init__(
        self, recipe: SCANRecipe, epochs: int | None = None, shared: dict | None = None
    ) -> None:
        super().__init__(recipe.epochs if epochs is None else epochs)
        self.recipe = recipe
        self.shared = shared if shared is not None else {}
        self.neighbors: torch.Tensor | None = None

    def start(self, model, data, ctx, state):
        r = self.recipe
        self.optimizer = torch.optim.Adam(param_groups(model, r.lr, r.head_lr, r.weight_decay))
        if not self.restore(state):
            self.neighbors = self.shared.get("neighbors")
            if self.neighbors is None:
                self.neighbors = mine_neighbors(train_features(model, data, ctx), r.num_neighbors)

    def extra_state(self):
        return {"neighbors": self.neighbors}

    def load_extra_state(self, state):
        self.neighbors = state["neighbors"]

    def neighbor_batch(self, idx: torch.Tensor) -> torch.Tensor:
        pick = torch.randint(0, self.neighbors.shape[1], (idx.numel(),))
        return self.neighbors[idx, pick]

    def run_epoch(self, model, data, ctx, epoch):
        r = self.recipe
        meter = MeanMeter()
        for idx in batches(
            data.num_train, r.batch_size, f"{self.name} {epoch + 1}/{self.epochs}", ctx
        ):
            x = data.batch(torch.cat([idx, self.neighbor_batch(idx)]), ctx.device)
            anchor_logits, neighbor_logits = model(augment(x, r.view)).chunk(2)
            loss = scan_loss(anchor_logits, neighbor_logits, r.entropy_weight)
            self.optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            self.optimizer.step()
            meter.add(
                loss=loss.total.detach(),
                consistency=loss.consistency.detach(),
                entropy=loss.entropy.detach(),
            )
        return meter.means()


class SelfLabelStage(Stage):
    """Self-labelling: confident weak-view clusters supervise strong views (class-balanced CE)."""

    name = "selflabel"

    def __init__(
        self, epochs: int, lr: float, confidence: float, batch_size: int, weak, strong
    ) -> None:
        super().__init__(epochs)
        self.lr, self.confidence, self.batch_size = lr, confidence, batch_size
        self.weak, self.strong = weak, strong

    def start(self, model, data, ctx, state):
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=1e-4)
        self.restore(state)

    def run_epoch(self, model, data, ctx, epoch):
        meter = MeanMeter()
        for idx in batches(
            data.num_train, self.batch_size, f"selflabel {epoch + 1}/{self.epochs}", ctx
        ):
            x = data.batch(idx, ctx.device)
            with torch.no_grad():
                model.eval()  # targets from running BN statistics, as SCAN computes them
                weak_logits = model(augment(x, self.weak))
                model.train()
            loss, frac = confident_cross_entropy(
                weak_logits, model(augment(x, self.strong)), self.confidence
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            meter.add(loss=loss.detach(), confident_fraction=frac)
        return meter.means()


def scan_fingerprint(model: ClusteringModel, data: TrainData, recipe, seed: int) -> dict:
    return fingerprint_of(
        model=model.name,
        config=model.config,
        recipe=recipe,
        data=data.name,
        n=data.num_train,
        seed=seed,
    )


def init_from_pretext(
    model: ClusteringModel, recipe: PretextRecipe, data: TrainData, ctx: TrainContext
) -> dict:
    """Load the shared SimCLR backbone into ``model`` unless a checkpoint will overwrite it anyway.

    Returns facts for the run record: the pretext's wall time (as built) and whether it
    came from the cache.
    """
    if has_checkpoint(ctx):
        return {"pretext_skipped_on_resume": True}
    pre = pretext_backbone(model.config.backbone, recipe, data, ctx)
    model.backbone.load_state_dict(pre.backbone_state)
    info = {"pretext_wall_s": pre.wall_s, "pretext_cpu_s": pre.cpu_s, "pretext_cached": pre.cached}
    if pre.history:
        info["pretext_kmeans_nmi"] = pre.history[-1]["nmi"]
    return info


def train_scan(model: SCAN, data: TrainData, recipe: SCANRecipe, ctx: TrainContext) -> TrainOutcome:
    """Pretext (cached) -> SCAN clustering step -> self-labelling.

    The finished model is also written to the cache under its fingerprint so RUC, which
    starts from SCAN, can reuse it instead of training SCAN again.
    """
    info = init_from_pretext(model, recipe.pretext, data, ctx)
    fp = scan_fingerprint(model, data, recipe, ctx.seed)
    shared: dict = {}
    stages = [
        HeadWarmupStage(recipe, shared),
        ScanStage(recipe, shared=shared),
        SelfLabelStage(
            recipe.selflabel_epochs,
            recipe.selflabel_lr,
            recipe.confidence,
            recipe.batch_size,
            recipe.weak_view,
            recipe.strong_view,
        ),
    ]
    c0 = time.process_time()
    history = run_stages(model, stages, data, ctx, fp, tag="scan")
    cached_result = {
        "state": model.state_dict(),
        "wall_s": sum(h["epoch_s"] for h in history),
        "cpu_s": time.process_time() - c0,
        "history": history,
        "info": info,
    }
    store_cached(ctx, "scan", fp, cached_result)
    return TrainOutcome(history, info)
