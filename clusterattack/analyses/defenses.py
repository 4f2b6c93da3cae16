"""The defense analyses of the paper's section 6.2 and footnote 12, end to end: detection, PCA, retraining.

Each ``run_*`` loads what it needs (victims and generators by name or file, the data
set's splits), calls the pure defense code in ``clusterattack.defenses`` and returns the
payload of the MLflow contract (``tracking.analyses``) with its figures; each ``log_*``
logs one such result as a run of experiment ``analyses``.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clusterattack.analyses.common import (
    CHEAP_ATTACK,
    LoadedGenerator,
    load_victim_named,
    resolve_generator,
    test_split,
    train_split,
)
from clusterattack.analyses.transfer import clean_scores, transfer_scores
from clusterattack.attacks.config import NORMS, AttackConfig
from clusterattack.attacks.counting import CountingVictim
from clusterattack.attacks.gan import perturb_images, train_generator
from clusterattack.defenses.pca import pca_overlap
from clusterattack.defenses.retraining import adversarial_retrain
from clusterattack.defenses.ssd import SSDDetector, detection_trials, extract_features
from clusterattack.metrics import CLUSTERING_METRICS

__all__ = [
    "AnalysisResult",
    "DetectionConfig",
    "PCAConfig",
    "RetrainingConfig",
    "log_result",
    "run_detection",
    "run_pca",
    "run_retraining",
]

log = logging.getLogger(__name__)

METRICS = CLUSTERING_METRICS


def _check_bound(norm: str | None, eps: float | None) -> None:
    if norm is not None and norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} or None (the generator's own), got {norm!r}")
    if eps is not None and (not isinstance(eps, int | float) or not math.isfinite(eps) or eps <= 0):
        raise ValueError(f"eps must be a positive number or None (the generator's own), got {eps!r}")


def _applied(gen: LoadedGenerator, norm: str | None, eps: float | None) -> AttackConfig:
    """The generator's config with the bound it is applied at (its own unless overridden)."""
    changes: dict[str, Any] = {"device": "cpu"}
    if norm is not None:
        changes["norm"] = norm
    if eps is not None:
        changes["eps"] = float(eps)
    return gen.config.override(**changes)


def _generator_victim(gen: LoadedGenerator, fallback: str) -> str:
    extra = dict(gen.extra or {})
    return str(extra.get("model") or extra.get("victim") or fallback).removeprefix("victim-").split("-")[0]


@dataclass
class AnalysisResult:
    """One analysis: its kind, the contract payload, figures, tables, artifact files and tag values.

    ``models`` holds models the analysis made that a caller may keep (the retrained victim);
    they are not logged.
    """

    kind: str
    payload: dict[str, Any]
    gradient_source: str | None
    figures: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)


def log_result(result: AnalysisResult, run_name: str | None = None) -> str:
    """Log ``result`` to MLflow (experiment ``analyses``); returns the run id."""
    from clusterattack.tracking.analyses import log_analysis

    p = result.payload
    eps = p.get("eps")
    if eps is None and "fresh_attack" in p:
        eps = p["fresh_attack"].get("eps")
    return log_analysis(
        result.kind,
        p,
        dataset=p["dataset"],
        gradient_source=result.gradient_source,
        norm=p.get("norm") or p.get("fresh_attack", {}).get("norm"),
        eps=eps,
        seed=int(p.get("seed", 0)),
        figures=result.figures,
        tables=result.tables,
        files=result.files,
        metrics=result.metrics,
        run_name=run_name,
    )


# --- SSD detection -----------------------------------------------------------------


