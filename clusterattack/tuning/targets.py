"""Getting one sweep target ready: its data set as Parquet, its victim trained or reused, served on Serve."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from clusterattack.tuning.config import SweepConfig, target_name

__all__ = [
    "PreparedTarget", "app_name", "data_uri", "ensure_victim", "load_target_data", "serve_victim", "sweep_detection",
]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedTarget:
    """A victim ready to attack: its data slices, its registry entry (or specification) and its Serve app.

    ``model`` is the target's name (a zoo model, or an own model's display name);
    ``victim_name`` what it is: ``victim-<model>-<dataset>`` or the specification's text.
    """

    model: str
    dataset: str
    data_uri: str
    victim_name: str
    victim_version: str
    victim_scores: dict[str, str]
    app_name: str
    train_images: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def data_uri(config: SweepConfig, dataset: str) -> str:
    """Where ``dataset`` is stored as Parquet: ``<data_dir>/<dataset>`` (absolute for a local folder)."""
    if "://" in config.data_dir:
        return f"{config.data_dir.rstrip('/')}/{dataset}"
    return os.path.join(os.path.abspath(config.data_dir), dataset)


def app_name(experiment: str, model: str, dataset: str) -> str:
    """Serve application of a target, unique per sweep (two sweeps may share a cluster)."""
    digest = hashlib.sha1(experiment.encode()).hexdigest()[:6]
    return f"{model}-{dataset}-{digest}"


def load_target_data(config: SweepConfig, dataset: str) -> tuple[str, Any]:
    """(Parquet URI, ImageDataset) of ``dataset``: ingested on first use, read back from Parquet."""
    from clusterattack.data import ensure_dataset, read_parquet_dataset

    uri = ensure_dataset(dataset, data_uri(config, dataset))
    return uri, read_parquet_dataset(uri)


def ensure_victim(
    config: SweepConfig, model: str, dataset: str, data: Any, workdir: str | os.PathLike[str]
) -> tuple[Any, str, str, dict[str, str]]:
    """The newest registered ``victim-<model>-<dataset>``, trained and registered first if missing.

    A victim trained here keeps its checkpoint and shared pretext cache under
    ``<workdir>/victims``. Returns (module in eval mode on CPU, registered name, version,
    the version's tags).
    """
    from clusterattack.tracking import registered_name
    from clusterattack.tracking.sweeps import newest_version
    from clusterattack.victims.io import load_victim

    name = registered_name(model, dataset)
    version = newest_version(name)
    if version is None:
        from clusterattack.victims.pipeline import TrainJob, run_train_job

        log.info("%s is not registered: training it (preset %s)", name, config.victim_preset)
        job = TrainJob(
            model=model,
            dataset=dataset,
            preset=config.victim_preset,
            seed=config.seed,
            epochs=config.victim_epochs,
            train_limit=config.victim_train_limit,
            progress=False,
            checkpoint_dir=os.path.join(workdir, "victims", f"{model}-{dataset}"),
            cache_dir=os.path.join(workdir, "victims", "cache"),
        )
        run_train_job(job, dataset=data)
        version = newest_version(name)
        if version is None:
            raise RuntimeError(f"training {model} on {dataset} did not register {name}")
    else:
        log.info("reusing %s version %s", name, version.version)
    module = load_victim(f"models:/{name}/{version.version}", device="cpu")
    return module, name, str(version.version), dict(version.tags)


def own_victim(spec: str, data: Any) -> tuple[Any, str]:
    """A picklable factory serving victim specification ``spec`` (resolved and probed here, so a
    bad one fails before any trial) and its version: a digest of the model file when it is one,
    else of the specification's text."""
    import hashlib
    from pathlib import Path

    from clusterattack.victims.sources import VictimFactory, parse_victim_spec, resolve_victim

    victim = resolve_victim(spec, dataset=tuple(data.shape))
    if not hasattr(victim, "predict_proba"):
        raise ValueError(
            f"{spec} answers cluster ids only: the sweep's gradient sources need memberships. Attack a "
            "decision-only model with jobs/attack.py --gradient-source surrogate (its label-based path)"
        )
    factory = VictimFactory.for_serving(spec, mode="scores", input_shape=tuple(data.shape))
    parsed = parse_victim_spec(spec)
    path = Path(parsed.target.split(":", 1)[0]) if parsed.kind in ("onnx", "torchscript", "file", "python") else None
    payload = path.read_bytes() if path is not None and path.is_file() else spec.encode()
    log.info("own victim %s: %d clusters, input %s", spec, victim.num_clusters, tuple(victim.input_shape))
    return factory, "sha256:" + hashlib.sha256(payload).hexdigest()[:12]


def sweep_detection(config: SweepConfig) -> Any:
    """The query detection of the sweep's deployments (a ``DetectionConfig``): ``flag`` when the
    ``query_detection`` analysis is asked (every query screened and recorded, answers unchanged,
    so the attack is the same), else ``off``."""
    from clusterattack.serving.detection import DetectionConfig

    return DetectionConfig(policy="flag" if "query_detection" in config.analyses else "off")


def serve_victim(config: SweepConfig, name: str, module: Any, ledger: Any) -> None:
    """Deploy ``module`` (a model, or a factory of one) as Serve application ``name`` (scores
    mode) with the sweep's budget ledger and query detection (:func:`sweep_detection`)."""
    from clusterattack.serving import ServeConfig, deploy_victim

    serve_config = ServeConfig(
        mode="scores",
        num_replicas=1,
        # Trials hold the cluster's logical CPUs; a replica that asked for one would wait
        # for a trial to end. Its forward passes are small next to a trial's training.
        num_cpus=config.replica_cpus,
        num_gpus=config.replica_gpus,
        torch_threads=1 if config.replica_gpus == 0 else None,
        max_batch_size=256,
        max_ongoing_requests=32,
        # Trials make thousands of calls: a log line each would bury the sweep's own output.
        access_log=False,
    )
    detection = sweep_detection(config)
    deploy_victim(module, name=name, config=serve_config, ledger=ledger, detection=detection)
    log.info("victim app %s deployed (query detection %s)", name, detection.policy)


def prepare_target(
    config: SweepConfig, model: str, dataset: str, ledger: Any, workdir: str | os.PathLike[str]
) -> PreparedTarget:
    """Data, victim and Serve app of one target (the slices trials receive are seeded).

    ``model`` is a zoo model (trained and registered first when missing) or a victim
    specification of one's own (served as it is; nothing is trained).
    """
    from clusterattack.victims.registry import VICTIMS

    uri, data = load_target_data(config, dataset)
    if model in VICTIMS:
        module, victim_name, version, tags = ensure_victim(config, model, dataset, data, workdir)
    else:
        module, version = own_victim(model, data)
        victim_name, tags = model, {}
    model = target_name(model)
    name = app_name(config.experiment, model, dataset)
    serve_victim(config, name, module, ledger)
    train = data.subset("train", limit=config.train_pool, seed=config.seed)
    test = data.subset("test", limit=config.eval_limit, seed=config.seed)
    return PreparedTarget(
        model=model,
        dataset=dataset,
        data_uri=uri,
        victim_name=victim_name,
        victim_version=version,
        victim_scores={k: v for k, v in tags.items() if k in ("nmi", "ari", "acc")},
        app_name=name,
        train_images=np.ascontiguousarray(train.images),
        test_images=np.ascontiguousarray(test.images),
        test_labels=np.ascontiguousarray(test.labels),
    )
