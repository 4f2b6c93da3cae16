"""Scores against the perturbation norm (the paper's Fig. 3): one generator per (victim, eps), Ray tasks.

For every victim and every eps a generator is trained against the victim (settings of
``NormCurvesConfig.attack`` with that eps, or of ``eps_attacks`` where it names that eps;
cheap by default) and evaluated on the test split: NMI/ARI/ACC before and after, the
perturbation norms actually used, and the image-queries training spent. With
``reference_source`` (e.g. "whitebox") every point is trained a second time with that
gradient source, so a black-box curve has its white-box reference beside it. RUC, the
robust model, is a victim like the others.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from clusterattack.analyses.common import (
    CHEAP_ATTACK,
    TaskRunner,
    as_pairs,
    attack_pool_size,
    load_victim_named,
    test_split,
    train_split,
)
from clusterattack.attacks.config import GRADIENT_SOURCES, NORMS, AttackConfig
from clusterattack.attacks.counting import CountingVictim
from clusterattack.attacks.gan import train_generator
from clusterattack.attacks.run import evaluate_generator

__all__ = ["NormCurvesConfig", "NormCurvesResult", "log_norm_curves", "norm_curve_point", "run_norm_curves"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NormCurvesConfig:
    """Which victims, which eps values, how each generator is trained (``attack``), how many test images."""

    dataset: str
    victims: tuple[str, ...]
    eps_values: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2)
    norm: str = "linf"
    attack: AttackConfig = field(default_factory=lambda: CHEAP_ATTACK)
    victim_files: tuple[tuple[str, str], ...] = ()
    test_limit: int | None = 2000
    seed: int = 0
    use_ray: bool = True
    ray_address: str | None = None
    threads: int = 1
    progress: bool = True
    #: Per-eps base attacks that replace ``attack`` at their eps (e.g. a sweep's chosen
    #: hyper-parameters at each eps); the point's norm, eps and seed still come from here.
    eps_attacks: tuple[tuple[float, AttackConfig], ...] = ()
    #: A second gradient source every point is also trained with (the white-box reference).
    reference_source: str | None = None

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ValueError(f"dataset must be a registered data set name, got {self.dataset!r}")
        if not self.victims:
            raise ValueError("victims must name at least one victim, got none")
        object.__setattr__(self, "victims", tuple(self.victims))
        object.__setattr__(self, "victim_files", as_pairs(self.victim_files))
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        eps = tuple(float(e) for e in self.eps_values)
        if not eps or any(not math.isfinite(e) or e <= 0 for e in eps):
            raise ValueError(f"eps_values must be positive numbers, got {self.eps_values!r}")
        if self.norm == "linf" and max(eps) > 1:
            raise ValueError(f"eps for norm 'linf' on [0, 1] images must be <= 1, got {max(eps)}")
        object.__setattr__(self, "eps_values", tuple(sorted(set(eps))))
        if not isinstance(self.attack, AttackConfig):
            raise ValueError(f"attack must be an AttackConfig, got {type(self.attack).__name__}")
        if self.test_limit is not None and (not isinstance(self.test_limit, int) or self.test_limit < 2):
            raise ValueError(f"test_limit must be an integer >= 2 or None (all), got {self.test_limit!r}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")
        per_eps = tuple((float(e), a) for e, a in self.eps_attacks)
        for e, a in per_eps:
            if e not in self.eps_values or not isinstance(a, AttackConfig):
                raise ValueError(
                    f"eps_attacks must map eps values of {self.eps_values} to AttackConfig, got {e!r}: "
                    f"{type(a).__name__}"
                )
        object.__setattr__(self, "eps_attacks", per_eps)
        if self.reference_source is not None and self.reference_source not in GRADIENT_SOURCES:
            raise ValueError(f"reference_source must be one of {GRADIENT_SOURCES} or None, got {self.reference_source!r}")

    def attack_at(self, eps: float, gradient_source: str | None = None) -> AttackConfig:
        """The attack of the point at ``eps`` (its ``eps_attacks`` entry, else ``attack``), optionally
        with another gradient source."""
        changes: dict[str, Any] = {"norm": self.norm, "eps": float(eps), "seed": self.seed}
        if gradient_source is not None:
            changes["gradient_source"] = gradient_source
        return dict(self.eps_attacks).get(float(eps), self.attack).override(**changes)

    @property
    def gradient_sources(self) -> tuple[str | None, ...]:
        """None (each point's own source), then the reference source if any."""
        return (None,) if self.reference_source is None else (None, self.reference_source)


@dataclass
class NormCurvesResult:
    """The payload of the contract (``analysis/norm_curves.json``), its table and figure."""

    payload: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)

    def table_text(self) -> str:
        lines = [f"{'victim':<8}{'eps':>7}{'NMI pre':>9}{'NMI post':>9}{'ARI post':>9}{'ACC post':>9}{'linf':>7}{'queries':>10}"]
        for r in self.payload["rows"]:
            lines.append(
                f"{r['victim']:<8}{r['eps']:>7.3f}{r['nmi_pre']:>9.3f}{r['nmi_post']:>9.3f}"
                f"{r['ari_post']:>9.3f}{r['acc_post']:>9.3f}{r['linf_mean']:>7.3f}{r['image_queries'] or 0:>10}"
            )
        return "\n".join(lines)


