"""SPICE: Semantic Pseudo-labeling for Image ClustEring (Niu et al., IEEE TIP 2022).

SPICE-Self: on a *frozen* contrastive backbone (the shared pretext), a cluster head is
trained with prototype pseudo-labels: in each batch the most confident images of every
cluster define its prototype (their mean feature), the images nearest to each prototype
are labelled with that cluster, and the head learns those labels on strong views.
SPICE-Semi: images whose label agrees with most of their feature-space neighbours (and
is confident) are *reliable*; the whole network is then trained semi-supervised on
them, FixMatch-style (labelled cross entropy + confident weak-to-strong pseudo-labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from clusterattack.victims.augment import STRONGER, WEAK, AugmentConfig, augment
from clusterattack.victims.backbones import Backbone, BackboneConfig, check_model_config, mlp
from clusterattack.victims.base import ClusteringModel
from clusterattack.victims.losses import confident_cross_entropy
from clusterattack.victims.neighbors import mine_neighbors, neighbor_agreement
from clusterattack.victims.pretext import PretextRecipe
from clusterattack.victims.scan import init_from_pretext, param_groups, scan_fingerprint
from clusterattack.victims.training import (
    MeanMeter,
    Stage,
    TrainContext,
    TrainData,
    TrainOutcome,
    batches,
    predict_batches,
    run_stages,
    train_features,
)


@dataclass(frozen=True)
class SPICEConfig:
    """Architecture: backbone and a two-layer MLP cluster head (SPICE's)."""

    num_clusters: int
    input_shape: tuple[int, int, int]
    backbone: BackboneConfig
    head_hidden: int = 256

    def __post_init__(self) -> None:
        check_model_config("spice", self.num_clusters, self.input_shape, self.backbone)
        if self.head_hidden < 1:
            raise ValueError(f"spice: head_hidden must be >= 1, got {self.head_hidden}")


class SPICE(ClusteringModel):
    name = "spice"

    def __init__(self, config: SPICEConfig) -> None:
        super().__init__(config, config.num_clusters, config.input_shape)
        self.backbone = Backbone(config.backbone)
        self.head = mlp(self.backbone.out_dim, config.head_hidden, config.num_clusters)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass(frozen=True)
class SPICERecipe:
    """SPICE's recipe. ``epochs`` is SPICE-Self (head only), ``semi_epochs`` SPICE-Semi.

    ``prototype_ratio``: fraction of a batch's per-cluster share used both to build each
    prototype and to label the images nearest to it (SPICE's 0.5 of batch/K).
    ``reliable_agreement``: share of the ``num_neighbors`` neighbours that must carry an
    image's label; ``reliable_confidence``: its minimum head probability.
    """

    pretext: PretextRecipe = field(default_factory=PretextRecipe)
    epochs: int = 5
    self_batch_size: int = 1000
    self_lr: float = 1e-3
    prototype_ratio: float = 0.5
    num_neighbors: int = 20
    reliable_agreement: float = 0.9
    reliable_confidence: float = 0.9
    semi_epochs: int = 2
    batch_size: int = 128
    unlabeled_ratio: int = 1
    semi_lr: float = 1e-4
    semi_head_lr: float = 1e-3
    semi_confidence: float = 0.95
    unlabeled_weight: float = 1.0
    weak_view: AugmentConfig = WEAK
    strong_view: AugmentConfig = STRONGER

    def __post_init__(self) -> None:
        if (
            self.epochs < 0
            or self.semi_epochs < 0
            or self.batch_size < 2
            or self.self_batch_size < 2
        ):
            raise ValueError(f"spice recipe needs epochs >= 0 and batch sizes >= 2; got {self}")
        for key in (
            "prototype_ratio",
            "reliable_agreement",
            "reliable_confidence",
            "semi_confidence",
        ):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"{key} must lie in (0, 1], got {getattr(self, key)}")

    @classmethod
    def preset(cls, name: str) -> SPICERecipe:
        if name == "demo":
            return cls()
        if name == "full":
            return cls(pretext=PretextRecipe(epochs=300), epochs=100, semi_epochs=100)
        raise ValueError(f"unknown preset {name!r}, expected 'demo' or 'full'")


