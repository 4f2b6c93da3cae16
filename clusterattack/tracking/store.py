"""Where MLflow writes (local sqlite store by default, a server when configured) and run helpers.

Default store, when ``MLFLOW_TRACKING_URI`` is unset: ``sqlite:///mlruns/mlflow.db`` in the
working directory, artifacts under ``mlruns/artifacts`` (``CLUSTERATTACK_ARTIFACT_ROOT``
overrides the artifact folder). ``UI_COMMAND`` opens the MLflow UI on that store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

STORE_DIR = "mlruns"
DEFAULT_TRACKING_URI = f"sqlite:///{STORE_DIR}/mlflow.db"
UI_COMMAND = f"mlflow ui --backend-store-uri {DEFAULT_TRACKING_URI}"
ARTIFACT_ROOT_ENV = "CLUSTERATTACK_ARTIFACT_ROOT"
_PARAM_LIMIT = 6000  # MLflow rejects longer parameter values
#: Experiment tag by which the MLflow 3 UI picks an experiment's view ("GenAI apps & agents" or
#: "Machine learning"), and the value of the model-training one. The UI's own experiment-type
#: selector writes it (mlflow/server/js: setExperimentTag key "mlflow.experimentKind"); MLflow's
#: demo sets "genai_development" the same way (mlflow/demo/generators/traces.py).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


def default_tracking_uri(base_dir: str | Path | None = None) -> str:
    """The local sqlite store under ``base_dir`` (default: the working directory), as an absolute URI.

    Absolute so that Ray workers, which run in other directories, write to the same file.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    return f"sqlite:///{(base / STORE_DIR / 'mlflow.db').resolve()}"


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def artifact_root(uri: str | None = None) -> str | None:
    """Folder URI new experiments store artifacts in; None for a server (the server decides)."""
    uri = uri or mlflow.get_tracking_uri()
    env = os.environ.get(ARTIFACT_ROOT_ENV)
    if env:
        return Path(env).resolve().as_uri() if "://" not in env else env
    if not is_local_store(uri):
        return None
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "artifacts").as_uri()
    return (Path.cwd() / STORE_DIR / "artifacts").resolve().as_uri()


def configure(tracking_uri: str | None = None, registry_uri: str | None = None) -> str:
    """Point MLflow (tracking and registry) at ``tracking_uri``, the environment's, or the default store.

    The registry is ``registry_uri``, else ``MLFLOW_REGISTRY_URI``, else the tracking store.
    Work shipped to Ray workers passes both URIs it was given by its driver: a worker of a
    long-lived cluster keeps the environment it started with, which may name another registry.
    The chosen URI is exported as ``MLFLOW_TRACKING_URI`` when that was unset, so child
    processes (Ray workers, ``mlflow ui`` started from here) see the same store.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    os.environ.setdefault("MLFLOW_TRACKING_URI", uri)
    return uri


def ui_command(tracking_uri: str | None = None, port: int | None = None) -> str:
    """The shell command that opens the MLflow UI on a store (default: the local one)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    cmd = f"mlflow ui --backend-store-uri {uri}"
    return f"{cmd} --port {port}" if port else cmd


def client() -> MlflowClient:
    """A client on the configured store (see ``configure``)."""
    configure()
    return MlflowClient()


def ensure_experiment(name: str) -> str:
    """Id of experiment ``name``, created (with the local artifact root) when missing.

    Two processes that start side by side may both find it missing; the one whose create
    loses the race reads the winner's experiment instead of failing. The experiment is
    marked a model-training one (:func:`mark_training_experiment`), new or not, so the MLflow
    UI opens it on its runs, not on the GenAI overview.
    """
    configure()
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        root = artifact_root()
        location = f"{root.rstrip('/')}/{name}" if root else None
        try:
            experiment_id = mlflow.create_experiment(name, artifact_location=location)
        except MlflowException:
            exp = mlflow.get_experiment_by_name(name)
            if exp is None:
                raise
        else:
            mark_training_experiment(experiment_id)
            return experiment_id
    if exp.tags.get(EXPERIMENT_KIND_TAG) != TRAINING_KIND:
        mark_training_experiment(exp.experiment_id)
    return exp.experiment_id


