"""The attack on the decision-only album API (the paper's Face++ experiment), through an AlbumClient.

The attacker knows the data set but not the service's model. It trains its own deep
clustering model (CC by default) on the training split, trains the generator against
that surrogate (white-box on a model it owns: no query to the service), and only then
uploads images: for each of ``draws`` random draws of ``per_class`` test images per
class, one album of the clean images and one of their perturbed versions. NMI, ARI and
ACC of the service's groups against the true classes (used for scoring only) are
reported as mean and spread over the draws, with the group-size breakdown.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clusterattack.api.client import AlbumClient
from clusterattack.attacks.config import AttackConfig
from clusterattack.attacks.gan import AttackResult, perturb_images, train_generator
from clusterattack.metrics import clustering_scores, relative_drop

logger = logging.getLogger(__name__)

__all__ = [
    "ApiAttackConfig",
    "ApiAttackResult",
    "OfflineAttack",
    "attack_service",
    "evaluate_surrogate",
    "quantize_perturbed",
    "run_api_attack",
    "sample_draw",
    "train_offline",
    "train_surrogate",
]

_SCORES = ("nmi", "ari", "acc")


@dataclass(frozen=True)
class ApiAttackConfig:
    """Everything that defines one attack on the album API (logged as its parameters).

    ``dataset_options`` go to ``load_dataset`` (e.g. ``(("size", 32),)`` for an image
    folder such as Extended Yale B). ``attack`` must use the ``whitebox`` gradient
    source: its victim is the attacker's own surrogate, whose gradients it has.
    ``surrogate_epochs`` overrides the preset's epochs and ``surrogate_train_limit``
    trains on a seeded subset; the surrogate's per-epoch scores use
    ``surrogate_eval_limit`` test images (the experimenter's view, never a training
    signal). ``quantize`` uploads 8-bit pixel values as a photo upload would, rounding
    each perturbation towards zero so it stays within eps.
    """

    dataset: str
    dataset_options: tuple[tuple[str, Any], ...] = ()
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(gradient_source="whitebox"))
    draws: int = 10
    per_class: int = 10
    seed: int = 0
    quantize: bool = True
    surrogate_model: str = "cc"
    surrogate_preset: str = "demo"
    surrogate_epochs: int | None = None
    surrogate_train_limit: int | None = None
    surrogate_eval_limit: int | None = 2000
    surrogate_width: int | None = None
    device: str = "cpu"
    num_threads: int | None = None
    keep_albums: bool = False

    def __post_init__(self) -> None:
        from clusterattack.victims.registry import PRESETS, get_spec

        if not isinstance(self.attack, AttackConfig):
            raise ValueError(f"attack must be an AttackConfig, got {type(self.attack).__name__}")
        if self.attack.gradient_source != "whitebox":
            raise ValueError(
                "the generator is trained against the attacker's own surrogate, so attack.gradient_source "
                f"must be 'whitebox' (the service is never queried for it), got {self.attack.gradient_source!r}"
            )
        if not all(isinstance(o, tuple) and len(o) == 2 and isinstance(o[0], str) for o in self.dataset_options):
            raise ValueError(f"dataset_options must be (name, value) pairs, got {self.dataset_options!r}")
        for name in ("draws", "per_class"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        get_spec(self.surrogate_model)
        if self.surrogate_preset not in PRESETS:
            raise ValueError(f"surrogate_preset must be one of {PRESETS}, got {self.surrogate_preset!r}")
        for name, minimum in (
            ("surrogate_epochs", 0),
            ("surrogate_train_limit", 2),
            ("surrogate_eval_limit", 2),
            ("surrogate_width", 4),
            ("num_threads", 1),
        ):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise ValueError(f"{name} must be an integer >= {minimum} or None, got {value!r}")

    def flat(self) -> dict[str, Any]:
        """One level of keys (``attack.eps`` ...), the form MLflow params take."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "attack"}
        out.update({f"attack.{k}": v for k, v in self.attack.flat().items()})
        return out


