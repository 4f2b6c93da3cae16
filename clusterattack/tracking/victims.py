"""Victims in the MLflow model registry: log a trained model, register it by (model, dataset), load it back."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import torch
from mlflow.entities.model_registry import ModelVersion

from clusterattack.tracking.store import client, configure

log = logging.getLogger(__name__)

_NAME_PART = re.compile(r"^[A-Za-z0-9_.]+$")
MODEL_ARTIFACT = "model"


def registered_name(model: str, dataset: str) -> str:
    """Registry name of the victim trained as ``model`` on ``dataset``: ``victim-<model>-<dataset>``."""
    for what, value in (("model", model), ("dataset", dataset)):
        if not _NAME_PART.match(value or ""):
            raise ValueError(f"{what} name must use letters, digits, '_' or '.', got {value!r}")
    return f"victim-{model}-{dataset}"


def model_uri(name: str, version: str | int = "latest") -> str:
    """``models:/<name>/<version>`` for a registered victim (``latest`` is the newest version)."""
    return f"models:/{name}/{version}"


def _config_dict(config: Any) -> dict:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return dict(config)


def log_victim(
    model: torch.nn.Module,
    config: Any,
    metrics: Mapping[str, float],
    dataset: str,
    register: bool = True,
    checkpoint: str | Path | None = None,
) -> ModelVersion | None:
    """Log ``model`` (mlflow.pytorch) on the active run and register it as ``registered_name(...)``.

    The config is stored as ``victim_config.json``; ``checkpoint`` (a ``save_victim`` file)
    is stored beside it as a pickle-free copy. The model version gets the scores as
    tags so the registry page shows them. Returns the new version, or None when
    ``register`` is False.
    """
    if mlflow.active_run() is None:
        raise RuntimeError(
            "log_victim needs an active MLflow run: call it inside tracking.start_run(...)"
        )
    name = registered_name(getattr(model, "name", type(model).__name__.lower()), dataset)
    cfg = _config_dict(config)
    mlflow.log_dict(cfg, "victim_config.json")
    if checkpoint is not None:
        mlflow.log_artifact(str(checkpoint), artifact_path="checkpoint")
    signature = None
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        from mlflow.models import infer_signature

        device = next(model.parameters()).device
        example = torch.rand(2, *shape)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(example.to(device)).cpu()
        model.train(was_training)
        signature = infer_signature(example.numpy(), out.numpy())
    info = mlflow.pytorch.log_model(
        model,
        name=MODEL_ARTIFACT,
        signature=signature,
        # Explicit requirements: inferring them imports and probes the environment (slow).
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        registered_model_name=name if register else None,
        # The whole module, not a traced graph: loaders need predict_proba, features and config.
        serialization_format="pickle",
    )
    if not register:
        return None
    c = client()
    version = str(info.registered_model_version)
    for key, value in metrics.items():
        c.set_model_version_tag(
            name, version, key, f"{value:.4f}" if isinstance(value, float) else str(value)
        )
    c.set_model_version_tag(name, version, "dataset", dataset)
    c.set_model_version_tag(name, version, "config", json.dumps(cfg)[:5000])
    log.info("registered %s version %s (%s)", name, version, info.model_uri)
    return c.get_model_version(name, version)


def load_model(uri: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A logged torch model from any MLflow URI (``models:/name/version``, ``runs:/id/model``), on ``device``."""
    configure()
    return mlflow.pytorch.load_model(uri, map_location=torch.device(device))


def list_victims() -> list[dict[str, Any]]:
    """Every registered victim's newest version with its tags (name, version, run_id, scores)."""
    c = client()
    out = []
    for rm in c.search_registered_models("name LIKE 'victim-%'"):
        versions = c.search_model_versions(f"name = '{rm.name}'")
        if not versions:
            continue
        newest = max(versions, key=lambda v: int(v.version))
        out.append(
            {"name": rm.name, "version": newest.version, "run_id": newest.run_id, **newest.tags}
        )
    return sorted(out, key=lambda d: d["name"])
