"""Sweeps in MLflow: a parent run per sweep, a child run per trial, summary tables, best generators.

Everything goes through one ``MlflowClient`` with explicit run ids, never the fluent
"active run", so the sweep driver can write any trial's run from Tune callbacks while
other code runs. Child runs carry ``mlflow.parentRunId`` (the UI nests them under the
sweep) and a ``trial_id`` tag, by which a resumed sweep finds and continues them.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import LoggedModel, Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from clusterattack.data.errors import DatasetError
from clusterattack.tracking.datasets import DatasetUse, dataset_inputs, log_dataset_inputs
from clusterattack.tracking.models import find_logged_model, log_torch_model, register_logged_model
from clusterattack.tracking.store import configure, ensure_experiment, flatten, source_tags
from clusterattack.tracking.ui import (
    SweepView,
    experiment_url,
    models_url,
    run_url,
    sweep_views,
    views_markdown,
    write_sweep_views,
)

__all__ = [
    "PARENT_TAG",
    "RECORDING_ERRORS",
    "SWEEP_EXPERIMENT",
    "SweepRecorder",
    "generator_name",
    "newest_version",
]

log = logging.getLogger(__name__)

#: MLflow experiment every sweep's parent run lives in, so the UI compares sweeps too.
SWEEP_EXPERIMENT = "sweeps"
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "trial_id"
_NAME_PART = re.compile(r"^[A-Za-z0-9_.]+$")
_PARAM_LIMIT = 6000  # MLflow rejects longer parameter values
_BATCH = 900  # log_batch takes at most 1000 metrics
#: What writing a record can raise (store, data set manifest, files): a Tune callback that
#: only records catches these so that a lost record never stops a sweep.
RECORDING_ERRORS: tuple[type[Exception], ...] = (MlflowException, DatasetError, OSError, ValueError)


def generator_name(model: str, dataset: str) -> str:
    """Registry name of the best generator against a victim: ``generator-<model>-<dataset>``."""
    for what, value in (("model", model), ("dataset", dataset)):
        if not _NAME_PART.match(value or ""):
            raise ValueError(f"{what} name must use letters, digits, '_' or '.', got {value!r}")
    return f"generator-{model}-{dataset}"


def newest_version(name: str) -> ModelVersion | None:
    """The newest version of registered model ``name``, or None when it has none."""
    client = MlflowClient(tracking_uri=configure())
    versions = client.search_model_versions(f"name = '{name}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)
    return text[:_PARAM_LIMIT]


def _finite_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class SweepRecorder:
    """Writes one sweep to MLflow: its parent run, its trials' child runs, tables and models.

    Picklable (it holds names, not connections): a Tune callback that owns one is saved
    with the experiment and works again after ``Tuner.restore``.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = SWEEP_EXPERIMENT) -> None:
        self.tracking_uri = configure(tracking_uri)
        self.experiment = experiment
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "experiment": self.experiment}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracking_uri"], state["experiment"])

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            configure(self.tracking_uri)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            configure(self.tracking_uri)
            self._experiment_id = ensure_experiment(self.experiment)
        return self._experiment_id

    # ------------------------------------------------------------------ runs
    def start_parent(
        self,
        run_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        run_id: str | None = None,
    ) -> str:
        """Create the sweep's parent run, or reopen ``run_id`` (a resumed sweep); returns its id."""
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
            except MlflowException as err:
                raise ValueError(
                    f"parent run {run_id} of the sweep being resumed is not in the store "
                    f"{self.tracking_uri}: resume with the MLFLOW_TRACKING_URI it started with"
                ) from err
            self.set_tags(run_id, {**tags, "resumed": "true"})
            return run_id
        run = self.client.create_run(self.experiment_id, tags={**source_tags(), **tags}, run_name=run_name)
        self.log_params(run.info.run_id, params)
        self.write_views(run.info.run_id, str(tags.get("sweep") or run_name))
        log.info("sweep %s: parent run %s in experiment %r", run_name, run.info.run_id, self.experiment)
        return run.info.run_id

    def write_views(self, parent_run_id: str, sweep: str) -> list[SweepView]:
        """Shared MLflow UI views of the sweep (seed runs by victim, Table 1 rows; see ``tracking.ui``),
        linked from the parent run's description and its tag ``ui.views``."""
        views = write_sweep_views(self.client, self.experiment_id, sweep, parent_run_id)
        links = views_markdown("", self.experiment_id, views)
        self.set_tags(
            parent_run_id,
            {
                "mlflow.note.content": f"Sweep **{sweep}**: compare its runs in the MLflow UI\n\n{links}\n",
                "ui.views": ",".join(v.key for v in views),
            },
        )
        return views

    def trial_run(
        self,
        parent_run_id: str,
        trial_id: str,
        run_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
    ) -> str:
        """The child run of ``trial_id``: found under the parent (a retry, a resume) or created."""
        found = self.find_trial_run(parent_run_id, trial_id)
        if found is not None:
            if found.info.status != "RUNNING":
                self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        all_tags = {**source_tags(), **tags, PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id}
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=run_name)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def ui_links(self, parent_run_id: str, base: str = "http://127.0.0.1:5000") -> dict[str, str]:
        """Title -> address of the sweep's pages in an MLflow UI served at ``base``: its shared views
        (charts), the experiment's runs and logged models, in the model-training view."""
        tags = self.client.get_run(parent_run_id).data.tags
        keys = [k for k in tags.get("ui.views", "").split(",") if k]
        sweep = tags.get("sweep") or parent_run_id
        titles = {v.key: v.title for v in sweep_views(sweep, parent_run_id)}
        links = {titles.get(k, k): experiment_url(base, self.experiment_id, k, charts=True) for k in keys}
        links["runs of the experiment"] = experiment_url(base, self.experiment_id)
        links["logged models (generators)"] = models_url(base, self.experiment_id)
        links["the sweep's parent run"] = run_url(base, self.experiment_id, parent_run_id)
        return links

    def find_trial_run(self, parent_run_id: str, trial_id: str) -> Any | None:
        """The child run of ``trial_id`` under the parent (``mlflow.entities.Run``), or None."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
            max_results=1,
        )
        return found[0] if found else None

    def child_runs(self, parent_run_id: str) -> list[Any]:
        """Every trial run of a sweep (``mlflow.entities.Run``)."""
        return list(
            self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10_000
            )
        )

    def last_step(self, run_id: str, key: str = "epoch") -> int | None:
        """The largest step metric ``key`` was logged at in ``run_id`` (None: never)."""
        history = self.client.get_metric_history(run_id, key)
        return max((m.step for m in history), default=None)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        flat = flatten(params)
        items = [Param(k, _param_value(v)) for k, v in flat.items()]
        for start in range(0, len(items), 90):  # log_batch takes at most 100 params
            self.client.log_batch(run_id, params=items[start : start + 90], synchronous=True)

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log the finite numeric entries of ``metrics`` at ``step`` (others are skipped)."""
        now = int(1000 * time.time())
        items = [Metric(k, v, now, int(step)) for k, v in _finite_metrics(metrics).items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, metrics=items[start : start + _BATCH], synchronous=True)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items:
            self.client.log_batch(run_id, tags=items, synchronous=True)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Close a run: FINISHED, FAILED or KILLED (interrupted; a resume reopens it)."""
        self.client.set_terminated(run_id, status=status)

    # ------------------------------------------------------------------ artifacts
    def log_table(self, run_id: str, rows: Sequence[Mapping[str, Any]], name: str, folder: str | Path) -> dict[str, Path]:
        """Log ``rows`` as an MLflow table (``tables/<name>.json``) and as CSV and Parquet artifacts.

        The CSV and Parquet files are written to ``folder`` first (paths returned), so the
        tables can be read without MLflow as well.
        """
        import pandas as pd

        frame = pd.DataFrame(list(rows))
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"csv": folder / f"{name}.csv", "parquet": folder / f"{name}.parquet"}
        frame.to_csv(paths["csv"], index=False)
        frame.to_parquet(paths["parquet"], index=False)
        self.client.log_table(run_id, data=frame, artifact_file=f"tables/{name}.json")
        for path in paths.values():
            self.client.log_artifact(run_id, str(path), artifact_path="tables")
        return paths

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path=artifact_path)

    def log_generator_model(
        self,
        run_id: str,
        generator: torch.nn.Module,
        name: str,
        tags: Mapping[str, Any] | None = None,
        step: int = 0,
    ) -> LoggedModel:
        """Log ``generator`` as logged model ``name`` of run ``run_id`` (MLflow 3, no registration).

        The model carries the run's params and ``tags``; MLflow copies the run's metrics at
        ``step`` onto it (a seed run's scores: its final step), so the experiment's Models tab
        compares generators. A seed run's generator is logged once it completes.
        """
        configure(self.tracking_uri)
        params = self.client.get_run(run_id).data.params
        model, _ = log_torch_model(
            self.client, run_id, generator, name, model_type="generator", params=params, tags=tags, step=step
        )
        return model

    def log_generator(
        self,
        run_id: str,
        generator: torch.nn.Module,
        registered_name: str,
        generator_file: str | Path,
        tags: Mapping[str, Any],
    ) -> ModelVersion:
        """Register the generator of ``run_id`` as a version of ``registered_name``.

        The run's logged model ``registered_name`` (logged when the seed run completed, see
        :meth:`log_generator_model`) is registered; a run without one gets it logged first.
        ``generator_file`` (``attacks.io.save_generator`` output: weights, config, victim)
        is stored beside it as the run artifact ``generator/generator.pt``; ``tags`` go on
        the version.
        """
        configure(self.tracking_uri)
        self.log_artifact(run_id, generator_file, "generator")
        model = find_logged_model(self.client, run_id, registered_name)
        if model is None:
            history = self.client.get_metric_history(run_id, "final")
            step = max((m.step for m in history), default=0)
            model = self.log_generator_model(run_id, generator, registered_name, tags=tags, step=step)
        version = str(register_logged_model(model, registered_name).version)
        for key, value in tags.items():
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            self.client.set_model_version_tag(registered_name, version, key, text[:5000])
        log.info("registered %s version %s (logged model %s of run %s)", registered_name, version, model.model_id, run_id)
        return self.client.get_model_version(registered_name, version)

    def log_datasets(self, run_id: str, source: Any, uses: Sequence[DatasetUse]) -> None:
        """Link the splits ``uses`` of data set ``source`` (Parquet URI or ImageDataset) to ``run_id`` as inputs."""
        log_dataset_inputs(self.client, run_id, dataset_inputs(source, uses))

    def write_json(self, run_id: str, values: Mapping[str, Any], artifact_file: str) -> None:
        """A JSON artifact on ``run_id`` (e.g. the sweep's full config)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(json.dumps(values, indent=2, default=str))
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(run_id, str(path), artifact_path=None if parent == "." else parent)