@dataclass
class ApiAttackResult:
    """The draws, their summary, the service calls spent, and what was trained offline.

    ``service`` is whatever the experimenter recorded about the service (its hidden
    model, its grouping); the attack never reads it.
    """

    config: ApiAttackConfig
    draws: list[dict[str, Any]]
    summary: dict[str, float]
    counts: dict[str, int]
    surrogate: torch.nn.Module
    surrogate_scores: dict[str, float]
    generator_result: AttackResult
    service: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    surrogate_source: str = "trained"

    def record(self) -> dict[str, Any]:
        """Everything, JSON-ready: config, service, surrogate, counts, summary, draws."""
        return {
            "config": self.config.flat(),
            "service": self.service,
            "surrogate": {
                "model": self.config.surrogate_model,
                "source": self.surrogate_source,
                **self.surrogate_scores,
            },
            "generator": self.generator_result.summary(),
            "counts": self.counts,
            "summary": self.summary,
            "draws": self.draws,
            "timings_s": self.timings_s,
        }

    def table(self) -> str:
        """The before/after table (Markdown) and the group-size breakdown of every draw."""
        s, cfg = self.summary, self.config
        lines = [
            "| metric | clean albums | perturbed albums | relative drop of the mean |",
            "|---|---|---|---|",
        ]
        for key in _SCORES:
            lines.append(
                f"| {key.upper()} | {s[f'{key}_pre_mean']:.3f} ± {s[f'{key}_pre_std']:.3f} | "
                f"{s[f'{key}_post_mean']:.3f} ± {s[f'{key}_post_std']:.3f} | {100 * s[f'{key}_drop']:.1f}% |"
            )
        lines.append(
            f"| groups | {s['groups_pre_mean']:.1f} ± {s['groups_pre_std']:.1f} | "
            f"{s['groups_post_mean']:.1f} ± {s['groups_post_std']:.1f} | |"
        )
        lines.append(
            f"| largest group (share of album) | {100 * s['largest_group_pre_mean']:.0f}% | "
            f"{100 * s['largest_group_post_mean']:.0f}% | |"
        )
        lines.append(
            f"| surrogate NMI (attacker's own model) | {s['surrogate_nmi_pre_mean']:.3f} | "
            f"{s['surrogate_nmi_post_mean']:.3f} | |"
        )
        lines.append("")
        lines.append(
            f"{len(self.draws)} draws x {cfg.per_class} images per class; {cfg.attack.norm} eps "
            f"{cfg.attack.eps:g}; {self.counts.get('image_queries', 0)} image-queries in "
            f"{self.counts.get('calls', 0)} calls to the service."
        )
        lines.append("Group sizes, largest first (clean -> perturbed):")
        for row in self.draws:
            lines.append(f"  draw {row['draw']}: {row['group_sizes_pre']} -> {row['group_sizes_post']}")
        return "\n".join(lines)


