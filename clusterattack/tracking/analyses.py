"""Analysis runs in MLflow (transfer, norm curves, detection, PCA, retraining, ...): one contract for all.

A stand-alone analysis (``jobs/transfer.py``, ``jobs/defend.py``) is one run in experiment
``analyses`` with tags ``clusterattack.analysis`` (the kind), ``clusterattack.dataset``,
``gradient_source``, ``norm``, ``eps`` and ``seed``. A sweep's analysis
(``clusterattack.analyses.suite``) is a child run of the sweep's parent run, in the parent's
experiment, tagged ``mlflow.parentRunId``, ``analysis`` (the kind), ``phase`` = "analysis"
and its provenance (victim versions, generators, seeds, selection, code commit); a failed one
ends FAILED with its error in tags ``error`` and ``error_type``. Either way the payload is the
JSON artifact ``analysis/<kind>.json``, figures are PNGs under ``figures/`` and tables
``MlflowClient.log_table`` files under ``tables/``. The report writer reads exactly these,
so the keys here are a contract.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow

from clusterattack.tracking.store import configure, source_tags, start_run

__all__ = [
    "ANALYSIS_EXPERIMENT",
    "ANALYSIS_KINDS",
    "CHILD_TAG",
    "ERROR_TAG",
    "REQUESTED_TAG",
    "TAG_ANALYSIS",
    "TAG_DATASET",
    "download_registered_generator",
    "finish_analysis_run",
    "log_analysis",
    "log_analysis_artifacts",
    "read_analysis",
    "registered_generator_info",
    "set_parent_tags",
    "start_analysis_run",
    "sweep_analysis_runs",
    "sweep_trial_runs",
]

log = logging.getLogger(__name__)

ANALYSIS_EXPERIMENT = "analyses"
ANALYSIS_KINDS = (
    "breakdown", "norm_curves", "transfer", "detection", "pca", "retraining", "baselines", "query_detection",
)  # fmt: skip
TAG_ANALYSIS = "clusterattack.analysis"
TAG_DATASET = "clusterattack.dataset"
GENERATOR_ARTIFACT = "generator/generator.pt"
PARENT_TAG = "mlflow.parentRunId"
#: Tag naming the analysis a sweep's child run holds.
CHILD_TAG = "analysis"
#: Tags of a failed analysis run: the error's text and its type.
ERROR_TAG = "error"
ERROR_TYPE_TAG = "error_type"
#: Tag on a sweep's parent run: the analyses the sweep asked for (comma-separated kinds).
REQUESTED_TAG = "analyses.requested"
_TAG_LIMIT = 5000  # MLflow's longest tag value is 8000 characters


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
        log_analysis_artifacts(run_id, kind, payload, figures=figures, tables=tables, files=files, metrics=metrics)
    log.info("logged %s analysis run %s (%s)", kind, run_id, tags)
    return run_id


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def log_analysis_artifacts(
    run_id: str,
    kind: str,
    payload: Mapping[str, Any],
    *,
    figures: Mapping[str, Any] | None = None,
    tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    files: Mapping[str, str | Path] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> None:
    """Write an analysis's payload, figures, tables, files and metrics into the existing run ``run_id``.

    The run is left as it is (open or not): the caller ends it. See :func:`log_analysis`
    for what goes where.
    """
    import pandas as pd
    from mlflow.entities import Metric

    if kind not in ANALYSIS_KINDS:
        raise ValueError(f"analysis kind must be one of {ANALYSIS_KINDS}, got {kind!r}")
    client = mlflow.MlflowClient()
    client.log_dict(run_id, _jsonable(dict(payload)), f"analysis/{kind}.json")
    values = _finite(metrics or {})
    now = int(1000 * time.time())
    items = [Metric(k, v, now, 0) for k, v in values.items()]
    for start in range(0, len(items), 900):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=items[start : start + 900], synchronous=True)
    for name, rows in (tables or {}).items():
        frame = pd.DataFrame([_jsonable(dict(r)) for r in rows])
        client.log_table(run_id, frame, f"tables/{name}.json")
    for name, fig in (figures or {}).items():
        client.log_figure(run_id, fig, f"figures/{name}.png")
    for artifact_path, local in (files or {}).items():
        parent, _, base = artifact_path.rpartition("/")
        local = Path(local)
        if local.name != base:
            raise ValueError(f"file {local} must have the artifact's base name {base!r}")
        client.log_artifact(run_id, str(local), artifact_path=parent or None)


# ------------------------------------------------------------------ a sweep's analyses
def start_analysis_run(
    parent_run_id: str,
    kind: str,
    tags: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
    run_name: str | None = None,
) -> str:
    """A RUNNING child run of the sweep's parent run for analysis ``kind``; returns its id.

    It lives in the parent's experiment (so the MLflow UI nests it under the sweep) and is
    tagged ``mlflow.parentRunId``, ``analysis`` = ``kind``, ``phase`` = "analysis", the code
    that made it (``source_tags``) and ``tags`` (its provenance); ``params`` are logged as
    parameters (its sizes).
    """
    if kind not in ANALYSIS_KINDS:
        raise ValueError(f"analysis kind must be one of {ANALYSIS_KINDS}, got {kind!r}")
    configure()
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    all_tags = {
        **source_tags(),
        **{k: _tag(v)[:_TAG_LIMIT] for k, v in tags.items()},
        PARENT_TAG: parent_run_id,
        CHILD_TAG: kind,
        TAG_ANALYSIS: kind,
        "phase": "analysis",
    }
    run = client.create_run(parent.info.experiment_id, tags=all_tags, run_name=run_name or f"analysis-{kind}")
    if params:
        from mlflow.entities import Param

        items = [Param(k, (json.dumps(v) if isinstance(v, list | tuple) else str(v))[:_TAG_LIMIT]) for k, v in params.items()]
        for start in range(0, len(items), 90):  # log_batch takes at most 100 params
            client.log_batch(run.info.run_id, params=items[start : start + 90], synchronous=True)
    return run.info.run_id


def set_parent_tags(parent_run_id: str, tags: Mapping[str, Any]) -> None:
    """Tags on a sweep's parent run (e.g. :data:`REQUESTED_TAG`, the analyses it asked for)."""
    configure()
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, _tag(value)[:_TAG_LIMIT])


