"""MiCE: Mixture of Contrastive Experts (Tsai et al., ICLR 2021), trained EM-style.

A gating network maps an image to an embedding g(x) on the sphere and scores it against
fixed, maximally separated gating prototypes omega_k: pi_k(x) = softmax_k(omega_k . g / kappa)
is the prior over the K clusters. Each cluster has an expert: an embedding f_k(x) trained
by instance discrimination against keys v_k from a momentum (EMA) teacher, with an expert
prototype mu_k in the positive logit: phi_k = softmax over (f_k . v_k + v_k . mu_k) / tau
against a queue of negatives. E-step: posterior q(k | x) ~ pi_k * phi_k(positive).
M-step: minimise the negative ELBO  -sum_k q_k (log pi_k + log phi_k - log q_k) by SGD,
and set mu_k to the normalised sum of the teacher keys assigned to k (closed form, each
epoch). The victim's memberships are the posterior with the image's own embedding as key:
softmax_k(log pi_k + f_k . mu_k / tau), differentiable end to end.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from clusterattack.victims.augment import STRONG, AugmentConfig, augment
from clusterattack.victims.backbones import Backbone, BackboneConfig, check_model_config, mlp
from clusterattack.victims.base import ClusteringModel
from clusterattack.victims.pretext import PretextRecipe
from clusterattack.victims.scan import init_from_pretext, scan_fingerprint
from clusterattack.victims.training import (
    MeanMeter,
    Stage,
    TrainContext,
    TrainData,
    TrainOutcome,
    batches,
    run_stages,
    train_features,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MiCEConfig:
    """Architecture: backbone, embedding size, temperatures tau (experts) and kappa (gating).

    tau = kappa = 1 as in MiCE's released training script. At 0.2 the experts' likelihood,
    five times sharper, outweighed the gate in every E-step: on the demo the EM epochs then
    lost NMI after the k-means warm start (0.609 -> 0.580 over five epochs); at 1 they
    hold it (0.603 -> 0.602).
    """

    num_clusters: int
    input_shape: tuple[int, int, int]
    backbone: BackboneConfig
    embed_dim: int = 128
    tau: float = 1.0
    kappa: float = 1.0

    def __post_init__(self) -> None:
        check_model_config("mice", self.num_clusters, self.input_shape, self.backbone)
        if self.embed_dim < self.num_clusters:
            # The fixed gating prototypes form a regular simplex, which needs K <= D.
            raise ValueError(
                f"mice: embed_dim ({self.embed_dim}) must be >= num_clusters ({self.num_clusters})"
            )
        if self.tau <= 0 or self.kappa <= 0:
            raise ValueError(f"mice: tau and kappa must be positive, got {self.tau}, {self.kappa}")


def simplex_prototypes(k: int, dim: int, seed: int = 0) -> torch.Tensor:
    """K unit vectors in R^dim with pairwise cosine -1/(K-1): MiCE's max-Mahalanobis gating centres."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen))
    vertices = basis.t() - basis.t().mean(0, keepdim=True)
    return F.normalize(vertices, dim=1)


