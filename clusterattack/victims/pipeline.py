"""Train one victim on one registered dataset, track it in MLflow and register it: the train_victims job.

``run_train_job(TrainJob(model="cc", dataset="fashion_mnist"))`` loads the data, builds the
preset's config and recipe, trains with per-epoch NMI/ARI/ACC logged to an MLflow run,
saves a checkpoint file and registers the model as ``victim-<model>-<dataset>``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterattack.precision import check_precision
from clusterattack.victims.io import save_victim
from clusterattack.victims.registry import PRESETS, get_spec
from clusterattack.victims.training import (
    DEFAULT_CACHE_DIR,
    TrainContext,
    TrainData,
    evaluate_clustering,
    resolve_device,
    seed_everything,
)

log = logging.getLogger(__name__)

EXPERIMENT = "victims"


@dataclass(frozen=True)
class TrainJob:
    """Everything that defines one training run (logged to MLflow as its parameters).

    ``epochs`` overrides the recipe's main-stage epochs; ``checkpoint_dir`` defaults to
    ``runs/checkpoints/<model>-<dataset>-<preset>-s<seed>``; ``cache_dir`` holds shared
    results (the contrastive pretext, SCAN for RUC); ``train_limit`` trains on a seeded
    subset of the training split (scores always use the whole test split).
    """

    model: str
    dataset: str
    preset: str = "demo"
    seed: int = 0
    device: str = "auto"
    epochs: int | None = None
    checkpoint_dir: str | None = None
    cache_dir: str | None = DEFAULT_CACHE_DIR
    resume: bool = False
    register: bool = True
    num_threads: int | None = None
    train_limit: int | None = None
    progress: bool = True
    experiment: str = EXPERIMENT
    precision: str = "fp32"

    def __post_init__(self) -> None:
        get_spec(self.model)
        check_precision(self.precision)
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}, expected one of {PRESETS}")
        if self.epochs is not None and self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.train_limit is not None and self.train_limit < 2:
            raise ValueError(f"train_limit must be >= 2 images, got {self.train_limit}")

    @property
    def checkpoint_path(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        return Path("runs/checkpoints") / f"{self.model}-{self.dataset}-{self.preset}-s{self.seed}"


@dataclass
class TrainResult:
    """A finished job: the model, its test scores, timings, and its registry version (if any)."""

    model: Any
    scores: dict[str, float]
    wall_s: float
    cpu_s: float
    history: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    run_id: str | None = None
    model_version: str | None = None
    registered_name: str | None = None

    def _with_cached(self, kind: str) -> float:
        # Shared work reused from the cache (the pretext; SCAN under RUC) cost time when it
        # was built; add it back so every model's total is honest.
        own = self.wall_s if kind == "wall" else self.cpu_s
        for part in ("pretext", "scan"):
            if self.info.get(f"{part}_cached"):
                own += float(self.info.get(f"{part}_{kind}_s", 0.0))
        return own

    @property
    def total_wall_s(self) -> float:
        """Wall seconds including shared work reused from the cache."""
        return self._with_cached("wall")

    @property
    def total_cpu_s(self) -> float:
        """Process CPU seconds including shared work reused from the cache."""
        return self._with_cached("cpu")

    def summary(self) -> str:
        s = self.scores
        return (
            f"{self.model.name}: NMI {s['nmi']:.4f} ARI {s['ari']:.4f} ACC {s['acc']:.4f} "
            f"wall {self.wall_s:.0f}s cpu {self.cpu_s:.0f}s "
            f"(with cached shared work: wall {self.total_wall_s:.0f}s cpu {self.total_cpu_s:.0f}s)"
        )


def _numeric(values: dict) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        if isinstance(v, bool) or isinstance(v, int | float) and math.isfinite(v):
            out[k] = float(v)
    return out


def victim_data_uses(num_train: int, num_test: int, job: TrainJob) -> list:
    """The splits a victim run reads, as MLflow inputs: train (``training``), test (``evaluation``)."""
    from clusterattack.tracking.datasets import EVALUATION, TRAINING, DatasetUse

    return [
        DatasetUse("train", TRAINING, num_train, job.seed if job.train_limit is not None else None),
        DatasetUse("test", EVALUATION, num_test),
    ]


def run_train_job(job: TrainJob, dataset=None) -> TrainResult:
    """Train ``job.model`` on ``job.dataset`` (or the given ``ImageDataset``), log and register it."""
    from clusterattack import tracking

    if dataset is None:
        from clusterattack.data import load_dataset

        dataset = load_dataset(job.dataset)
    spec = get_spec(job.model)
    device = resolve_device(job.device)
    data = TrainData.from_dataset(dataset, train_limit=job.train_limit, seed=job.seed)
    if device.type == "cuda":
        data = data.to(device)
    config = spec.config(data.input_shape, dataset.num_classes, job.preset)
    overrides = {"epochs": job.epochs} if job.epochs is not None else {}
    recipe = spec.recipe(job.preset, **overrides)
    seed_everything(job.seed)
    model = spec.build(config)
    tracking.configure()
    params = {
        "job": dataclasses.asdict(job),
        "config": dataclasses.asdict(config),
        "recipe": dataclasses.asdict(recipe),
        "device": str(device),
        "precision": job.precision,
        "num_train": data.num_train,
        "num_test": len(data.test_labels),
    }
    tags = {"model": job.model, "dataset": job.dataset, "preset": job.preset, "paper": spec.paper}
    run_name = f"{job.model}-{job.dataset}-{job.preset}-s{job.seed}"
    with tracking.start_run(job.experiment, run_name=run_name, params=params, tags=tags) as run:
        tracking.log_datasets(dataset, victim_data_uses(data.num_train, len(data.test_labels), job))
        ctx = TrainContext(
            device=device,
            seed=job.seed,
            num_threads=job.num_threads,
            checkpoint_dir=job.checkpoint_path,
            resume=job.resume,
            cache_dir=Path(job.cache_dir) if job.cache_dir else None,
            progress=job.progress,
            precision=job.precision,
            on_epoch=lambda rec: tracking.log_metrics(_numeric(rec), step=int(rec["epoch"])),
        )
        ctx.apply_threads()
        t0, c0 = time.perf_counter(), time.process_time()
        outcome = spec.train(model, data, recipe, ctx)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        scores = evaluate_clustering(model, data, ctx)
        result = TrainResult(
            model, scores, wall, cpu, outcome.history, outcome.info, run.info.run_id
        )
        final = {
            **scores,
            "wall_s": wall,
            "cpu_s": cpu,
            "total_wall_s": result.total_wall_s,
            "total_cpu_s": result.total_cpu_s,
            **_numeric(outcome.info),
        }
        tracking.log_metrics(final)
        tracking.log_dict({"history": outcome.history, "info": outcome.info}, "history.json")
        ckpt = save_victim(model, job.checkpoint_path / "victim.pt")
        version = tracking.log_victim(
            model,
            config,
            {k: final[k] for k in ("nmi", "ari", "acc", "wall_s")},
            job.dataset,
            job.register,
            ckpt,
        )
        if version is not None:
            result.model_version = str(version.version)
            result.registered_name = version.name
    log.info("%s", result.summary())
    return result