@dataclass(frozen=True)
class DetectionConfig:
    """SSD detection of a generator's images in the paper's protocol.

    ``encoder``: None uses the victim's backbone (``features``); a victim name or file uses
    that model's backbone instead. ``clusters``: "kmeans" (``num_clusters`` k-means
    clusters of clean training features; None = the victim's K) or "victim" (the victim's
    own clusters). ``fit_images`` clean training images fit the means and covariance,
    ``heldout_images`` other clean training images set the threshold at ``target_fpr``.
    """

    dataset: str
    victim: str
    generator: str
    eps: float | None = None
    norm: str | None = None
    target_fpr: float = 0.05
    images: int = 8000
    trials: int = 100
    perturb_probability: float = 0.5
    fit_images: int = 10000
    heldout_images: int = 2000
    clusters: str = "kmeans"
    num_clusters: int | None = None
    encoder: str | None = None
    victim_file: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_bound(self.norm, self.eps)
        if not 0 < self.target_fpr < 1:
            raise ValueError(f"target_fpr must lie in (0, 1), got {self.target_fpr!r}")
        for name in ("images", "trials", "fit_images", "heldout_images"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.clusters not in ("kmeans", "victim"):
            raise ValueError(f"clusters must be 'kmeans' or 'victim', got {self.clusters!r}")


def run_detection(
    config: DetectionConfig,
    *,
    victim: Any = None,
    generator: LoadedGenerator | None = None,
    encoder: Any = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> AnalysisResult:
    """Fit SSD on clean features, calibrate, then run the perturb-with-probability-1/2 trials.

    Features of all clean and all perturbed test images are computed once; the trials only
    redraw which images are perturbed. ``data`` = (train images, test images) may be given.
    """
    files = {config.victim: config.victim_file} if config.victim_file else None
    victim = victim if victim is not None else load_victim_named(config.victim, config.dataset, files)
    gen = generator or resolve_generator(config.generator)
    if encoder is None and config.encoder is not None:
        encoder = load_victim_named(config.encoder, config.dataset, {config.encoder: config.encoder} if Path(config.encoder).is_file() else None)
    feature_model = encoder if encoder is not None else victim
    applied = _applied(gen, config.norm, config.eps)
    if data is None:
        train_x, _ = train_split(config.dataset, config.fit_images + config.heldout_images, config.seed)
        test_x, _ = test_split(config.dataset, config.images, config.seed)
    else:
        train_x, test_x = data
    if train_x.shape[0] < config.fit_images + config.heldout_images:
        raise ValueError(
            f"need {config.fit_images + config.heldout_images} clean training images "
            f"(fit_images + heldout_images), got {train_x.shape[0]}"
        )
    if test_x.shape[0] < config.images:
        raise ValueError(f"need {config.images} test images for the protocol, got {test_x.shape[0]}")
    perm = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(config.seed))
    fit_x = train_x[perm[: config.fit_images]]
    held_x = train_x[perm[config.fit_images : config.fit_images + config.heldout_images]]
    test_x = test_x[: config.images]
    adv_x = perturb_images(gen.generator, test_x, applied)

    feats = {k: extract_features(feature_model.features, x) for k, x in (("fit", fit_x), ("held", held_x), ("clean", test_x), ("adv", adv_x))}
    labels = None
    if config.clusters == "victim":
        with torch.no_grad():
            labels = torch.cat([victim.predict_proba(fit_x[i : i + 512]).argmax(1) for i in range(0, fit_x.shape[0], 512)]).numpy()
    k = config.num_clusters or int(victim.num_clusters)
    detector = SSDDetector(num_clusters=k, seed=config.seed).fit(feats["fit"], labels)
    threshold = detector.calibrate(feats["held"], config.target_fpr)
    scores_clean, scores_adv = detector.score(feats["clean"]), detector.score(feats["adv"])
    trials = detection_trials(
        scores_clean > threshold,
        scores_adv > threshold,
        images=config.images,
        trials=config.trials,
        perturb_probability=config.perturb_probability,
        seed=config.seed,
    )
    delta = (adv_x - test_x).flatten(1)
    payload = {
        "dataset": config.dataset,
        "victim": config.victim,
        "generator": gen.reference,
        "eps": float(applied.eps),
        "norm": applied.norm,
        "target_fpr": config.target_fpr,
        "images": config.images,
        "trials": config.trials,
        "detection_rate_mean": trials["detection_rate_mean"],
        "detection_rate_std": trials["detection_rate_std"],
        "fpr_mean": trials["fpr_mean"],
        "fpr_std": trials["fpr_std"],
        "seed": config.seed,
        "threshold": threshold,
        "perturb_probability": config.perturb_probability,
        "encoder": config.encoder or f"{config.victim} backbone",
        "clusters": config.clusters,
        "num_clusters": k,
        "fit_images": config.fit_images,
        "heldout_images": config.heldout_images,
        "flagged_clean_fraction": float((scores_clean > threshold).mean()),
        "flagged_adv_fraction": float((scores_adv > threshold).mean()),
        "linf_mean": float(delta.abs().max(1).values.mean()),
        "linf_max": float(delta.abs().max()) if delta.numel() else 0.0,  # the bound is on every image
        "l2_mean": float(delta.norm(dim=1).mean()),
        "gradient_source": gen.config.gradient_source,
        "image_queries": gen.image_queries,  # spent training the generator
    }
    from clusterattack.reports.analysis_figures import detection_histogram

    fig = detection_histogram(scores_clean, scores_adv, threshold, f"SSD on {config.victim} features ({gen.reference})")
    metrics = {k: payload[k] for k in ("detection_rate_mean", "detection_rate_std", "fpr_mean", "fpr_std")}
    return AnalysisResult("detection", payload, gen.config.gradient_source, {"ssd_scores": fig}, metrics=metrics)


# --- PCA -------------------------------------------------------------------------


@dataclass(frozen=True)
class PCAConfig:
    """PCA of ``images`` clean test images against their perturbations by ``generator``."""

    dataset: str
    generator: str
    victim: str | None = None
    eps: float | None = None
    norm: str | None = None
    images: int = 2000
    seed: int = 0
    out_dir: str | None = None

    def __post_init__(self) -> None:
        _check_bound(self.norm, self.eps)
        if not isinstance(self.images, int) or not 2 <= self.images <= 2000:
            raise ValueError(f"images must be an integer in 2..2000 (points kept per set), got {self.images!r}")


def run_pca(
    config: PCAConfig, *, generator: LoadedGenerator | None = None, images: torch.Tensor | None = None
) -> AnalysisResult:
    """First three PCs of clean and adversarial images, their overlap, the 3-D figure and the points file."""
    gen = generator or resolve_generator(config.generator)
    applied = _applied(gen, config.norm, config.eps)
    clean = images if images is not None else test_split(config.dataset, config.images, config.seed)[0]
    clean = clean[: config.images]
    adv = perturb_images(gen.generator, clean, applied)
    result = pca_overlap(clean, adv, seed=config.seed)
    out_dir = Path(config.out_dir) if config.out_dir else Path(tempfile.mkdtemp(prefix="pca-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    points_file = out_dir / "points.npz"
    np.savez_compressed(points_file, clean=result.clean_points.astype(np.float32), adv=result.adv_points.astype(np.float32))
    victim = config.victim or _generator_victim(gen, "unknown")
    payload = {
        "dataset": config.dataset,
        "victim": victim,
        "generator": gen.reference,
        "eps": float(applied.eps),
        "norm": applied.norm,
        "explained_variance": list(result.explained_variance),
        "overlap": result.overlap,
        "overlap_method": result.overlap_method,
        "points": "pca/points.npz",
        "images": int(clean.shape[0]),
        "seed": config.seed,
        "gradient_source": gen.config.gradient_source,
        "image_queries": gen.image_queries,  # spent training the generator
    }
    from clusterattack.reports.analysis_figures import pca_scatter_3d

    fig = pca_scatter_3d(
        result.clean_points, result.adv_points, result.explained_variance,
        f"clean vs adversarial ({victim}, {applied.norm} eps {applied.eps:g}): overlap {result.overlap:.3f}",
    )
    return AnalysisResult(
        "pca", payload, gen.config.gradient_source, {"pca_3d": fig},
        files={"pca/points.npz": str(points_file)}, metrics={"overlap": result.overlap},
    )


# --- adversarial retraining --------------------------------------------------------


@dataclass(frozen=True)
class RetrainingConfig:
    """Footnote 12: retrain ``victim`` on clean + adversarial images of ``generators``, then attack it afresh.

    ``epochs`` overrides the recipe's epochs (a short fine-tune from the trained weights);
    ``train_limit`` trains on a seeded subset of the training split; ``fresh_attack`` is the
    attack trained against both the original and the retrained model.
    """

    dataset: str
    victim: str
    generators: tuple[str, ...]
    mix: float = 0.5
    epochs: int = 2
    train_limit: int | None = 20000
    test_limit: int | None = 8000
    fresh_attack: AttackConfig = field(default_factory=lambda: CHEAP_ATTACK)
    preset: str = "demo"
    victim_file: str | None = None
    seed: int = 0
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "generators", tuple(self.generators))
        if not self.generators:
            raise ValueError("generators must name at least one trained generator, got none")
        if not 0 < self.mix <= 1:
            raise ValueError(f"mix must lie in (0, 1], got {self.mix!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not isinstance(self.fresh_attack, AttackConfig):
            raise ValueError(f"fresh_attack must be an AttackConfig, got {type(self.fresh_attack).__name__}")


def robustness_row(
    model: Any,
    label: str,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    old: list[tuple[LoadedGenerator, AttackConfig]],
    fresh_generator: torch.nn.Module,
    fresh_config: AttackConfig,
) -> dict[str, Any]:
    """Clean scores, mean scores under the old generators, scores under a fresh attack: one table row."""
    row: dict[str, Any] = {"model": label}
    clean = clean_scores(model, test_x, test_y)
    per_old = [transfer_scores(model, g.generator, cfg, test_x, test_y) for g, cfg in old]
    fresh = transfer_scores(model, fresh_generator, fresh_config, test_x, test_y)
    for m in METRICS:
        row[f"{m}_clean"] = clean[m]
        row[f"{m}_old_generators"] = float(np.mean([s[f"{m}_post"] for s in per_old]))
        row[f"{m}_fresh_attack"] = float(fresh[f"{m}_post"])
    row["nmi_old_generators_each"] = {g.reference: float(s["nmi_post"]) for (g, _), s in zip(old, per_old, strict=True)}
    return row


def run_retraining(
    config: RetrainingConfig,
    *,
    victim: Any = None,
    generators: list[LoadedGenerator] | None = None,
    dataset: Any = None,
) -> AnalysisResult:
    """Retrain the victim adversarially and compare it with the original on clean, old and fresh attacks."""
    from clusterattack.victims.training import TrainContext, TrainData

    files = {config.victim: config.victim_file} if config.victim_file else None
    original = victim if victim is not None else load_victim_named(config.victim, config.dataset, files)
    gens = generators or [resolve_generator(ref) for ref in config.generators]
    if dataset is None:
        from clusterattack.data import load_dataset

        dataset = load_dataset(config.dataset)
    data = TrainData.from_dataset(dataset, train_limit=config.train_limit, test_limit=config.test_limit, seed=config.seed)
    retrained = copy.deepcopy(original).requires_grad_(True)
    old = [(g, _applied(g, None, None)) for g in gens]
    ctx = TrainContext(device="cpu", seed=config.seed, num_threads=config.threads, progress=config.progress, eval_batch_size=1000)
    outcome = adversarial_retrain(
        retrained, data, [(g.generator, cfg) for g, cfg in old], ctx,
        mix=config.mix, preset=config.preset, recipe_overrides={"epochs": config.epochs},
    )
    retrained.eval().requires_grad_(False)
    original.eval()

    test_x = data.test_images.float().div(255.0)
    test_y = torch.as_tensor(data.test_labels)
    train_x = data.train_images.float().div(255.0)
    fresh = config.fresh_attack.override(seed=config.seed)
    rows, queries = [], []
    for label, model in (("original", original), ("retrained", retrained)):
        counted = CountingVictim(model)
        attack = train_generator(counted, train_x, fresh, progress=config.progress)
        queries.append(attack.image_queries)
        rows.append(robustness_row(model, label, test_x, test_y, old, attack.generator, fresh))
        log.info("retraining %s: %s", label, {k: v for k, v in rows[-1].items() if k != "nmi_old_generators_each"})
    payload = {
        "dataset": config.dataset,
        "victim": config.victim,
        "generators": [g.reference for g in gens],
        "rows": rows,
        "fresh_attack": {
            "gradient_source": fresh.gradient_source,
            "eps": float(fresh.eps),
            "norm": fresh.norm,
            "image_queries": queries[-1],
            "image_queries_original": queries[0],
            "epochs": fresh.epochs,
            "train_limit": fresh.train_limit,
            "attack_loss": fresh.attack_loss,
        },
        "seed": config.seed,
        "retraining": {
            "mix": config.mix,
            "epochs": config.epochs,
            "train_images": data.num_train,
            "test_images": int(test_x.shape[0]),
            "preset": config.preset,
            "history": outcome.history,
        },
    }
    table = [{k: v for k, v in r.items() if k != "nmi_old_generators_each"} for r in rows]
    return AnalysisResult(
        "retraining", payload, fresh.gradient_source, tables={"retraining": table}, models={"retrained": retrained}
    )


def retraining_text(payload: dict[str, Any]) -> str:
    """The retraining table as aligned text."""
    head = f"{'model':<10}" + "".join(f"{m.upper() + ' ' + c:>16}" for m in METRICS for c in ("clean", "old gens", "fresh"))
    lines = [head]
    for r in payload["rows"]:
        lines.append(
            f"{r['model']:<10}"
            + "".join(f"{r[f'{m}_{c}']:>16.3f}" for m in METRICS for c in ("clean", "old_generators", "fresh_attack"))
        )
    return "\n".join(lines)
