"""Attack runs in MLflow: config, query counts, evaluation, figures and the generator itself."""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from clusterattack.tracking.datasets import EVALUATION, TRAINING, DatasetUse
from clusterattack.tracking.models import log_torch_model
from clusterattack.tracking.store import (
    configure,
    ensure_experiment,
    log_datasets,
    log_metrics,
    log_params,
    source_tags,
)

__all__ = [
    "ATTACK_EXPERIMENT",
    "GENERATOR_ARTIFACT",
    "LiveAttackRun",
    "attack_data_uses",
    "attack_run_name",
    "download_generator",
    "generator_model_name",
    "log_attack_report",
]

log = logging.getLogger(__name__)

ATTACK_EXPERIMENT = "attacks"
GENERATOR_ARTIFACT = "generator/generator.pt"
_MODEL_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


def generator_model_name(victim: str, dataset: str) -> str:
    """Name of an attack run's logged generator model: ``generator-<victim>-<dataset>`` (other
    characters than letters, digits, ``_ . -`` become ``_``: a victim may be a file or a URL)."""
    return _MODEL_NAME_BAD.sub("_", f"generator-{victim}-{dataset}")[:200]


def attack_data_uses(eval_images: int | None = None, subset_seed: int | None = None) -> list[DatasetUse]:
    """What an attack run does with its data set: the training split is the attacker's pool
    (``training``, no label read), ``eval_images`` of the test split score it (``evaluation``)."""
    return [
        DatasetUse("train", TRAINING),
        DatasetUse("test", EVALUATION, eval_images, subset_seed if eval_images is not None else None),
    ]


def attack_run_name(victim: str, config: Any) -> str:
    """``<victim>-<source>-<norm>-eps<eps>[-...]-s<seed>``: what the attack was, readable in the MLflow UI.

    Beyond the gradient source, norm, eps and seed, the name carries the choices that
    change what a run measured when they differ from the defaults: the attack term, a
    target cluster, a sharpened mutual-information term, the loss weights (``aa`` alpha_a, ``ac`` alpha_c, ``ag`` alpha_gan), the generator's
    training images (``n``), its learning-rate steps (``lr<milestones>x<gamma>``), the
    held-out images that pick the epoch kept (``sel``), the surrogate's architecture and
    ensemble, and the estimator's method, samples and transfer prior. Every parameter is logged with the run anyway; the
    name is for telling runs apart in a list.
    """
    from clusterattack.attacks.config import AttackConfig, EstimatorConfig, SurrogateConfig

    parts = [victim, config.gradient_source, f"{config.norm}-eps{config.eps:g}"]
    if config.attack_loss != AttackConfig.attack_loss:
        parts.append(config.attack_loss)
    if config.target_cluster is not None:
        parts.append(f"target{config.target_cluster}")
    untargeted_mi = config.attack_loss == "mutual_info" and config.target_cluster is None
    if untargeted_mi and config.mi_temperature != AttackConfig.mi_temperature:
        parts.append(f"T{config.mi_temperature:g}")
    for tag, field in (("aa", "alpha_a"), ("ac", "alpha_c"), ("ag", "alpha_gan")):
        if getattr(config, field) != getattr(AttackConfig, field):
            parts.append(f"{tag}{getattr(config, field):g}")
    if config.train_limit is not None:
        parts.append(f"n{config.train_limit}")
    if config.lr_milestones:
        parts.append("lr" + "_".join(str(m) for m in config.lr_milestones) + f"x{config.lr_gamma:g}")
    if config.select_images:
        parts.append(f"sel{config.select_images}")
    if config.gradient_source == "surrogate" or config.estimator.prior == "surrogate":
        sur = config.surrogate
        if sur.arch != SurrogateConfig.arch:
            parts.append(sur.arch)
        if sur.ensemble != SurrogateConfig.ensemble:
            parts.append(f"ens{sur.ensemble}")
        if sur.augment != SurrogateConfig.augment:
            parts.append("aug" if sur.augment else "noaug")
        if sur.online and sur.online_fraction != SurrogateConfig.online_fraction:
            parts.append(f"of{sur.online_fraction:g}")
    if config.gradient_source == "estimate":
        est = config.estimator
        if est.method != EstimatorConfig.method:
            parts.append(est.method)
        parts.append(f"q{est.samples}")
        if est.prior != EstimatorConfig.prior:
            parts.append(f"prior-{est.prior}")
    parts.append(f"s{config.seed}")
    return "-".join(parts)


def log_attack_report(
    report: Any,
    experiment: str = ATTACK_EXPERIMENT,
    run_name: str | None = None,
    data: Any = None,
    data_uses: list[DatasetUse] | None = None,
) -> str:
    """Log an ``AttackReport`` (of ``run_attack``, say in a notebook) as one MLflow run; returns its id.

    Params: the full attack config (flat) plus victim and dataset. Metrics: query counts,
    convergence and every numeric evaluation entry, and the per-epoch history as steps.
    Tags: victim, dataset, gradient source, norm, eps, attack loss, seed and why training
    stopped, so runs filter by them. Artifacts: ``record.json`` (everything, cluster size
    histograms included), the figures, and the generator file with its config; the generator
    is also the run's logged model. ``data`` (an ImageDataset or a Parquet URI) is listed as
    the run's inputs (``data_uses``, default :func:`attack_data_uses`).
    """
    with LiveAttackRun(
        report.victim, report.dataset, report.result.config, experiment=experiment, run_name=run_name,
        data=data, data_uses=data_uses,
    ) as live:
        for row in report.result.history:
            live.log_epoch(row)
        return live.finish(report)


