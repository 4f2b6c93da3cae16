"""MLflow tracking for the platform: store set-up, runs and metrics, the victim model registry.

This is the only package that imports mlflow. Default store: ``sqlite:///mlruns/mlflow.db``
in the working directory (artifacts in ``mlruns/artifacts``); ``MLFLOW_TRACKING_URI`` selects
another store or a server. ``UI_COMMAND`` is the command that opens the UI on the default store.
"""

from clusterattack.tracking.store import (
    DEFAULT_TRACKING_URI,
    UI_COMMAND,
    artifact_root,
    client,
    configure,
    default_tracking_uri,
    ensure_experiment,
    flatten,
    log_datasets,
    log_dict,
    log_metrics,
    log_params,
    mark_training_experiments,
    source_tags,
    start_run,
    ui_command,
)
from clusterattack.tracking.victims import (
    list_victims,
    load_model,
    log_victim,
    model_uri,
    registered_name,
)

__all__ = [
    "DEFAULT_TRACKING_URI",
    "UI_COMMAND",
    "artifact_root",
    "client",
    "configure",
    "default_tracking_uri",
    "ensure_experiment",
    "flatten",
    "list_victims",
    "load_model",
    "log_datasets",
    "log_dict",
    "log_metrics",
    "log_params",
    "log_victim",
    "mark_training_experiments",
    "model_uri",
    "registered_name",
    "source_tags",
    "start_run",
    "ui_command",
]
