"""Torch modules as MLflow 3 logged models of a run, written through the client with an explicit run id.

An MLflow 3 *logged model* is a first-class entity (id ``m-...``) linked to the run that made
it: the run page lists it under *Logged models*, the experiment's *Models* tab lists it with
its params, tags and the run's metrics at the step it was logged at, and a registry version
points at it. :func:`log_torch_model` creates it in the run's own experiment (MLflow's
``log_model`` without an active run would file it under the default experiment), saves the
module with ``mlflow.pytorch`` and links it as the run's output.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import mlflow
import mlflow.pytorch
import torch
from mlflow.entities import LoggedModel, LoggedModelStatus
from mlflow.tracking import MlflowClient

__all__ = ["find_logged_model", "log_torch_model", "register_logged_model"]

log = logging.getLogger(__name__)

_VALUE_LIMIT = 5000  # tag values MLflow stores in full


def _text(value: Any) -> str:
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    return text[:_VALUE_LIMIT]


def _signature(module: torch.nn.Module) -> Any:
    """Input/output signature from two random images of ``module.input_shape`` (None without one)."""
    shape = tuple(getattr(module, "input_shape", ()) or ())
    if not shape:
        return None
    from mlflow.models import infer_signature

    device = next(module.parameters()).device
    example = torch.rand(2, *shape)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = module(example.to(device)).cpu()
    module.train(was_training)
    return infer_signature(example.numpy(), out.numpy())


def log_torch_model(
    client: MlflowClient,
    run_id: str,
    module: torch.nn.Module,
    name: str,
    *,
    model_type: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    step: int = 0,
    registered_name: str | None = None,
) -> tuple[LoggedModel, Any]:
    """Log ``module`` as logged model ``name`` of run ``run_id``; returns (logged model, ModelInfo).

    ``params`` and ``tags`` go on the logged model (the experiment's Models tab shows them as
    columns); the run's metrics logged at ``step`` are copied onto it by MLflow. With
    ``registered_name`` the model is registered too (``ModelInfo.registered_model_version``).
    The module is pickled whole (loaders need more than ``forward``); requirements are the
    running torch only (inferring them probes the environment for seconds).
    """
    run = client.get_run(run_id)
    model = client.create_logged_model(
        run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        params={k: _text(v) for k, v in (params or {}).items()},
        tags={k: _text(v) for k, v in (tags or {}).items()},
        model_type=model_type,
    )
    info = mlflow.pytorch.log_model(
        module,
        name=name,
        model_id=model.model_id,
        run_id=run_id,
        step=int(step),
        signature=_signature(module),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        registered_model_name=registered_name,
        serialization_format="pickle",
    )
    log.info("run %s: logged model %s (%s)", run_id, model.model_id, name)
    return client.get_logged_model(model.model_id), info


def find_logged_model(client: MlflowClient, run_id: str, name: str) -> LoggedModel | None:
    """The newest READY logged model ``name`` that run ``run_id`` made, or None."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
    )
    # Filtered here: MLflow 3.17's SQL store finds nothing for ``status = 'READY'``.
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return ready[0] if ready else None


def register_logged_model(model: LoggedModel, registered_name: str) -> Any:
    """A new version of ``registered_name`` that points at ``model`` (``models:/<model id>``)."""
    return mlflow.register_model(f"models:/{model.model_id}", registered_name)
