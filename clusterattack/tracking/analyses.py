"""Analysis runs in MLflow (transfer, norm curves, detection, PCA, retraining): one contract for all.

Every analysis is one run in experiment ``analyses`` with tags ``clusterattack.analysis``
(the kind), ``clusterattack.dataset``, ``gradient_source``, ``norm``, ``eps`` and ``seed``;
its payload is the JSON artifact ``analysis/<kind>.json``, its figures PNGs under
``figures/`` and its tables ``MlflowClient.log_table`` files under ``tables/``. The report
writer reads exactly these, so the keys here are a contract.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow

from clusterattack.tracking.store import configure, log_metrics, start_run

__all__ = [
    "ANALYSIS_EXPERIMENT",
    "ANALYSIS_KINDS",
    "TAG_ANALYSIS",
    "TAG_DATASET",
    "download_registered_generator",
    "log_analysis",
    "read_analysis",
    "registered_generator_info",
]

log = logging.getLogger(__name__)

ANALYSIS_EXPERIMENT = "analyses"
ANALYSIS_KINDS = ("transfer", "norm_curves", "detection", "pca", "retraining")
TAG_ANALYSIS = "clusterattack.analysis"
TAG_DATASET = "clusterattack.dataset"
GENERATOR_ARTIFACT = "generator/generator.pt"


def _jsonable(value: Any) -> Any:
    """NaN/inf become None (JSON has neither); numpy scalars and tuples become plain values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _tag(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def log_analysis(
    kind: str,
    payload: Mapping[str, Any],
    *,
    dataset: str,
    gradient_source: str | None,
    norm: str | None,
    eps: float | str | None,
    seed: int,
    figures: Mapping[str, Any] | None = None,
    tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    files: Mapping[str, str | Path] | None = None,
    metrics: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    experiment: str = ANALYSIS_EXPERIMENT,
) -> str:
    """Log one analysis as an MLflow run in ``experiment``; returns the run id.

    ``payload`` goes to ``analysis/<kind>.json`` as given (NaN -> null). ``figures``
    (name -> matplotlib Figure) go to ``figures/<name>.png``; ``tables`` (name -> list of
    row dicts) to ``tables/<name>.json`` through ``MlflowClient.log_table``; ``files``
    (artifact path -> local file) are logged at that path. ``eps`` may be a string (e.g.
    "0.05..0.2" for a norm curve over a range). Finite numeric ``metrics`` are logged too.
    """
    if kind not in ANALYSIS_KINDS:
        raise ValueError(f"analysis kind must be one of {ANALYSIS_KINDS}, got {kind!r}")
    if not dataset:
        raise ValueError(f"dataset must be a non-empty name, got {dataset!r}")
    import pandas as pd

    configure()
    tags = {
        TAG_ANALYSIS: kind,
        TAG_DATASET: dataset,
        "gradient_source": _tag(gradient_source),
        "norm": _tag(norm),
        "eps": _tag(eps),
        "seed": _tag(seed),
    }
    with start_run(experiment, run_name=run_name or f"{kind}-{dataset}", tags=tags) as run:
        run_id = run.info.run_id
        mlflow.log_dict(_jsonable(dict(payload)), f"analysis/{kind}.json")
        if metrics:
            log_metrics(metrics)
        client = mlflow.MlflowClient()
        for name, rows in (tables or {}).items():
            frame = pd.DataFrame([_jsonable(dict(r)) for r in rows])
            client.log_table(run_id, frame, f"tables/{name}.json")
        for name, fig in (figures or {}).items():
            mlflow.log_figure(fig, f"figures/{name}.png")
        for artifact_path, local in (files or {}).items():
            parent, _, _ = artifact_path.rpartition("/")
            local = Path(local)
            if local.name != artifact_path.rsplit("/", 1)[-1]:
                raise ValueError(
                    f"file {local} must have the artifact's base name {artifact_path.rsplit('/', 1)[-1]!r}"
                )
            mlflow.log_artifact(str(local), artifact_path=parent or None)
    log.info("logged %s analysis run %s (%s)", kind, run_id, tags)
    return run_id


def read_analysis(run_id: str, kind: str) -> dict[str, Any]:
    """The payload ``analysis/<kind>.json`` of run ``run_id`` (what the report writer reads)."""
    configure()
    return dict(mlflow.artifacts.load_dict(f"runs:/{run_id}/analysis/{kind}.json"))


def download_registered_generator(name: str, version: str | None = None, dst: str | Path | None = None) -> Path:
    """Local path of the generator file of a registered generator ``name`` (``generator-<m>-<ds>``).

    ``version`` None means the newest version. The file is the artifact
    ``generator/generator.pt`` of the run that registered the version (see
    ``tracking.sweeps.SweepTracker.log_generator``); load it with ``attacks.io.load_generator``.
    """
    run_id = registered_generator_info(name, version)["run_id"]
    out = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=GENERATOR_ARTIFACT, dst_path=None if dst is None else str(dst)
    )
    return Path(out)


def json_dumps(payload: Mapping[str, Any]) -> str:
    """The payload as the JSON text logged (NaN -> null), for printing and files."""
    return json.dumps(_jsonable(dict(payload)), indent=2)


def registered_generator_info(name: str, version: str | None = None) -> dict[str, Any]:
    """Run id, version, tags and final metrics of the run behind registered generator ``name``."""
    configure()
    client = mlflow.MlflowClient()
    if version is None:
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise ValueError(f"no registered generator named {name!r} in {mlflow.get_tracking_uri()}")
        version = str(max(int(v.version) for v in versions))
    mv = client.get_model_version(name, str(version))
    run = client.get_run(mv.run_id)
    return {
        "name": name,
        "version": str(version),
        "run_id": mv.run_id,
        "tags": dict(run.data.tags),
        "metrics": dict(run.data.metrics),
    }
