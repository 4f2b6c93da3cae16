"""Surrogate gradient source: local models distilled from queried memberships, refreshed in rounds.

The attacker queries the victim's memberships of training images once (the cached M_i),
distils an ensemble of small CNNs on them (soft-label KL plus logit matching, with shift
and flip augmentation), trains the generator through the ensemble, and in each refresh
round queries the victim on the generator's current adversarial images and fine-tunes the
ensemble on them, so that it follows the victim where the attack actually goes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from clusterattack.attacks.config import SurrogateConfig
from clusterattack.attacks.gradients.base import GradientSource, query_memberships
from clusterattack.attacks.gradients.pretext import (
    PretextSurrogate,
    attacker_backbones,
    pretext_surrogate_shell,
)
from clusterattack.precision import autocast
from clusterattack.victims.base import Victim

__all__ = ["SurrogateNet", "SurrogateSource", "distill", "refresh_epochs", "without_queried_points"]

log = logging.getLogger(__name__)

_LOG_FLOOR = math.log(1e-8)


class SurrogateNet(nn.Module):
    """A CNN from images in [0, 1] to K cluster logits, sized from the input shape.

    ``arch`` "convnet": four conv-BN-ReLU layers (strides 1, 2, 2, 2; width w to 8w),
    average pooling and a two-layer head, the plain backbone deep clustering models use
    on small images. "small": a stem and conv pairs per stage (w to 8w), a little deeper
    and narrower. Neither needs anything from the victim but its input shape and K.
    """

    def __init__(
        self, input_shape: tuple[int, int, int], num_clusters: int, width: int = 32, arch: str = "convnet"
    ) -> None:
        super().__init__()
        c, h, w = (int(v) for v in input_shape)
        stages = max(1, min(3, int(math.log2(min(h, w) / 3.5))))  # 28 -> 14 -> 7 -> 4

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        layers = block(c, width, 1)
        ch = width
        for _ in range(stages):
            if arch == "small":
                layers += block(ch, 2 * ch, 2) + block(2 * ch, 2 * ch, 1)
            elif arch == "convnet":
                layers += block(ch, 2 * ch, 2)
            else:
                raise ValueError(f"surrogate arch must be 'convnet' or 'small', got {arch!r}")
            ch *= 2
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(ch, ch), nn.ReLU(inplace=True), nn.Linear(ch, num_clusters))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Centre the [0, 1] input; the victim's own normalisation is unknown to the attacker.
        return self.head(self.features(2 * x - 1))


def _shift_flip(
    x: torch.Tensor, generator: torch.Generator, max_shift: float = 2.0, flip: bool = True
) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels and (optionally) horizontal flip, per image.

    Deep clustering victims are trained to be invariant to crops and flips, so a
    membership stays a valid target under these small moves; they multiply the few
    queried points the surrogate sees. Differentiable with respect to ``x``.
    """
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta[:, 0, 0] = flip
    theta[:, 1, 1] = 1.0
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift
    theta[:, 0, 2] = shift[:, 0] * 2 / w
    theta[:, 1, 2] = shift[:, 1] * 2 / h
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _distill_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    log_q = F.log_softmax(logits, dim=1)
    kl = F.kl_div(log_q, target, reduction="batchmean")
    if kind == "kl":
        return kl
    # Matching centred log-memberships recovers the victim's logits up to a constant, so
    # the surrogate learns the margins (and hence the gradient directions), not just the
    # argmax that near one-hot memberships otherwise reduce the KL to.
    t = torch.log(target.clamp_min(1e-8)).clamp_min(_LOG_FLOOR)
    t = t - t.mean(dim=1, keepdim=True)
    s = log_q.clamp_min(_LOG_FLOOR)
    s = s - s.mean(dim=1, keepdim=True)
    return kl + 0.05 * (s - t).pow(2).mean(dim=1).mean()