class LiveAttackRun:
    """An attack's MLflow run, open while its generator trains.

    Entering logs the params and tags (the run shows as RUNNING in the UI), ``log_epoch``
    streams each finished epoch's training metrics (``train.*``, step = epoch) and
    ``finish`` adds the report (metrics, ``record.json``, figures, generator) and the
    ``stopped`` tag. Leaving the ``with`` block on an exception ends the run FAILED (KILLED
    on Ctrl-C) with the error in the tag ``error``, keeping every epoch already streamed.
    ``run_id`` reopens an earlier run, so a resumed attack goes on in its own run.
    ``data`` (the ``ImageDataset`` the attack reads, or its Parquet URI) is listed as the run's
    inputs, ``data_uses`` saying which splits in which role (default :func:`attack_data_uses`:
    the pool as training, the test split as evaluation).
    """

    def __init__(
        self,
        victim: str,
        dataset: str,
        config: Any,
        experiment: str = ATTACK_EXPERIMENT,
        run_id: str | None = None,
        run_name: str | None = None,
        data: Any = None,
        data_uses: list[DatasetUse] | None = None,
    ) -> None:
        self.victim, self.dataset, self.config = victim, dataset, config
        self.experiment = experiment
        self.run_id = run_id
        self.name = run_name or attack_run_name(victim, config)
        self.data = data
        self.data_uses = attack_data_uses() if data_uses is None else list(data_uses)

    def __enter__(self) -> LiveAttackRun:
        configure()
        if self.run_id is not None:
            try:
                mlflow.start_run(run_id=self.run_id)
            except MlflowException as err:
                # Another tracking store than the checkpoint's: go on in a new run.
                log.warning("cannot reopen MLflow run %s (%s); starting a new one", self.run_id, err)
                self.run_id = None
            else:
                mlflow.set_tag("resumed", "true")
                log.info("MLflow run %s (%s) resumed", self.run_id, self.name)
                return self
        config = self.config
        tags = {
            "victim": self.victim,
            "dataset": self.dataset,
            "gradient_source": config.gradient_source,
            "norm": config.norm,
            "eps": str(config.eps),
            "attack_loss": config.attack_loss,
            "seed": str(config.seed),
            "black_box": str(config.black_box),
            **source_tags(),
        }
        run = mlflow.start_run(experiment_id=ensure_experiment(self.experiment), run_name=self.name, tags=tags)
        log_params({"victim": self.victim, "dataset": self.dataset, **config.flat()})
        self.run_id = run.info.run_id
        if self.data is not None:
            log_datasets(self.data, self.data_uses)
        log.info("MLflow run %s (%s) streams the training metrics", self.run_id, self.name)
        return self

    def log_epoch(self, row: dict[str, Any]) -> None:
        _log_epoch_row(row)

    def finish(self, report: Any) -> str:
        mlflow.set_tag("stopped", str(report.result.stopped))
        _log_report(report)
        log.info("logged attack run %s (%s)", self.run_id, self.name)
        return str(self.run_id)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            mlflow.end_run()
            return False
        mlflow.set_tag("error", f"{exc_type.__name__}: {exc}"[:5000])
        status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        mlflow.end_run(status=status)
        log.warning("MLflow run %s ended %s: %s", self.run_id, status, exc)
        return False


def _log_epoch_row(row: dict[str, Any]) -> None:
    log_metrics({f"train.{k}": v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def _log_report(report: Any) -> None:
    """The report's metrics, record, history, figures and generator, on the active run."""
    from clusterattack.attacks.io import save_generator

    record = report.record()
    log_metrics({k: v for k, v in record.items() if k not in ("eps", "seed")})
    mlflow.log_dict(json.loads(json.dumps(record, default=str)), "record.json")
    mlflow.log_dict({"history": report.result.history, "source": report.result.source}, "history.json")
    for key, fig in report.figures.items():
        mlflow.log_figure(fig, f"figures/{key}.png")
    with tempfile.TemporaryDirectory() as tmp:
        path = save_generator(
            report.result.generator,
            report.result.config,
            Path(tmp) / "generator.pt",
            extra={"victim": record["victim"], "dataset": record["dataset"], "evaluation": report.evaluation},
        )
        mlflow.log_artifact(str(path), artifact_path="generator")
    run = mlflow.active_run()
    client = MlflowClient()
    config = report.result.config
    log_torch_model(
        client,
        run.info.run_id,
        report.result.generator,
        generator_model_name(str(record["victim"]), str(record["dataset"])),
        model_type="generator",
        params=client.get_run(run.info.run_id).data.params,
        tags={
            "victim": record["victim"], "dataset": record["dataset"], "gradient_source": config.gradient_source,
            "norm": config.norm, "eps": f"{config.eps:g}", "seed": config.seed, "stopped": report.result.stopped,
        },  # fmt: skip
    )


def download_generator(run_id: str, dst: str | Path | None = None) -> Path:
    """Local path of the generator file of attack run ``run_id`` (load it with attacks.io.load_generator)."""
    configure()
    out = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=GENERATOR_ARTIFACT, dst_path=None if dst is None else str(dst))
    return Path(out)
