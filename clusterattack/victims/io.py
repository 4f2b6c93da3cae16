"""Save and load victims: local checkpoint files, MLflow model URIs, registry names, any victim spec.

``load_victim(source)`` is what every later job calls (serving, attacks, defenses):

- a path to a file written by ``save_victim``;
- ``models:/<name>/<version|latest>`` or ``runs:/<run_id>/model`` (MLflow; a model that is
  not a ``ClusteringModel`` is used through its pyfunc);
- a registered name such as ``victim-cc-fashion_mnist``, or ``cc/fashion_mnist``, or the
  tuple ``("cc", "fashion_mnist")``: the newest registered version;
- any other victim specification (``py:``, ``onnx:``, ``torchscript:``, ``adapter:``,
  ``http(s)://``): see :mod:`clusterattack.victims.sources`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

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


def load_builtin_victim(target: str | Path, device: str | torch.device = "cpu") -> ClusteringModel:
    """A victim of this package: a ``save_victim`` file or a registered ``victim-<model>-<dataset>``."""
    from clusterattack import tracking

    dev = torch.device(device)
    path = Path(target)
    if path.is_file():
        return _load_file(path, dev)
    target = str(target)
    if not target.startswith("victim-"):
        raise ValueError(
            f"cannot resolve victim source {target!r}: no such file, and not 'models:/<name>/<version>', "
            "'runs:/<id>/model', 'victim-<model>-<dataset>', '<model>/<dataset>' or another victim "
            "specification (py:, onnx:, torchscript:, adapter:, http(s)://; see docs/own-model.md)"
        )
    uri = tracking.model_uri(target)
    model = tracking.load_model(uri, dev)
    if not isinstance(model, ClusteringModel):
        raise TypeError(f"{uri} holds a {type(model).__name__}, not a ClusteringModel victim")
    return model.to(dev).eval()


def load_victim(source: str | Path | tuple[str, str], device: str | torch.device = "cpu", **kwargs: Any) -> Any:
    """The victim ``source`` names, checked, on ``device``: any victim specification.

    A file from ``save_victim``, an MLflow URI, a registered name or ``(model, dataset)`` give
    a ``ClusteringModel`` in eval mode as before; ``py:``, ``onnx:``, ``torchscript:``,
    ``adapter:``, ``http(s)://`` and MLflow pyfunc models give what
    :func:`clusterattack.victims.sources.resolve_victim` (which takes ``kwargs``) returns.
    """
    from clusterattack.victims.sources import resolve_victim

    return resolve_victim(source, device=device, **kwargs)