def distill(
    model: SurrogateNet,
    images: torch.Tensor,
    targets: torch.Tensor,
    epochs: int,
    config: SurrogateConfig,
    generator: torch.Generator,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    precision: str = "fp32",
) -> float:
    """Fit ``model`` to the memberships ``targets`` of ``images``; returns the last epoch's loss."""
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps = epochs * math.ceil(images.shape[0] / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=max(steps, 1))
    last = float("nan")
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        total, count = 0.0, 0
        for start in range(0, images.shape[0], config.batch_size):
            idx = order[start : start + config.batch_size]
            if idx.numel() < 2:
                continue  # batch norm needs two images
            x = images[idx].to(device)
            if config.augment:
                x = _shift_flip(x, generator)
            with autocast(device, precision):
                logits = model(x)
            loss = _distill_loss(logits.float(), targets[idx].to(device), config.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
        last = total / max(count, 1)
        if progress is not None:
            progress(1)
    model.eval()
    return last


def refresh_epochs(epochs: int, rounds: int) -> list[int]:
    """Generator epochs (1-based) after which the surrogate is refreshed: evenly spread."""
    if rounds <= 0:
        return []
    marks = sorted({max(1, min(epochs, round((r + 1) * epochs / (rounds + 1)))) for r in range(rounds)})
    return marks


def without_queried_points(state: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A gradient-source state (surrogate, or estimate with its prior) without the points
    queried for the surrogate (refresh rounds, noise points): the fine-tuned weights, the
    optimisers and the RNG in a few MB, where the points grow with every refresh round
    (15,000 CIFAR-sized images are 184 MB). For checkpoints written every epoch to remote
    storage (Tune trials). Resuming from it keeps the ensemble as fine-tuned; only the later
    refresh rounds no longer revisit the earlier rounds' points.
    """
    if not state:
        return None if state is None else {}
    out = {k: v for k, v in state.items() if k not in ("noise", "refresh")}
    if "prior" in out:
        out["prior"] = without_queried_points(out["prior"])
    return out


class SurrogateSource(GradientSource):
    """Gradient source ``surrogate``: autograd through a distilled ensemble (mean membership).

    With ``config.online`` every generator step also queries the victim on the batch's
    adversarial images: the attack term is then evaluated on the victim's own
    memberships (exact value) while its gradient flows through the surrogate
    (straight-through), and the surrogate takes one fine-tuning step on exactly those
    points, so it keeps following the victim wherever the generator goes.
    """

    name = "surrogate"
    black_box = True

    def __init__(
        self,
        victim: Victim,
        config: SurrogateConfig,
        eps: float,
        norm: str,
        epochs: int,
        seed: int,
        query_batch: int,
        device: str = "cpu",
        precision: str = "fp32",
    ) -> None:
        self.victim = victim
        self.precision = precision
        self.config = config
        self.eps = eps
        self.norm = norm
        self.query_batch = query_batch
        self.device = device
        self.exact_memberships = config.online
        self.generator = torch.Generator().manual_seed(seed + 104729)
        self.models: list[nn.Module] = []
        self.schedule = refresh_epochs(epochs, config.refresh_rounds)
        self._pool_x: list[torch.Tensor] = []
        self._pool_y: list[torch.Tensor] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._agree_sum, self._agree_count = 0.0, 0
        self._seed = seed
        self._distilled = 0  # training images at the head of the clean pool
        # Distinct from any seed a victim is trained with in this project (0, 1, ...).
        self.pretext_seed = seed + 7919

    def pretext_seeds(self) -> list[int]:
        """The pretext seed of each ensemble member's attacker backbone (one backbone each)."""
        return [self.pretext_seed + m for m in range(self.config.ensemble)]

    def _noise_points(self, images: torch.Tensor, count: int) -> torch.Tensor:
        idx = torch.randint(0, images.shape[0], (count,), generator=self.generator)
        x = images[idx]
        if self.norm == "linf":
            noise = (torch.rand(x.shape, generator=self.generator) * 2 - 1) * self.eps
        else:
            noise = torch.randn(x.shape, generator=self.generator)
            noise = noise * (self.eps / noise.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, 1, 1, 1)
        return (x + noise).clamp(0.0, 1.0)

    def prepare(self, images: torch.Tensor, clean_memberships: torch.Tensor, progress: bool = False) -> None:
        from tqdm.auto import tqdm

        n = min(self.config.distill_queries, images.shape[0])
        xs, ys = images[:n], clean_memberships[:n]
        if self.config.noise_queries:
            noisy = self._noise_points(images[:n], int(self.config.noise_queries))
            xs = torch.cat([xs, noisy])
            ys = torch.cat([ys, query_memberships(self.victim, noisy, self.query_batch)])
        self._pool_x, self._pool_y = [xs], [ys]
        self._distilled = n
        shape = tuple(images.shape[1:])
        k = clean_memberships.shape[1]
        bar = tqdm(
            total=self.config.ensemble * self.config.distill_epochs,
            desc="distil surrogate",
            disable=not progress,
            leave=False,
        )
        seeds = self.pretext_seeds()
        # The attacker's own contrastive backbones, trained on the images it holds (the pool
        # it queried) with seeds of their own: no label, no query, no victim weight.
        backbones = (
            attacker_backbones(images, self.config.pretext_epochs, seeds, self.device, progress)
            if self.config.arch == "pretext"
            else {}
        )
        for member in range(self.config.ensemble):
            torch.manual_seed(self._seed * 1000 + member)
            if backbones:
                model: nn.Module = PretextSurrogate(*backbones[seeds[member]], num_clusters=k)
            else:
                model = SurrogateNet(shape, k, self.config.width, self.config.arch)
            loss = distill(
                model, xs, ys, self.config.distill_epochs, self.config, self.generator,
                self.device, bar.update, precision=self.precision,
            )
            self.models.append(model)
            self._optimizers.append(torch.optim.Adam(model.parameters(), lr=self.config.lr * 0.25))
            log.info("surrogate %d distilled on %d points, loss %.4f", member, xs.shape[0], loss)
        bar.close()

    def state_dict(self) -> dict[str, Any]:
        """The ensemble as fine-tuned so far, its optimisers, its RNG and every point it queried
        beyond the cached clean memberships (noise points, refresh rounds): what ``resume``
        needs to go on as if never stopped. Live tensors, as ``train_generator``'s epoch state.
        """
        if not self.models:
            return {}
        n = self._distilled
        return {
            "name": self.name,
            "arch": self.config.arch,
            "distilled": n,
            "models": [model.state_dict() for model in self.models],
            "optimizers": [opt.state_dict() for opt in self._optimizers],
            "rng": self.generator.get_state(),
            # Copies: a slice is a view, and saving it would write the whole clean pool
            # (every training image) with it.
            "noise": (self._pool_x[0][n:].clone(), self._pool_y[0][n:].clone()),
            "refresh": list(zip(self._pool_x[1:], self._pool_y[1:], strict=True)),
        }

    def resume(
        self,
        images: torch.Tensor,
        clean_memberships: torch.Tensor,
        state: Mapping[str, Any],
        progress: bool = False,
    ) -> None:
        """Take back a ``state_dict()`` in place of ``prepare``: no distillation, no query, no
        attacker pretext (the weights come with the state)."""
        if not state:
            self.prepare(images, clean_memberships, progress)
            return
        n = min(self.config.distill_queries, images.shape[0])
        members = len(state.get("models", ()))
        saved = (state.get("name"), state.get("arch"), members, state.get("distilled"))
        if saved != (self.name, self.config.arch, self.config.ensemble, n):
            raise ValueError(
                f"the saved surrogate state ({saved[0]!r}, arch {saved[1]!r}, {members} member(s) "
                f"distilled on {saved[3]} images) does not fit this run (arch {self.config.arch!r}, "
                f"{self.config.ensemble} member(s) on {n}): it was made with another config or data set"
            )
        empty = (images[:0], clean_memberships[:0])
        noise_x, noise_y = state.get("noise", empty)  # absent: see without_queried_points
        refresh = state.get("refresh", [])
        self._pool_x = [torch.cat([images[:n], noise_x]), *(x for x, _ in refresh)]
        self._pool_y = [torch.cat([clean_memberships[:n], noise_y]), *(y for _, y in refresh)]
        self._distilled = n
        shape, k = tuple(int(v) for v in images.shape[1:]), clean_memberships.shape[1]
        self.models, self._optimizers = [], []
        for weights, opt_state in zip(state["models"], state["optimizers"], strict=True):
            if self.config.arch == "pretext":
                model: nn.Module = pretext_surrogate_shell(shape, k)
            else:
                model = SurrogateNet(shape, k, self.config.width, self.config.arch)
            model.load_state_dict(weights)
            model.to(self.device).eval()
            opt = torch.optim.Adam(model.parameters(), lr=self.config.lr * 0.25)
            opt.load_state_dict(opt_state)
            self.models.append(model)
            self._optimizers.append(opt)
        self.generator.set_state(state["rng"])
        log.info(
            "surrogate resumed: %d member(s), %s",
            len(self.models),
            f"{len(refresh)} refresh round(s) of queried points kept" if "refresh" in state
            else "saved without its queried points (later refresh rounds fine-tune on theirs only)",
        )

    def _agreement(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Argmax agreement of the ensemble with the victim's memberships ``y`` of ``x``."""
        if x.shape[0] == 0:
            return float("nan")
        with torch.no_grad():
            pred = self._ensemble_probs(x.to(self.device)).argmax(1).cpu()
        return float((pred == y.argmax(1)).float().mean())

    def _ensemble_probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.softmax(m(x), dim=1) for m in self.models]).mean(0)

    def memberships(self, x_adv: torch.Tensor) -> torch.Tensor:
        if not self.models:
            raise RuntimeError("surrogate used before prepare(): no model has been distilled")
        local = self._ensemble_probs(x_adv)
        if not self.config.online:
            return local
        idx = self._online_pick(local)
        asked = x_adv if idx is None else x_adv[idx]
        queried = query_memberships(self.victim, asked, self.query_batch).to(local.device)
        self._pending = (asked.detach().cpu(), queried.cpu())
        with torch.no_grad():
            mine = local if idx is None else local[idx]
            agree = (mine.argmax(1) == queried.argmax(1)).float()
        self._agree_sum += float(agree.sum())
        self._agree_count += int(agree.numel())
        # Straight-through: the victim's value where it was asked, the surrogate's Jacobian.
        if idx is None:
            return queried + local - local.detach()
        delta = torch.zeros_like(local)
        delta[idx] = queried - local[idx].detach()
        return local + delta

    def _online_pick(self, local: torch.Tensor) -> torch.Tensor | None:
        """Rows of the batch to ask the victim about (None: all): the ``online_fraction`` whose
        ensemble memberships lead least between their first and second cluster."""
        fraction = float(self.config.online_fraction)
        n = local.shape[0]
        if fraction >= 1.0 or n == 0:
            return None
        count = max(1, math.ceil(fraction * n))
        with torch.no_grad():
            top = local.topk(min(2, local.shape[1]), dim=1).values
            lead = top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0.0)
        return lead.argsort()[:count].sort().values

    def after_step(self) -> None:
        """Online fine-tuning on the points just queried."""
        if self._pending is None:
            return
        x_adv, y_adv = self._pending
        self._pending = None
        self.fit_step(x_adv, y_adv)

    def fit_step(self, x_new: torch.Tensor, y_new: torch.Tensor) -> None:
        """One fine-tuning step of every member on fresh victim answers plus as many clean points.

        The clean half keeps the surrogate from forgetting the data it was distilled on.
        """
        pick = torch.randint(0, self._pool_x[0].shape[0], (x_new.shape[0],), generator=self.generator)
        x = torch.cat([x_new.detach().cpu(), self._pool_x[0][pick]])
        y = torch.cat([y_new.detach().cpu(), self._pool_y[0][pick]])
        x, y = x.to(self.device), y.to(self.device)
        # Also called from inside an autograd backward pass, where grad mode is off.
        with torch.enable_grad():
            for model, opt in zip(self.models, self._optimizers, strict=True):
                model.train()
                with autocast(self.device, self.precision):
                    logits = model(x)
                loss = _distill_loss(logits.float(), y, self.config.loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                model.eval()

    def input_gradient(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """d/dx of sum_i weights_i . s(x_i), s the ensemble's memberships.

        The transfer prior of the estimate mode (and what the alignment benchmark measures).
        """
        with torch.enable_grad():
            x = x.detach().to(self.device).requires_grad_(True)
            probs = self._ensemble_probs(x)
            (grad,) = torch.autograd.grad((probs * weights.to(self.device)).sum(), x)
        return grad.detach()

    def end_of_epoch(
        self,
        epoch: int,
        perturb: Callable[[torch.Tensor], torch.Tensor],
        images: torch.Tensor,
    ) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._agree_count:
            out["surrogate_agreement_online"] = self._agree_sum / self._agree_count
            self._agree_sum, self._agree_count = 0.0, 0
        if epoch not in self.schedule:
            return out
        count = min(self.config.refresh_queries, images.shape[0])
        idx = torch.randperm(images.shape[0], generator=self.generator)[:count]
        x_adv = perturb(images[idx]).detach().cpu()
        y_adv = query_memberships(self.victim, x_adv, self.query_batch)
        # Agreement on points it has not been fitted to yet: how well it tracked the victim.
        before = self._agreement(x_adv, y_adv)
        self._pool_x.append(x_adv)
        self._pool_y.append(y_adv)
        # Fine-tune on every adversarial point so far plus as many clean ones, not on all
        # the clean data again: cheap, and the clean ones keep it from forgetting.
        adv_x, adv_y = torch.cat(self._pool_x[1:]), torch.cat(self._pool_y[1:])
        pick = torch.randint(0, self._pool_x[0].shape[0], (adv_x.shape[0],), generator=self.generator)
        fx = torch.cat([adv_x, self._pool_x[0][pick]])
        fy = torch.cat([adv_y, self._pool_y[0][pick]])
        # Queried adversarial points as they are: the victim answered for that exact image.
        tune = dataclasses.replace(self.config, lr=self.config.lr * 0.5, augment=False)
        for model in self.models:
            distill(
                model, fx, fy, self.config.refresh_epochs, tune, self.generator, self.device,
                precision=self.precision,
            )
        after = self._agreement(x_adv, y_adv)
        log.info("surrogate refresh at epoch %d: %d queries, agreement %.3f -> %.3f", epoch, count, before, after)
        out.update(surrogate_agreement_adv=before, surrogate_agreement_adv_after=after)
        return out

    def describe(self) -> dict:
        out = super().describe()
        out.update({f"surrogate.{k}": v for k, v in vars(self.config).items()})
        out["surrogate.refresh_after_epochs"] = ",".join(map(str, self.schedule))
        if self.config.arch == "pretext":
            out["surrogate.pretext_seeds"] = ",".join(map(str, self.pretext_seeds()))
        return out
