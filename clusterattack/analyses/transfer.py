"""Transferability (the paper's section 6.1, Fig. 4): a generator trained on one victim, applied to another.

For every (source, target) pair the source's generator perturbs the test images (no query
to the target is needed to make them) and the target's NMI/ARI/ACC are measured on them,
beside the target's pre-attack figures. Sources without a generator can have one trained
here (cheap settings, ``TransferConfig.attack``). Generator training and the pair
evaluations fan out as Ray tasks (``ray.init()`` in-process unless ``RAY_ADDRESS`` names a
cluster); ``use_ray=False`` runs the same functions in this process.

All generators are applied at one ``norm``/``eps`` (their output is projected onto that
ball), so the matrix compares like with like; each generator's training eps is recorded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clusterattack.analyses.common import (
    CHEAP_ATTACK,
    LoadedGenerator,
    TaskRunner,
    as_pairs,
    attack_pool_size,
    load_victim_named,
    resolve_generator,
    test_split,
    train_split,
)
from clusterattack.attacks.config import NORMS, AttackConfig
from clusterattack.attacks.counting import CountingVictim
from clusterattack.attacks.evaluate import evaluate_attack
from clusterattack.attacks.gan import perturb_images, train_generator
from clusterattack.attacks.gradients import query_memberships
from clusterattack.attacks.io import save_generator
from clusterattack.metrics import CLUSTERING_METRICS, clustering_scores

__all__ = [
    "TransferConfig",
    "TransferResult",
    "clean_scores",
    "run_transfer",
    "train_source_generator",
    "transfer_scores",
]

log = logging.getLogger(__name__)

METRICS = CLUSTERING_METRICS


@dataclass(frozen=True)
class TransferConfig:
    """One transfer matrix: which victims, which generators, at what norm bound, on how many images.

    ``targets`` are victim names (``victim-<name>-<dataset>`` in the registry unless
    ``victim_files`` gives a file); ``sources`` default to the targets. ``generators``
    maps a source to a generator file or registry name; a source without one gets a
    generator trained against it with ``attack`` when ``train_missing`` (else it is an
    error). ``eps``/``norm``: the bound all generators are applied at.
    """

    dataset: str
    targets: tuple[str, ...]
    sources: tuple[str, ...] = ()
    generators: tuple[tuple[str, str], ...] = ()
    victim_files: tuple[tuple[str, str], ...] = ()
    norm: str = "linf"
    eps: float = 0.15
    test_limit: int | None = 8000
    train_missing: bool = True
    attack: AttackConfig = field(default_factory=lambda: CHEAP_ATTACK)
    out_dir: str = "runs/analyses/transfer"
    seed: int = 0
    use_ray: bool = True
    ray_address: str | None = None
    threads: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ValueError(f"dataset must be a registered data set name, got {self.dataset!r}")
        if not self.targets:
            raise ValueError("targets must name at least one victim, got none")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "sources", tuple(self.sources) or tuple(self.targets))
        object.__setattr__(self, "generators", as_pairs(self.generators))
        object.__setattr__(self, "victim_files", as_pairs(self.victim_files))
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not isinstance(self.eps, int | float) or not math.isfinite(self.eps) or self.eps <= 0:
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")
        if self.norm == "linf" and self.eps > 1:
            raise ValueError(f"eps for norm 'linf' on [0, 1] images must be <= 1, got {self.eps!r}")
        if self.test_limit is not None and (not isinstance(self.test_limit, int) or self.test_limit < 2):
            raise ValueError(f"test_limit must be an integer >= 2 or None (all), got {self.test_limit!r}")
        unknown = set(dict(self.generators)) - set(self.sources)
        if unknown:
            raise ValueError(f"generators given for {sorted(unknown)}, which are not sources {self.sources}")
        missing = [s for s in self.sources if s not in dict(self.generators)]
        if missing and not self.train_missing:
            raise ValueError(
                f"sources {missing} have no generator; give one (--generator SOURCE=REF) or allow training"
            )
        if not isinstance(self.attack, AttackConfig):
            raise ValueError(f"attack must be an AttackConfig, got {type(self.attack).__name__}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")


@dataclass
class TransferResult:
    """The payload of the contract (``analysis/transfer.json``), its tables and figures."""

    payload: dict[str, Any]
    tables: dict[str, list[dict[str, Any]]]
    figures: dict[str, Any] = field(default_factory=dict)

    def matrix_text(self, metric: str = "nmi") -> str:
        """The matrix as aligned text: rows = sources, columns = targets, pre-attack as the last row."""
        p = self.payload
        width = max(8, *(len(t) + 1 for t in p["targets"]))
        head = f"{metric.upper() + ' post':<12}" + "".join(f"{t:>{width}}" for t in p["targets"])
        lines = [head]
        for source, row in zip(p["sources"], p["post"][metric], strict=True):
            lines.append(f"{source:<12}" + "".join(f"{v:>{width}.3f}" for v in row))
        lines.append(f"{'pre-attack':<12}" + "".join(f"{p['pre'][t][metric]:>{width}.3f}" for t in p["targets"]))
        return "\n".join(lines)


def clean_scores(victim: Any, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> dict[str, float]:
    """NMI/ARI/ACC of the victim's clusters on clean ``images``."""
    proba = query_memberships(victim, images, batch)
    scores = clustering_scores(np.asarray(labels), proba.argmax(1).numpy())
    return {k: float(scores[k]) for k in METRICS}