def norm_curve_point(
    victim: Any,
    name: str,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    config: AttackConfig,
) -> dict[str, Any]:
    """Train one generator against ``victim`` under ``config`` and evaluate it: one row of the curves."""
    counted = CountingVictim(victim)
    result = train_generator(counted, train_images, config, progress=False)
    scores, _ = evaluate_generator(victim, result.generator, test_images, test_labels, config, figures=False)
    row = {"victim": name, "eps": float(config.eps)}
    for m in ("nmi", "ari", "acc"):
        row[f"{m}_pre"] = float(scores[f"{m}_pre"])
        row[f"{m}_post"] = float(scores[f"{m}_post"])
    row.update(
        l2_mean=float(scores["l2_mean"]),
        linf_mean=float(scores["linf_mean"]),
        linf_max=float(scores["linf_max"]),
        image_queries=result.image_queries,
        changed_fraction=float(scores["changed_fraction"]),
        gradient_source=config.gradient_source,
        norm=config.norm,
        seed=config.seed,
    )
    return row


def run_norm_curves(
    config: NormCurvesConfig,
    *,
    victims: dict[str, Any] | None = None,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> NormCurvesResult:
    """Every (victim, eps) point of ``config``, as Ray tasks (or in process); rows sorted by victim, eps."""
    files = dict(config.victim_files)
    if victims is None:
        victims = {name: load_victim_named(name, config.dataset, files) for name in config.victims}
    if data is None:
        pools = [attack_pool_size(a) for a in (config.attack, *dict(config.eps_attacks).values())]
        pool = None if None in pools else max(p for p in pools if p is not None)
        train_x, _ = train_split(config.dataset, pool, config.seed)
        test_x, test_y = test_split(config.dataset, config.test_limit, config.seed)
    else:
        train_x, test_x, test_y = data
    executor = TaskRunner(config.use_ray, config.threads, config.ray_address)
    refs = {name: executor.put(victims[name]) for name in config.victims}
    train_ref, test_ref, label_ref = executor.put(train_x), executor.put(test_x), executor.put(test_y)
    handles = [
        executor.submit(
            norm_curve_point, refs[name], name, train_ref, test_ref, label_ref, config.attack_at(eps, source)
        )
        for name in config.victims
        for eps in config.eps_values
        for source in config.gradient_sources
    ]
    rows = executor.gather(handles, "norm curves", config.progress)
    payload = {
        "dataset": config.dataset,
        "norm": config.norm,
        "gradient_source": config.attack.gradient_source,
        "reference_source": config.reference_source,
        "rows": rows,
        "seed": config.seed,
        "attack_loss": config.attack.attack_loss,
        "test_images": int(test_x.shape[0]),
    }
    from clusterattack.reports.analysis_figures import norm_curves_figure

    sources = config.attack.gradient_source + (f" and {config.reference_source}" if config.reference_source else "")
    fig = norm_curves_figure(rows, config.norm, f"{config.dataset}: scores vs eps ({sources} gradients)")
    return NormCurvesResult(payload, {"norm_curves": fig})


def log_norm_curves(result: NormCurvesResult, run_name: str | None = None) -> str:
    """Log a norm-curves result to MLflow (kind ``norm_curves``); returns the run id."""
    from clusterattack.tracking.analyses import log_analysis

    p = result.payload
    eps_values = sorted({r["eps"] for r in p["rows"]})
    return log_analysis(
        "norm_curves",
        p,
        dataset=p["dataset"],
        gradient_source=p["gradient_source"],
        norm=p["norm"],
        eps=",".join(f"{e:g}" for e in eps_values),
        seed=p["seed"],
        figures=result.figures,
        tables={"norm_curves": p["rows"]},
        run_name=run_name,
    )
