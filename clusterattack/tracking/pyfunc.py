"""Any MLflow model as a victim's backend: its flavors, and its pyfunc with what its signature says.

Kept here because this package is the only one that imports mlflow
(``clusterattack.victims.sources`` turns the pyfunc into a victim).
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import mlflow.models
import mlflow.pyfunc

from clusterattack.tracking.store import configure

__all__ = ["load_pyfunc", "model_flavors"]

log = logging.getLogger(__name__)


def model_flavors(uri: str) -> set[str]:
    """The flavors of the MLflow model at ``uri`` (reads its MLmodel file only)."""
    configure()
    return set(mlflow.models.get_model_info(uri).flavors)


def _tensor_shape(schema: Any) -> tuple[int, ...] | None:
    if schema is None or not schema.is_tensor_spec() or len(schema.inputs) != 1:
        return None
    return tuple(int(d) for d in schema.inputs[0].shape)


def load_pyfunc(uri: str) -> tuple[Any, dict[str, Any]]:
    """(pyfunc model, what its MLmodel says): ``input`` and ``output`` tensor shapes (batch -1)
    when its signature has them, and ``metadata`` (the dict given to ``log_model(metadata=...)``)."""
    configure()
    model = mlflow.pyfunc.load_model(uri)
    meta = model.metadata
    return model, {
        "input": _tensor_shape(meta.get_input_schema()),
        "output": _tensor_shape(meta.get_output_schema()),
        "metadata": dict(meta.metadata or {}),
    }