def transfer_scores(
    victim: Any,
    generator: torch.nn.Module,
    config: AttackConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> dict[str, Any]:
    """Evaluation of ``generator`` (applied under ``config``'s norm and eps) on ``victim``: ``evaluate_attack``'s keys."""
    clean = query_memberships(victim, images, config.query_batch)
    adv = perturb_images(generator, images, config)
    adv_proba = query_memberships(victim, adv, config.query_batch)
    scores, _ = evaluate_attack(labels, clean, adv_proba, images, adv, figures=False)
    return scores


def train_source_generator(
    victim: Any, train_images: torch.Tensor, config: AttackConfig, progress: bool = False
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a generator against ``victim`` (counted queries); returns it and the run's summary."""
    counted = CountingVictim(victim)
    result = train_generator(counted, train_images, config, progress=progress)
    return result.generator, result.summary()


def _load_pair_victim(name: str, dataset: str, files: dict[str, str]) -> Any:
    return load_victim_named(name, dataset, files)


def run_transfer(
    config: TransferConfig,
    *,
    victims: dict[str, Any] | None = None,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> TransferResult:
    """Build the transfer matrices of ``config``.

    ``victims`` (name -> model) and ``data`` (train images, test images, test labels) may
    be given directly (tests, notebooks); otherwise the victims are loaded by name and the
    data set's splits are read. Trained-here generators are saved under
    ``config.out_dir/generator-<source>-<dataset>.pt``.
    """
    files = dict(config.victim_files)
    names = list(dict.fromkeys([*config.sources, *config.targets]))
    if victims is None:
        victims = {name: _load_pair_victim(name, config.dataset, files) for name in names}
    missing_victims = [n for n in names if n not in victims]
    if missing_victims:
        raise ValueError(f"no victim model for {missing_victims}; got {sorted(victims)}")
    if data is None:
        train_x, _ = train_split(config.dataset, attack_pool_size(config.attack), config.seed)
        test_x, test_y = test_split(config.dataset, config.test_limit, config.seed)
    else:
        train_x, test_x, test_y = data
    given = dict(config.generators)
    executor = TaskRunner(config.use_ray, config.threads, config.ray_address)
    victim_refs = {name: executor.put(victims[name]) for name in names}

    loaded: dict[str, LoadedGenerator] = {s: resolve_generator(given[s]) for s in config.sources if s in given}
    to_train = [s for s in config.sources if s not in given]
    summaries: dict[str, dict[str, Any]] = {}
    if to_train:
        train_ref = executor.put(train_x)
        handles = [
            executor.submit(
                train_source_generator, victim_refs[s], train_ref, config.attack.override(seed=config.seed)
            )
            for s in to_train
        ]
        for source, (generator, summary) in zip(
            to_train, executor.gather(handles, "train source generators", config.progress), strict=True
        ):
            path = Path(config.out_dir) / f"generator-{source}-{config.dataset}.pt"
            save_generator(
                generator,
                config.attack.override(seed=config.seed),
                path,
                extra={"victim": source, "dataset": config.dataset, "image_queries": summary["image_queries"]},
            )
            summaries[source] = summary
            loaded[source] = LoadedGenerator(
                generator, config.attack.override(seed=config.seed), str(path), summary["image_queries"]
            )
            log.info("trained generator against %s: %s", source, summary)

    test_ref, label_ref = executor.put(test_x), executor.put(test_y)
    pre_handles = [executor.submit(clean_scores, victim_refs[t], test_ref, label_ref) for t in config.targets]
    pair_handles = []
    for source in config.sources:
        gen = loaded[source]
        applied = gen.config.override(norm=config.norm, eps=float(config.eps), device="cpu")
        gen_ref = executor.put(gen.generator)
        for target in config.targets:
            pair_handles.append(executor.submit(transfer_scores, victim_refs[target], gen_ref, applied, test_ref, label_ref))
    pre_list = executor.gather(pre_handles, "pre-attack scores", config.progress)
    pair_list = executor.gather(pair_handles, "transfer pairs", config.progress)

    pre = {t: s for t, s in zip(config.targets, pre_list, strict=True)}
    n_t = len(config.targets)
    post = {m: [[float(pair_list[i * n_t + j][f"{m}_post"]) for j in range(n_t)] for i in range(len(config.sources))] for m in METRICS}
    queries = [loaded[s].image_queries for s in config.sources]
    payload: dict[str, Any] = {
        "dataset": config.dataset,
        "norm": config.norm,
        "eps": float(config.eps),
        "sources": list(config.sources),
        "targets": list(config.targets),
        "generators": {s: loaded[s].reference for s in config.sources},
        "pre": pre,
        "post": post,
        # Queries spent training the generators on their sources; applying them to a
        # target costs no query at all (that is what transfer means).
        "image_queries": int(sum(q for q in queries if q is not None)),
        "image_queries_meaning": "spent training the generators on their sources",
        "image_queries_applying": 0,  # to any target: a transfer attack queries no target
        "test_images": int(test_x.shape[0]),
        "seed": config.seed,
        "gradient_sources": {s: loaded[s].config.gradient_source for s in config.sources},
        "train_eps": {s: float(loaded[s].config.eps) for s in config.sources},
        "image_queries_by_source": {s: loaded[s].image_queries for s in config.sources},
    }
    rows = []
    for i, source in enumerate(config.sources):
        for j, target in enumerate(config.targets):
            r = pair_list[i * n_t + j]
            row = {"source": source, "target": target}
            for m in METRICS:
                row[f"{m}_pre"] = pre[target][m]
                row[f"{m}_post"] = float(r[f"{m}_post"])
            row.update(
                changed_fraction=r["changed_fraction"], l2_mean=r["l2_mean"], linf_mean=r["linf_mean"],
                linf_max=r["linf_max"],
            )
            rows.append(row)
    result = TransferResult(payload, {"transfer_pairs": rows})
    from clusterattack.reports.analysis_figures import transfer_heatmap

    for m in METRICS:
        result.figures[f"transfer_{m}"] = transfer_heatmap(
            post[m], config.sources, config.targets, [pre[t][m] for t in config.targets], metric=m,
            title=f"{config.dataset}: post-attack {m.upper()} ({config.norm} eps {config.eps:g})",
        )
    return result


def gradient_source_tag(payload: dict[str, Any]) -> str:
    """One tag value for the generators' gradient sources ("mixed" when they differ)."""
    kinds = set(payload.get("gradient_sources", {}).values())
    return kinds.pop() if len(kinds) == 1 else "mixed"


def log_transfer(result: TransferResult, run_name: str | None = None) -> str:
    """Log a transfer result to MLflow (experiment ``analyses``, kind ``transfer``); returns the run id."""
    from clusterattack.tracking.analyses import log_analysis

    p = result.payload
    return log_analysis(
        "transfer",
        p,
        dataset=p["dataset"],
        gradient_source=gradient_source_tag(p),
        norm=p["norm"],
        eps=p["eps"],
        seed=p["seed"],
        figures=result.figures,
        tables=result.tables,
        run_name=run_name,
    )