class MiCE(ClusteringModel):
    """Backbone -> gating embedding g and K expert embeddings f_k; buffers omega (fixed) and mu."""

    name = "mice"

    def __init__(self, config: MiCEConfig) -> None:
        super().__init__(config, config.num_clusters, config.input_shape)
        self.backbone = Backbone(config.backbone)
        d, k, e = self.backbone.out_dim, config.num_clusters, config.embed_dim
        self.gate = mlp(d, d, e)
        self.experts = mlp(d, d, k * e)
        self.register_buffer("gating_prototypes", simplex_prototypes(k, e))
        self.register_buffer("expert_prototypes", F.normalize(torch.randn(k, e), dim=1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def embed(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features -> (gating logits N x K, expert embeddings N x K x D, normalised)."""
        cfg = self.config
        g = F.normalize(self.gate(h), dim=1)
        gating_logits = g @ self.gating_prototypes.t() / cfg.kappa
        f = F.normalize(self.experts(h).view(h.shape[0], cfg.num_clusters, cfg.embed_dim), dim=2)
        return gating_logits, f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gating_logits, f = self.embed(self.backbone(x))
        expert_fit = torch.einsum("nkd,kd->nk", f, self.expert_prototypes) / self.config.tau
        return torch.log_softmax(gating_logits, dim=1) + expert_fit


@dataclass(frozen=True)
class MiCERecipe:
    """MiCE's recipe: SGD on the ELBO, EMA teacher (momentum ``ema``), a queue of ``queue_size`` keys.

    ``init_from_pretext`` starts the backbone from the shared SimCLR pretext: the demo's
    CPU budget has no room for MiCE's own 1,000 epochs from scratch (``full`` trains
    from scratch as the paper does). With a pretext, ``gate_warmup_epochs`` first fit the
    gate to k-means clusters of the pretext features: from a random gate, a few EM
    epochs only reinforce whatever partition the random gate drew (NMI ~0.39 here).

    Demo EM settings, measured here (seed 0, one thread, 1 anchored + 3 annealed + 1 free
    epoch): with tau = kappa = 0.2 every step size lost NMI after the warm start (SGD 0.05:
    0.58; 0.002: 0.597 at best); with MiCE's tau = kappa = 1 the EM epochs gain instead:
    0.602 at SGD 0.002, 0.611 at 0.01 (rising every epoch: 0.597, 0.603, 0.609, 0.611),
    0.612 at 0.05 (peak 0.615 after two epochs). The demo steps at 0.01.
    """

    pretext: PretextRecipe = field(default_factory=PretextRecipe)
    init_from_pretext: bool = True
    # Epochs fitting the gate (and the expert prototypes) to k-means of the pretext
    # features before EM; 0 starts EM from a random gate, as MiCE does from scratch.
    gate_warmup_epochs: int = 10
    gate_warmup_lr: float = 1e-3
    # First EM epochs whose E-step is the warm-up's k-means assignment: the experts
    # are random after warm-up, and their noise would otherwise drive the posterior.
    anchored_epochs: int = 1
    # Deterministic annealing EM (Ueda and Nakano, 1998) after the anchored epochs: the
    # E-step of free epoch j (0-based) of ``anneal_epochs`` weighs the experts'
    # likelihood by beta = (j + 1) / (anneal_epochs + 1), q ~ pi * phi^beta; later epochs
    # use MiCE's own E-step (beta = 1).
    anneal_epochs: int = 3
    epochs: int = 5
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    ema: float = 0.99
    queue_size: int = 2048
    view: AugmentConfig = STRONG

    def __post_init__(self) -> None:
        if (
            self.gate_warmup_epochs < 0
            or self.gate_warmup_lr <= 0
            or self.anchored_epochs < 0
            or self.anneal_epochs < 0
        ):
            raise ValueError(
                "mice recipe needs gate_warmup_epochs >= 0, gate_warmup_lr > 0, "
                "anchored_epochs >= 0 and anneal_epochs >= 0; got "
                f"{self.gate_warmup_epochs}, {self.gate_warmup_lr}, {self.anchored_epochs}, "
                f"{self.anneal_epochs}"
            )
        if self.epochs < 0 or self.batch_size < 2 or self.lr <= 0 or not 0 <= self.ema < 1:
            raise ValueError(
                f"mice recipe needs epochs >= 0, batch_size >= 2, lr > 0, 0 <= ema < 1; got {self}"
            )
        if self.queue_size < self.batch_size:
            raise ValueError(
                f"queue_size ({self.queue_size}) must be >= batch_size ({self.batch_size})"
            )

    @classmethod
    def preset(cls, name: str) -> MiCERecipe:
        if name == "demo":
            return cls()
        if name == "full":
            return cls(
                init_from_pretext=False,
                gate_warmup_epochs=0,
                anchored_epochs=0,
                anneal_epochs=0,
                epochs=1000,
                lr=1.0,
                ema=0.999,
                queue_size=16384,
            )
        raise ValueError(f"unknown preset {name!r}, expected 'demo' or 'full'")


def mice_elbo(
    gating_logits: torch.Tensor,
    f: torch.Tensor,
    v: torch.Tensor,
    mu: torch.Tensor,
    queue: torch.Tensor,
    tau: float,
    posterior: torch.Tensor | None = None,
    beta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative ELBO of MiCE and the posterior q(k | x) (N x K, no gradient).

    f, v: N x K x D student embeddings and teacher keys; mu: K x D expert prototypes;
    queue: Q x K x D negative keys. ``posterior`` replaces the E-step (anchored epochs);
    ``beta`` < 1 tempers the experts' likelihood in the E-step (annealed epochs).
    """
    log_pi = torch.log_softmax(gating_logits, dim=1)
    pos = (torch.einsum("nkd,nkd->nk", f, v) + torch.einsum("nkd,kd->nk", v, mu)).unsqueeze(2)
    neg = torch.einsum("nkd,qkd->nkq", f, queue) + torch.einsum("qkd,kd->kq", queue, mu).unsqueeze(
        0
    )
    log_phi = torch.log_softmax(torch.cat([pos, neg], dim=2) / tau, dim=2)[:, :, 0]  # N x K
    if posterior is None:
        with torch.no_grad():
            posterior = torch.softmax(log_pi + beta * log_phi, dim=1)
    loss = -(posterior * (log_pi + log_phi - torch.log(posterior.clamp_min(1e-12)))).sum(1).mean()
    return loss, posterior


class MiCEGateWarmupStage(Stage):
    """Gate fitted to k-means of the (frozen) pretext features; expert prototypes from its clusters.

    Features are computed once on clean training images; the gate learns to send each
    image to the gating prototype of its k-means cluster (cross-entropy on pi(x)), and
    mu_k starts as the normalised mean expert-k embedding of the images in cluster k,
    so the first E-step already agrees with a sensible partition.
    """

    name = "mice_gate"
    eval_every = 5

    def __init__(self, recipe: MiCERecipe, shared: dict) -> None:
        super().__init__(recipe.gate_warmup_epochs)
        self.recipe = recipe
        self.shared = shared
        self.feats: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    def start(self, model, data, ctx, state):
        from sklearn.cluster import KMeans

        self.optimizer = torch.optim.Adam(model.gate.parameters(), lr=self.recipe.gate_warmup_lr)
        self.feats = train_features(model, data, ctx).to(ctx.device)
        if self.restore(state):
            self.shared["labels"] = self.labels
            return
        k = model.config.num_clusters
        normed = F.normalize(self.feats.float(), dim=1).cpu().numpy()
        self.labels = torch.as_tensor(
            KMeans(k, n_init=3, random_state=ctx.seed).fit_predict(normed),
            dtype=torch.long,
            device=ctx.device,
        )
        with torch.no_grad():
            _, f = model.embed(self.feats)
            hard = F.one_hot(self.labels, k).float()
            centres = torch.einsum("nk,nkd->kd", hard, f.float())
            used = centres.norm(dim=1) > 0
            model.expert_prototypes[used] = F.normalize(centres[used], dim=1)
        self.shared["labels"] = self.labels

    def extra_state(self):
        return {"labels": self.labels}

    def load_extra_state(self, state):
        self.labels = state["labels"]

    def run_epoch(self, model, data, ctx, epoch):
        r = self.recipe
        meter = MeanMeter()
        for idx in batches(data.num_train, r.batch_size, f"mice-gate {epoch + 1}/{self.epochs}", ctx):
            idx = idx.to(ctx.device)
            g = F.normalize(model.gate(self.feats[idx]), dim=1)
            logits = g @ model.gating_prototypes.t() / model.config.kappa
            loss = F.cross_entropy(logits.float(), self.labels[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            meter.add(loss=loss.detach())
        return meter.means()


class MiCEStage(Stage):
    """EM epochs: E-step posteriors and SGD M-step per batch, closed-form mu update per epoch."""

    name = "mice"

    def __init__(self, recipe: MiCERecipe, shared: dict | None = None) -> None:
        super().__init__(recipe.epochs)
        self.recipe = recipe
        self.shared = shared if shared is not None else {}
        self.teacher: MiCE | None = None
        self.queue: torch.Tensor | None = None
        self.queue_pos = 0

    def start(self, model, data, ctx, state):
        r = self.recipe
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay
        )
        self.teacher = copy.deepcopy(model).to(ctx.device)
        self.teacher.requires_grad_(False)
        if not self.restore(state):
            self.queue = self._initial_queue(data, ctx)

    @torch.no_grad()
    def _initial_queue(self, data: TrainData, ctx: TrainContext) -> torch.Tensor:
        """Teacher keys of random training views: a queue of random vectors would make the first
        epoch's negatives trivially easy and its loss incomparable with the later ones."""
        r = self.recipe
        idx = torch.randint(0, data.num_train, (r.queue_size,))
        keys = []
        for chunk in idx.split(ctx.eval_batch_size):
            _, v = self.teacher.embed(
                self.teacher.backbone(augment(data.batch(chunk, ctx.device), r.view))
            )
            keys.append(v)
        return torch.cat(keys)

    def extra_state(self):
        return {
            "teacher": self.teacher.state_dict(),
            "queue": self.queue,
            "queue_pos": self.queue_pos,
            "labels": self.shared.get("labels"),
        }

    def load_extra_state(self, state):
        self.teacher.load_state_dict(state["teacher"])
        self.queue, self.queue_pos = state["queue"], state["queue_pos"]
        if state.get("labels") is not None:
            self.shared["labels"] = state["labels"]

    @torch.no_grad()
    def _momentum_update(self, model: MiCE) -> None:
        m = self.recipe.ema
        for t, s in zip(self.teacher.parameters(), model.parameters(), strict=True):
            t.mul_(m).add_(s.detach(), alpha=1 - m)
        for t, s in zip(self.teacher.buffers(), model.buffers(), strict=True):
            t.copy_(s)

    def beta(self, epoch: int) -> float:
        """The E-step's weight on the experts' likelihood in EM epoch ``epoch`` (0-based)."""
        r = self.recipe
        annealed = epoch - (r.anchored_epochs if self.shared.get("labels") is not None else 0)
        if 0 <= annealed < r.anneal_epochs:
            return (annealed + 1) / (r.anneal_epochs + 1)
        return 1.0

    def run_epoch(self, model, data, ctx, epoch):
        r = self.recipe
        cfg = model.config
        meter = MeanMeter()
        centre_sum = torch.zeros(cfg.num_clusters, cfg.embed_dim, device=ctx.device)
        beta = self.beta(epoch)
        for idx in batches(data.num_train, r.batch_size, f"mice {epoch + 1}/{r.epochs}", ctx):
            x = data.batch(idx, ctx.device)
            with torch.no_grad():
                _, v = self.teacher.embed(self.teacher.backbone(augment(x, r.view)))
            # One student pass feeds both the gate and the experts (MiCE uses a third view for
            # the gate; sharing it saves a third of the compute on a CPU budget).
            gating_logits, f = model.embed(model.backbone(augment(x, r.view)))
            anchor = None
            if epoch < r.anchored_epochs and self.shared.get("labels") is not None:
                anchor = F.one_hot(self.shared["labels"][idx.to(ctx.device)], cfg.num_clusters).float()
            loss, posterior = mice_elbo(
                gating_logits, f, v, model.expert_prototypes, self.queue, cfg.tau, anchor, beta
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self._momentum_update(model)
            with torch.no_grad():
                n = v.shape[0]
                pos = (torch.arange(n, device=ctx.device) + self.queue_pos) % r.queue_size
                self.queue[pos] = v.to(self.queue.dtype)  # bf16 keys under autocast
                self.queue_pos = int((self.queue_pos + n) % r.queue_size)
                centre_sum += torch.einsum("nk,nkd->kd", posterior.float(), v.float())
            meter.add(
                loss=loss.detach(),
                clusters_in_batch=float(posterior.argmax(1).unique().numel()),
                **({"beta": beta} if anchor is None else {}),
            )
        with torch.no_grad():
            # Closed-form M-step for the expert prototypes (MiCE Eq. 13): the posterior-weighted
            # mean direction of the keys (hard argmax weights were 0.009 NMI worse on the demo);
            # empty experts keep theirs.
            used = centre_sum.norm(dim=1) > 0
            model.expert_prototypes[used] = F.normalize(centre_sum[used], dim=1)
        return meter.means()


def train_mice(model: MiCE, data: TrainData, recipe: MiCERecipe, ctx: TrainContext) -> TrainOutcome:
    """(Optionally) shared pretext backbone -> MiCE EM epochs."""
    info = init_from_pretext(model, recipe.pretext, data, ctx) if recipe.init_from_pretext else {}
    shared: dict = {}
    stages: list[Stage] = [MiCEStage(recipe, shared)]
    if recipe.init_from_pretext and recipe.gate_warmup_epochs > 0:
        stages.insert(0, MiCEGateWarmupStage(recipe, shared))
    history = run_stages(
        model,
        stages,
        data,
        ctx,
        scan_fingerprint(model, data, recipe, ctx.seed),
        tag="mice",
    )
    return TrainOutcome(history, info)