def prototype_labels(
    probs: torch.Tensor, feats: torch.Tensor, per_cluster: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPICE's pseudo-labels for one batch: (indices, labels) of the images nearest each prototype.

    Prototype k = mean normalised feature of the ``per_cluster`` images most confident in
    k; then the ``per_cluster`` images most similar to prototype k are labelled k (an
    image claimed by two prototypes keeps the more similar one).
    """
    k = probs.shape[1]
    # fp32 whatever the autocast dtype: the similarities are compared and stored below.
    z = F.normalize(feats.float(), dim=1)
    top = probs.float().topk(per_cluster, dim=0).indices  # per_cluster x K
    protos = F.normalize(z[top].mean(0), dim=1)  # K x D
    sim = (z @ protos.t()).float()  # B x K (a matmul under autocast is bf16)
    near = sim.topk(per_cluster, dim=0).indices  # per_cluster x K
    best = torch.full((z.shape[0],), -1, dtype=torch.long, device=z.device)
    best_sim = torch.full((z.shape[0],), -2.0, device=z.device)
    for c in range(k):
        rows = near[:, c]
        better = sim[rows, c] > best_sim[rows]
        best[rows[better]] = c
        best_sim[rows[better]] = sim[rows[better], c]
    chosen = torch.nonzero(best >= 0).squeeze(1)
    return chosen, best[chosen]


class SpiceSelfStage(Stage):
    """SPICE-Self: the backbone stays frozen (eval mode, no gradient); only the head learns."""

    name = "spice_self"

    def __init__(self, recipe: SPICERecipe) -> None:
        super().__init__(recipe.epochs)
        self.recipe = recipe

    def start(self, model, data, ctx, state):
        self.optimizer = torch.optim.Adam(
            model.head.parameters(), lr=self.recipe.self_lr, weight_decay=1e-4
        )
        self.restore(state)

    def run_epoch(self, model, data, ctx, epoch):
        r = self.recipe
        meter = MeanMeter()
        model.backbone.eval()
        per_cluster = max(1, int(r.prototype_ratio * r.self_batch_size / model.num_clusters))
        for idx in batches(
            data.num_train, r.self_batch_size, f"spice-self {epoch + 1}/{r.epochs}", ctx
        ):
            x = data.batch(idx, ctx.device)
            with torch.no_grad():
                weak_feats = model.backbone(augment(x, r.weak_view))
                strong_feats = model.backbone(augment(x, r.strong_view))
                probs = torch.softmax(model.head(weak_feats), dim=1)
                rows, labels = prototype_labels(probs, weak_feats, min(per_cluster, len(idx)))
            loss = F.cross_entropy(model.head(strong_feats[rows]), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            meter.add(loss=loss.detach(), labelled_fraction=rows.numel() / len(idx))
        model.backbone.train()
        return meter.means()


class SpiceSemiStage(Stage):
    """SPICE-Semi: reliable pseudo-labels + FixMatch on the whole network."""

    name = "spice_semi"

    def __init__(self, recipe: SPICERecipe) -> None:
        super().__init__(recipe.semi_epochs)
        self.recipe = recipe
        self.reliable: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    def start(self, model, data, ctx, state):
        r = self.recipe
        self.optimizer = torch.optim.Adam(param_groups(model, r.semi_lr, r.semi_head_lr, 1e-4))
        if self.restore(state):
            return
        feats = train_features(model, data, ctx)
        model.eval()
        probs = predict_batches(
            lambda x: torch.softmax(model(x), 1), data.train_images, ctx.device, ctx.eval_batch_size
        )
        model.train()
        conf, labels = probs.max(1)
        agree = neighbor_agreement(labels, mine_neighbors(feats, r.num_neighbors))
        keep = (agree >= r.reliable_agreement) & (conf >= r.reliable_confidence)
        if int(keep.sum()) < model.num_clusters:
            # Too strict for this model: fall back to the most consistent tenth of the data.
            keep = agree >= agree.quantile(0.9)
        self.reliable = torch.nonzero(keep).squeeze(1)
        self.labels = labels

    def extra_state(self):
        return {"reliable": self.reliable, "labels": self.labels}

    def load_extra_state(self, state):
        self.reliable, self.labels = state["reliable"], state["labels"]

    def run_epoch(self, model, data, ctx, epoch):
        r = self.recipe
        meter = MeanMeter()
        n_rel = self.reliable.numel()
        ub = r.batch_size * r.unlabeled_ratio
        for uidx in batches(data.num_train, ub, f"spice-semi {epoch + 1}/{r.semi_epochs}", ctx):
            lidx = self.reliable[torch.randint(0, n_rel, (r.batch_size,))]
            xl = data.batch(lidx, ctx.device)
            xu = data.batch(uidx, ctx.device)
            with torch.no_grad():
                weak_u = model(augment(xu, r.weak_view))
            logits = model(torch.cat([augment(xl, r.weak_view), augment(xu, r.strong_view)]))
            logits_l, logits_u = logits[: r.batch_size], logits[r.batch_size :]
            sup = F.cross_entropy(logits_l, self.labels[lidx].to(ctx.device))
            unsup, frac = confident_cross_entropy(
                weak_u, logits_u, r.semi_confidence, balance=False
            )
            loss = sup + r.unlabeled_weight * unsup
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            meter.add(
                loss=loss.detach(),
                supervised=sup.detach(),
                unsupervised=unsup.detach(),
                confident_fraction=frac,
            )
        out = meter.means()
        out["reliable_fraction"] = n_rel / data.num_train
        return out


def train_spice(
    model: SPICE, data: TrainData, recipe: SPICERecipe, ctx: TrainContext
) -> TrainOutcome:
    """Pretext (cached, shared) -> SPICE-Self on the frozen backbone -> SPICE-Semi."""
    info = init_from_pretext(model, recipe.pretext, data, ctx)
    stages = [SpiceSelfStage(recipe), SpiceSemiStage(recipe)]
    history = run_stages(
        model, stages, data, ctx, scan_fingerprint(model, data, recipe, ctx.seed), tag="spice"
    )
    return TrainOutcome(history, info)
