"""Save and load victims: local checkpoint files, MLflow model URIs, or registry names by (model, dataset).

``load_victim(source)`` is what every later job calls (serving, attacks, defenses):

- a path to a file written by ``save_victim``;
- ``models:/<name>/<version|latest>`` or ``runs:/<run_id>/model`` (MLflow);
- a registered name such as ``victim-cc-fashion_mnist``, or ``cc/fashion_mnist``, or the
  tuple ``("cc", "fashion_mnist")``: the newest registered version.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from clusterattack.victims.base import ClusteringModel
from clusterattack.victims.registry import config_from_dict, get_spec
from clusterattack.victims.training import atomic_save

FORMAT = "clusterattack.victim/1"


def save_victim(model: ClusteringModel, path: str | Path) -> Path:
    """Write ``model`` (registry name, config, weights) to ``path``; readable without pickled classes."""
    if not isinstance(model, ClusteringModel) or not model.name:
        raise TypeError(
            f"save_victim needs a registered ClusteringModel, got {type(model).__name__}"
        )
    path = Path(path)
    atomic_save(
        {
            "format": FORMAT,
            "model": model.name,
            "config": dataclasses.asdict(model.config),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        path,
    )
    return path


def _load_file(path: Path, device: torch.device) -> ClusteringModel:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(
            f"{path} is not a victim file written by save_victim (format {FORMAT!r}), found {found!r}"
        )
    spec = get_spec(blob["model"])
    model = spec.build(config_from_dict(spec.config_cls, blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()


def _registry_uri(source: str | tuple[str, str]) -> str | None:
    from clusterattack import tracking

    if isinstance(source, tuple):
        if len(source) != 2:
            raise ValueError(f"a registry source is (model, dataset), got {source!r}")
        return tracking.model_uri(tracking.registered_name(*source))
    if source.startswith(("models:/", "runs:/")):
        return source
    if source.startswith("victim-"):
        return tracking.model_uri(source)
    if source.count("/") == 1 and not Path(source).exists():
        return tracking.model_uri(tracking.registered_name(*source.split("/")))
    return None


def load_victim(
    source: str | Path | tuple[str, str], device: str | torch.device = "cpu"
) -> ClusteringModel:
    """A trained victim in eval mode on ``device`` from a file, an MLflow URI, or a registry name."""
    dev = torch.device(device)
    if isinstance(source, Path) or (isinstance(source, str) and Path(source).is_file()):
        return _load_file(Path(source), dev)
    if not isinstance(source, str | tuple):
        raise TypeError(
            f"victim source must be a path, an MLflow URI or a registry name, got {type(source).__name__}"
        )
    uri = _registry_uri(source)
    if uri is None:
        raise ValueError(
            f"cannot resolve victim source {source!r}: expected an existing file, 'models:/<name>/<version>', "
            "'runs:/<id>/model', 'victim-<model>-<dataset>' or '<model>/<dataset>'"
        )
    from clusterattack import tracking

    model = tracking.load_model(uri, dev)
    if not isinstance(model, ClusteringModel):
        raise TypeError(f"{uri} holds a {type(model).__name__}, not a ClusteringModel victim")
    return model.to(dev).eval()