def finish_analysis_run(run_id: str, status: str = "FINISHED", error: BaseException | str | None = None) -> None:
    """End an analysis child run: FINISHED, FAILED (``error`` goes to tags ``error``/``error_type``) or KILLED."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
    configure()
    client = mlflow.MlflowClient()
    if error is not None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        client.set_tag(run_id, ERROR_TAG, text[:_TAG_LIMIT])
        if not isinstance(error, str):
            client.set_tag(run_id, ERROR_TYPE_TAG, type(error).__name__)
    client.set_terminated(run_id, status=status)


def sweep_analysis_runs(parent_run_id: str) -> dict[str, Any]:
    """The newest child run of each analysis kind under a sweep's parent run (``mlflow.entities.Run``)."""
    configure()
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.phase = 'analysis'",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    out: dict[str, Any] = {}
    for run in runs:
        kind = run.data.tags.get(CHILD_TAG)
        if kind in ANALYSIS_KINDS:
            out.setdefault(kind, run)
    return out


def sweep_trial_runs(parent_run_id: str) -> list[dict[str, Any]]:
    """Every search trial and seed run under a sweep's parent run: ``trial_id``, ``run_id``, ``tags``, ``metrics``."""
    configure()
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10_000
    )
    return [
        {"trial_id": r.data.tags["trial_id"], "run_id": r.info.run_id, "tags": dict(r.data.tags),
         "metrics": dict(r.data.metrics)}
        for r in runs
        if r.data.tags.get("trial_id") and r.data.tags.get("phase") != "analysis"
    ]  # fmt: skip


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