def mark_training_experiment(experiment_id: str) -> None:
    """Tag experiment ``experiment_id`` as model training (``mlflow.experimentKind``), whatever it said before.

    Every experiment of this project holds training runs (victims, attacks, sweeps,
    analyses); the UI infers "GenAI" for an untagged one and opens it on traces.
    """
    MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    log.debug("experiment %s marked %s=%s", experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)


def mark_training_experiments() -> list[str]:
    """Mark every active experiment of the configured store but MLflow's ``Default`` as model
    training; returns their names (for a store written before experiments were marked)."""
    configure()
    marked = []
    for exp in MlflowClient().search_experiments():
        if exp.name != "Default" and exp.tags.get(EXPERIMENT_KIND_TAG) != TRAINING_KIND:
            mark_training_experiment(exp.experiment_id)
            marked.append(exp.name)
    return marked


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> one level with dotted keys (``backbone.width``)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def log_params(params: Mapping[str, Any]) -> None:
    """Log (nested) parameters on the active run; values are stringified, long ones truncated."""
    flat = {
        k: json.dumps(v) if isinstance(v, list | tuple) else str(v)
        for k, v in flatten(params).items()
    }
    mlflow.log_params({k: v[:_PARAM_LIMIT] for k, v in flat.items()})


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the finite numeric entries of ``metrics`` on the active run (others are skipped)."""
    clean = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(v):
            clean[k] = float(v)
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_dict(values: Mapping[str, Any], artifact_file: str) -> None:
    mlflow.log_dict(dict(values), artifact_file)


def log_datasets(source: Any, uses: Any, run_id: str | None = None) -> None:
    """Link splits of a data set to a run as its inputs (the active run when ``run_id`` is None).

    ``source`` is a Parquet URI or an in-memory ``ImageDataset``; ``uses`` are
    :class:`clusterattack.tracking.datasets.DatasetUse` (split, context, images used).
    """
    from clusterattack.tracking.datasets import dataset_inputs, log_dataset_inputs

    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("log_datasets needs run_id or an active MLflow run (tracking.start_run)")
        run_id = active.info.run_id
    log_dataset_inputs(MlflowClient(), run_id, dataset_inputs(source, list(uses)))


SOURCE_COMMIT_TAG = "clusterattack.git_commit"
SOURCE_DIRTY_TAG = "clusterattack.git_dirty"
SOURCE_DIFF_TAG = "clusterattack.git_diff"
# Text that cannot change what a run computes: a README edit does not make a run dirty.
_NOT_CODE = (":(exclude)*.md", ":(exclude)docs")


def read_source_tags(directory: str | Path) -> dict[str, str]:
    """The commit of the git checkout at ``directory`` and whether its tracked files, past
    documentation (``*.md``, ``docs/``), differ from it.

    With changes, ``clusterattack.git_diff`` is the first 12 hex digits of the SHA-256 of
    that ``git diff HEAD``, so runs made from the same uncommitted tree can be told apart from
    others. Empty when ``directory`` is not in a git checkout (an installed wheel, a Ray job's
    uploaded working directory without ``.git``) or git is missing.
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, check=True, timeout=20
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        diff = git("diff", "HEAD", "--no-ext-diff", "--binary", "--", ".", *_NOT_CODE)
    except (OSError, subprocess.SubprocessError):
        return {}
    tags = {SOURCE_COMMIT_TAG: commit, SOURCE_DIRTY_TAG: "true" if diff else "false"}
    if diff:
        tags[SOURCE_DIFF_TAG] = hashlib.sha256(diff.encode()).hexdigest()[:12]
    return tags


# Read when this module is imported: the code a process runs is the code it imported, whatever
# the checkout holds by the time a run starts. MLflow's own ``mlflow.source.git.commit`` says
# nothing of uncommitted changes, and the client API used for sweeps and reports sets none.
_SOURCE_TAGS = read_source_tags(Path(__file__).resolve().parents[2])


def source_tags() -> dict[str, str]:
    """Which code made a run (:func:`read_source_tags` of this package's checkout, read at import)."""
    return dict(_SOURCE_TAGS)


@contextlib.contextmanager
def start_run(
    experiment: str,
    run_name: str | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run in ``experiment`` (created if needed) with params and tags logged up front
    (and the :func:`source_tags` of the code that made it)."""
    experiment_id = ensure_experiment(experiment)
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, tags={**source_tags(), **(tags or {})}
    ) as run:
        if params:
            log_params(params)
        yield run
