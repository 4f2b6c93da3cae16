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

from clusterattack.tracking.models import log_torch_model
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
    c = client()
    run_id = mlflow.active_run().info.run_id
    scores = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    # An MLflow 3 logged model of the run (its Models tab, the experiment's Models tab), named
    # "model" so that ``runs:/<run id>/model`` still finds it; the registry name is a tag.
    _, info = log_torch_model(
        c,
        run_id,
        model,
        MODEL_ARTIFACT,
        model_type="victim",
        params=c.get_run(run_id).data.params,
        tags={"victim": name, "model": getattr(model, "name", type(model).__name__.lower()), "dataset": dataset, **scores},
        registered_name=name if register else None,
    )
    if not register:
        return None
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
