"""Any MLflow model whose pyfunc ``predict`` answers memberships, logits or cluster ids.

What the model's MLmodel says is read first: a tensor input signature ``(-1, C, H, W)``
gives the input shape (images are sent as numpy N x C x H x W), ``(-1, D)`` says the model
takes flat rows (a scikit-learn flavor); an output signature ``(-1, K)`` gives the number
of clusters; ``metadata`` given to ``log_model`` may say ``clusterattack.num_clusters``,
``clusterattack.input_shape`` and ``clusterattack.output``. Options fill the rest.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from clusterattack.victims.sources.files import META_KEY, _declared
from clusterattack.victims.sources.spec import VictimSpecError

__all__ = ["PyfuncBackend", "load_pyfunc_backend"]


class PyfuncBackend:
    """``model.predict`` of images as numpy N x C x H x W or flat rows; pickles by URI."""

    def __init__(self, uri: str, model: Any, input_format: str) -> None:
        self.uri = uri
        self.model = model
        self.input_format = input_format

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "input_format": self.input_format}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from clusterattack.tracking.pyfunc import load_pyfunc

        self.__dict__.update(state)
        self.model, _ = load_pyfunc(self.uri)

    def __call__(self, x: torch.Tensor) -> Any:
        images = x.detach().to("cpu", torch.float32).numpy()
        if self.input_format == "flat":
            images = images.reshape(len(images), -1)
        return self.model.predict(np.ascontiguousarray(images))


def load_pyfunc_backend(uri: str, input_option: str | None) -> tuple[PyfuncBackend, dict[str, Any]]:
    """The backend of the MLflow model at ``uri`` and what its MLmodel declares."""
    from clusterattack.tracking.pyfunc import load_pyfunc

    try:
        model, info = load_pyfunc(uri)
    except Exception as exc:  # mlflow raises MlflowException, OSError, ImportError of a flavor...
        raise VictimSpecError(f"cannot load the MLflow model {uri!r} as a pyfunc: {exc}") from exc
    prefix = META_KEY + "."
    meta = {k[len(prefix):]: v for k, v in info["metadata"].items() if str(k).startswith(prefix)}
    declared = _declared(meta, uri)
    fmt = input_option
    shape_in = info["input"]
    if shape_in is not None:
        dims = shape_in[1:]
        if len(dims) == 3 and all(d > 0 for d in dims):
            declared.setdefault("shape", tuple(dims))
            fmt = fmt or "numpy"
        elif len(dims) == 1 and dims[0] > 0:
            fmt = fmt or "flat"
            declared["flat_size"] = int(dims[0])
    shape_out = info["output"]
    if shape_out is not None and len(shape_out) == 2 and shape_out[1] > 0:
        declared.setdefault("clusters", int(shape_out[1]))
    elif shape_out is not None and len(shape_out) == 1:
        declared.setdefault("output", "labels")
    if "shape" in declared and "flat_size" in declared and math.prod(declared["shape"]) != declared["flat_size"]:
        raise VictimSpecError(
            f"MLflow model {uri!r} takes rows of {declared['flat_size']} values but says input shape {declared['shape']}"
        )
    return PyfuncBackend(uri, model, fmt or "numpy"), declared