def sample_draw(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` random images of every class, shuffled together."""
    labels = np.asarray(labels)
    picks = []
    for cls in np.unique(labels):
        pool = np.flatnonzero(labels == cls)
        if pool.size < per_class:
            raise ValueError(f"class {int(cls)} has {pool.size} test images, fewer than per_class={per_class}")
        picks.append(rng.choice(pool, size=per_class, replace=False))
    return rng.permutation(np.concatenate(picks))


def quantize_perturbed(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """``adv`` on the 8-bit grid of ``clean`` (itself on it), each pixel's change rounded towards 0.

    Rounding towards zero never makes a change larger, so every norm bound still holds.
    """
    steps = torch.trunc((adv - clean) * 255.0)
    return (clean + steps / 255.0).clamp(0.0, 1.0)


def train_surrogate(config: ApiAttackConfig, dataset: Any, progress: bool = True):
    """Train the attacker's own clustering model on the training split; (model, test scores)."""
    from clusterattack.victims.registry import get_spec
    from clusterattack.victims.training import (
        TrainContext,
        TrainData,
        evaluate_clustering,
        seed_everything,
    )

    spec = get_spec(config.surrogate_model)
    data = TrainData.from_dataset(
        dataset, train_limit=config.surrogate_train_limit, test_limit=config.surrogate_eval_limit, seed=config.seed
    )
    model_config = spec.config(data.input_shape, dataset.num_classes, config.surrogate_preset)
    if config.surrogate_width is not None:
        backbone = dataclasses.replace(model_config.backbone, width=config.surrogate_width)
        model_config = dataclasses.replace(model_config, backbone=backbone)
    overrides = {} if config.surrogate_epochs is None else {"epochs": config.surrogate_epochs}
    recipe = spec.recipe(config.surrogate_preset, **overrides)
    seed_everything(config.seed)
    model = spec.build(model_config)
    ctx = TrainContext(device=config.device, seed=config.seed, num_threads=config.num_threads, progress=progress)
    spec.train(model, data, recipe, ctx)
    scores = evaluate_clustering(model, data, ctx)
    logger.info("surrogate %s: %s", config.surrogate_model, scores)
    return model.eval(), scores


def evaluate_surrogate(config: ApiAttackConfig, model: torch.nn.Module, dataset: Any) -> dict[str, float]:
    """The surrogate's NMI/ARI/ACC on ``surrogate_eval_limit`` test images (the experimenter's view)."""
    from clusterattack.victims.training import TrainContext, TrainData, evaluate_clustering

    data = TrainData.from_dataset(dataset, train_limit=2, test_limit=config.surrogate_eval_limit, seed=config.seed)
    return evaluate_clustering(model, data, TrainContext(device=config.device, seed=config.seed, progress=False))


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _summarise(draws: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {"draws": float(len(draws))}
    for key in (*_SCORES, "groups", "largest_group", "surrogate_nmi"):
        for phase in ("pre", "post"):
            out[f"{key}_{phase}_mean"], out[f"{key}_{phase}_std"] = _mean_std(
                [row[f"{key}_{phase}"] for row in draws]
            )
    for key in _SCORES:
        before, after = out[f"{key}_pre_mean"], out[f"{key}_post_mean"]
        out[f"{key}_drop"] = relative_drop(before, after) if before > 0 else float("nan")
    out["linf_max"] = max(row["linf_max"] for row in draws)
    out["l2_mean"] = float(np.mean([row["l2_mean"] for row in draws]))
    return out


def _group_sizes(groups: np.ndarray) -> list[int]:
    return sorted(np.bincount(groups).tolist(), reverse=True)


@dataclass
class OfflineAttack:
    """What the attacker trains before it sends anything: its surrogate and the generator."""

    surrogate: torch.nn.Module
    surrogate_scores: dict[str, float]
    generator_result: AttackResult
    timings_s: dict[str, float]
    surrogate_source: str = "trained"


def train_offline(
    config: ApiAttackConfig,
    dataset: Any,
    *,
    surrogate: torch.nn.Module | None = None,
    surrogate_source: str = "given",
    progress: bool = True,
) -> OfflineAttack:
    """Train the surrogate (unless given) and the generator against it; no service is involved.

    ``surrogate_source`` says where a given surrogate came from (e.g. its file), for the record.
    """
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if surrogate is None:
        surrogate, scores = train_surrogate(config, dataset, progress)
        surrogate_source = "trained"
    else:
        surrogate = surrogate.to(config.device).eval()
        scores = evaluate_surrogate(config, surrogate, dataset)
    timings["surrogate_s"] = time.perf_counter() - started
    started = time.perf_counter()
    train_x, _ = dataset.subset("train").as_float()
    result = train_generator(surrogate, train_x, config.attack, progress=progress)
    timings["generator_s"] = time.perf_counter() - started
    logger.info("generator trained against the surrogate: %s", result.summary())
    return OfflineAttack(surrogate, scores, result, timings, surrogate_source)


def attack_service(
    config: ApiAttackConfig,
    offline: OfflineAttack,
    client: AlbumClient,
    dataset: Any,
    *,
    service: dict[str, Any] | None = None,
) -> ApiAttackResult:
    """Upload clean and perturbed albums for every draw and score the service's groups.

    ``service`` is stored in the result as the experimenter's record and is not used.
    """
    surrogate, generator = offline.surrogate, offline.generator_result.generator
    test_x, test_y = dataset.subset("test").as_float()
    labels = test_y.numpy()
    counts_before = client.counts()
    started = time.perf_counter()
    draws = []
    for draw in range(config.draws):
        rng = np.random.default_rng([config.seed, draw])
        idx = sample_draw(labels, config.per_class, rng)
        clean = test_x[idx]
        adv = perturb_images(generator, clean, config.attack)
        if config.quantize:
            adv = quantize_perturbed(clean, adv)
        groups_pre = client.cluster(clean, name=f"draw{draw}-clean", keep=config.keep_albums)
        groups_post = client.cluster(adv, name=f"draw{draw}-perturbed", keep=config.keep_albums)
        with torch.no_grad():
            own_pre = surrogate.predict_proba(clean.to(config.device)).argmax(1).cpu().numpy()
            own_post = surrogate.predict_proba(adv.to(config.device)).argmax(1).cpu().numpy()
        delta = (adv - clean).flatten(1)
        y = labels[idx]
        row: dict[str, Any] = {"draw": draw, "n_images": int(len(idx))}
        for phase, groups in (("pre", groups_pre), ("post", groups_post)):
            for key, value in clustering_scores(y, groups).items():
                row[f"{key}_{phase}"] = value
            sizes = _group_sizes(groups)
            row[f"groups_{phase}"] = len(sizes)
            row[f"largest_group_{phase}"] = sizes[0] / len(groups)
            row[f"group_sizes_{phase}"] = sizes
        row["surrogate_nmi_pre"] = clustering_scores(y, own_pre)["nmi"]
        row["surrogate_nmi_post"] = clustering_scores(y, own_post)["nmi"]
        row["linf_max"] = float(delta.abs().amax().item())
        row["l2_mean"] = float(delta.norm(dim=1).mean().item())
        draws.append(row)
        logger.info(
            "draw %d: NMI %.3f -> %.3f, groups %d -> %d",
            draw, row["nmi_pre"], row["nmi_post"], row["groups_pre"], row["groups_post"],
        )
    counts_after = client.counts()
    return ApiAttackResult(
        config=config,
        draws=draws,
        summary=_summarise(draws),
        counts={k: v - counts_before.get(k, 0) for k, v in counts_after.items()},
        surrogate=surrogate,
        surrogate_scores=offline.surrogate_scores,
        generator_result=offline.generator_result,
        service=dict(service or {}),
        timings_s={**offline.timings_s, "service_s": time.perf_counter() - started},
        surrogate_source=offline.surrogate_source,
    )


def run_api_attack(
    config: ApiAttackConfig,
    client: AlbumClient,
    *,
    dataset: Any = None,
    surrogate: torch.nn.Module | None = None,
    service: dict[str, Any] | None = None,
    progress: bool = True,
) -> ApiAttackResult:
    """Train offline (surrogate, then generator), then score the service on clean and perturbed albums."""
    if dataset is None:
        from clusterattack.data import load_dataset

        dataset = load_dataset(config.dataset, **dict(config.dataset_options))
    offline = train_offline(config, dataset, surrogate=surrogate, progress=progress)
    return attack_service(config, offline, client, dataset, service=service)
