"""RUC: Robust learning for Unsupervised Clustering (Park et al., ICCV 2021), an add-on over SCAN.

SCAN's cluster assignments are treated as noisy labels. They are split into a clean set
(confidence-based: max probability above a threshold; metric-based: most feature-space
neighbours share the label) and a noisy rest. Two networks, both started from the
trained SCAN model, are co-trained: each learns from the clean set chosen by the *other*
one's criterion, with label smoothing and strong augmentation on clean images,
co-guessed sharpened targets on noisy images, and an adversarial (VAT-style) consistency
term that makes predictions stable under a small worst-case perturbation. After each
epoch labels are refurbished: images the other network now predicts confidently take
that label and join the clean set. The victim averages the two networks' memberships.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from clusterattack.victims.augment import STRONGER, WEAK, AugmentConfig, augment
from clusterattack.victims.backbones import BackboneConfig, check_model_config
from clusterattack.victims.base import ClusteringModel
from clusterattack.victims.losses import soft_cross_entropy
from clusterattack.victims.neighbors import mine_neighbors, neighbor_agreement
from clusterattack.victims.scan import (
    SCAN,
    SCANConfig,
    SCANRecipe,
    param_groups,
    scan_fingerprint,
    train_scan,
)
from clusterattack.victims.training import (
    MeanMeter,
    Stage,
    TrainContext,
    TrainData,
    TrainOutcome,
    cached,
    has_checkpoint,
    predict_batches,
    run_stages,
    train_features,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RUCConfig:
    """Architecture: two SCAN networks (backbone + linear head) of the same shape."""

    num_clusters: int
    input_shape: tuple[int, int, int]
    backbone: BackboneConfig

    def __post_init__(self) -> None:
        check_model_config("ruc", self.num_clusters, self.input_shape, self.backbone)


class RUC(ClusteringModel):
    """Two co-trained SCAN networks; memberships are the mean of their softmaxes."""

    name = "ruc"

    def __init__(self, config: RUCConfig) -> None:
        super().__init__(config, config.num_clusters, config.input_shape)
        scan_cfg = SCANConfig(config.num_clusters, config.input_shape, config.backbone)
        self.nets = nn.ModuleList([SCAN(scan_cfg), SCAN(scan_cfg)])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.nets[0].features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # log of the averaged memberships, so softmax(forward) is exactly that average.
        probs = torch.stack([torch.softmax(net(x), dim=1) for net in self.nets]).mean(0)
        return torch.log(probs.clamp_min(1e-12))


@dataclass(frozen=True)
class RUCRecipe:
    """RUC's recipe on top of ``scan`` (whose result is reused from the cache when present).

    ``steps_per_epoch``: co-training steps per epoch (None: one pass over the training set).
    ``adv_eps``: L2 size of the VAT perturbation per image (pixels in [0, 1]).
    """

    scan: SCANRecipe = field(default_factory=SCANRecipe)
    epochs: int = 1
    steps_per_epoch: int | None = 150
    batch_size: int = 128
    lr: float = 1e-4
    head_lr: float = 1e-3
    confidence: float = 0.95
    num_neighbors: int = 20
    agreement: float = 0.8
    smoothing: float = 0.2
    sharpen_temperature: float = 0.5
    unlabeled_weight: float = 1.0
    adv_eps: float = 1.0
    adv_xi: float = 1e-6
    adv_weight: float = 1.0
    refurbish_confidence: float = 0.99
    weak_view: AugmentConfig = WEAK
    strong_view: AugmentConfig = STRONGER

    def __post_init__(self) -> None:
        if (
            self.epochs < 0
            or self.batch_size < 4
            or (self.steps_per_epoch is not None and self.steps_per_epoch < 1)
        ):
            raise ValueError(
                f"ruc recipe needs epochs >= 0, batch_size >= 4, steps_per_epoch >= 1; got {self}"
            )
        for key in ("confidence", "agreement", "refurbish_confidence"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"{key} must lie in (0, 1], got {getattr(self, key)}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must lie in [0, 1), got {self.smoothing}")

    @classmethod
    def preset(cls, name: str) -> RUCRecipe:
        if name == "demo":
            return cls()
        if name == "full":
            return cls(scan=SCANRecipe.preset("full"), epochs=200, steps_per_epoch=None)
        raise ValueError(f"unknown preset {name!r}, expected 'demo' or 'full'")


def vat_loss(
    net: nn.Module, x: torch.Tensor, logits: torch.Tensor, eps: float, xi: float
) -> torch.Tensor:
    """Virtual adversarial consistency: KL(p(x) || p(x + r_adv)), r_adv from one power iteration."""
    target = torch.softmax(logits.detach(), dim=1)
    d = torch.randn_like(x)
    d = xi * d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    d.requires_grad_(True)
    dist = F.kl_div(torch.log_softmax(net(x + d), dim=1), target, reduction="batchmean")
    (grad,) = torch.autograd.grad(dist, d)
    r_adv = eps * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return F.kl_div(
        torch.log_softmax(net((x + r_adv).clamp(0, 1)), dim=1), target, reduction="batchmean"
    )


class RUCStage(Stage):
    """Co-training of the two networks with clean/noisy splits chosen by each other."""

    name = "ruc"

    def __init__(self, recipe: RUCRecipe) -> None:
        super().__init__(recipe.epochs)
        self.recipe = recipe
        self.labels: list[torch.Tensor] = []
        self.clean: list[torch.Tensor] = []

    def start(self, model, data, ctx, state):
        r = self.recipe
        self.optimizers = [
            torch.optim.Adam(param_groups(net, r.lr, r.head_lr, 1e-4)) for net in model.nets
        ]
        self.optimizer = None
        if state:
            for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
                opt.load_state_dict(s)
            self.labels, self.clean = state["labels"], state["clean"]
            return
        probs = [self._probs(net, data, ctx) for net in model.nets]
        conf, labels = probs[0].max(1)
        agree = neighbor_agreement(
            labels, mine_neighbors(train_features(model.nets[0], data, ctx), r.num_neighbors)
        )
        # Net 0 learns from the confidence-selected set, net 1 from the metric-selected one;
        # both criteria start on the same SCAN model but diverge as each net is refurbished.
        self.labels = [labels.clone(), labels.clone()]
        self.clean = [conf >= r.confidence, agree >= r.agreement]
        for i, mask in enumerate(self.clean):
            if int(mask.sum()) < r.batch_size:
                self.clean[i] = conf >= conf.quantile(0.5)
        log.info("ruc: clean fractions %s", [round(float(m.float().mean()), 3) for m in self.clean])

    def state_dict(self):
        return {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "labels": self.labels,
            "clean": self.clean,
        }

    @staticmethod
    def _probs(net, data, ctx):
        net.eval()
        p = predict_batches(
            lambda x: torch.softmax(net(x), 1), data.train_images, ctx.device, ctx.eval_batch_size
        )
        net.train()
        return p

    def _smoothed(self, labels: torch.Tensor, k: int) -> torch.Tensor:
        eps = self.recipe.smoothing
        return F.one_hot(labels, k).float() * (1 - eps) + eps / k

    def run_epoch(self, model, data, ctx, epoch):
        r = self.recipe
        k = model.num_clusters
        steps = r.steps_per_epoch or max(1, data.num_train // r.batch_size)
        half = r.batch_size // 2
        meter = MeanMeter()
        for _ in tqdm(
            range(steps),
            desc=f"ruc {epoch + 1}/{r.epochs}",
            leave=False,
            disable=not ctx.progress,
            mininterval=10.0,
        ):
            for a, (net, opt) in enumerate(zip(model.nets, self.optimizers, strict=True)):
                clean_idx = torch.nonzero(self.clean[a]).squeeze(1)
                noisy_idx = torch.nonzero(~self.clean[a]).squeeze(1)
                li = clean_idx[torch.randint(0, clean_idx.numel(), (half,))]
                xl = augment(data.batch(li, ctx.device), r.strong_view)
                logits_l = net(xl)
                sup = soft_cross_entropy(
                    logits_l, self._smoothed(self.labels[a][li].to(ctx.device), k)
                )
                unsup = torch.zeros((), device=ctx.device)
                if noisy_idx.numel():
                    ui = noisy_idx[torch.randint(0, noisy_idx.numel(), (half,))]
                    xu = data.batch(ui, ctx.device)
                    with torch.no_grad():
                        weak = augment(xu, r.weak_view)
                        guess = torch.stack([torch.softmax(m(weak), 1) for m in model.nets]).mean(0)
                        guess = guess ** (1 / r.sharpen_temperature)
                        guess = guess / guess.sum(1, keepdim=True)
                    unsup = soft_cross_entropy(net(augment(xu, r.strong_view)), guess)
                adv = vat_loss(net, xl, logits_l, r.adv_eps, r.adv_xi)
                loss = sup + r.unlabeled_weight * unsup + r.adv_weight * adv
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                meter.add(**{f"loss_net{a}": loss.detach(), f"adv_net{a}": adv.detach()})
        self._refurbish(model, data, ctx)
        out = meter.means()
        out["loss"] = (out.get("loss_net0", 0.0) + out.get("loss_net1", 0.0)) / 2
        out["clean_fraction"] = float(torch.stack(self.clean).float().mean())
        return out

    def _refurbish(self, model, data, ctx) -> None:
        """Co-refurbishing: what the other net now predicts confidently becomes a clean label."""
        probs = [self._probs(net, data, ctx) for net in model.nets]
        for a in range(2):
            conf, pred = probs[1 - a].max(1)
            sure = conf >= self.recipe.refurbish_confidence
            self.labels[a] = torch.where(sure, pred, self.labels[a])
            self.clean[a] = self.clean[a] | sure


def train_ruc(model: RUC, data: TrainData, recipe: RUCRecipe, ctx: TrainContext) -> TrainOutcome:
    """SCAN (cached when the SCAN victim was trained with the same recipe and seed) -> RUC co-training."""
    info: dict = {}
    if not has_checkpoint(ctx):
        base = SCAN(SCANConfig(model.num_clusters, model.input_shape, model.config.backbone))
        scan_fp = scan_fingerprint(base, data, recipe.scan, ctx.seed)

        def build(child: TrainContext) -> dict:
            c0 = time.process_time()
            outcome = train_scan(base, data, recipe.scan, child)
            return {
                "state": base.state_dict(),
                "wall_s": sum(h["epoch_s"] for h in outcome.history),
                "cpu_s": time.process_time() - c0,
                "history": outcome.history,
                "info": outcome.info,
            }

        result, was_cached = cached(ctx, "scan", scan_fp, build)
        for net in model.nets:
            net.load_state_dict(result["state"])
        info = {
            "scan_wall_s": result["wall_s"],
            "scan_cpu_s": result.get("cpu_s", 0.0),
            "scan_cached": was_cached,
            "scan_nmi": result["history"][-1]["nmi"] if result["history"] else float("nan"),
            **result["info"],
        }
    history = run_stages(
        model,
        [RUCStage(recipe)],
        data,
        ctx,
        scan_fingerprint(model, data, recipe, ctx.seed),
        tag="ruc",
    )
    return TrainOutcome(history, info)
