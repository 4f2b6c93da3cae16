"""Write a torch clustering model as an ONNX or TorchScript file that says what it is.

Both files carry the number of clusters, the input shape and the output kind (``logits``:
the model's ``forward``) in their metadata, so ``onnx:PATH`` and ``torchscript:PATH``
need no options. The ONNX export uses torch's TorchScript-based exporter
(``dynamo=False``: no onnxscript needed) with a dynamic batch dimension, and ``onnx`` to
add the metadata.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from clusterattack.victims.sources.files import META_KEY, TORCHSCRIPT_EXTRA

__all__ = ["export_onnx", "export_torchscript"]

log = logging.getLogger(__name__)


def _shape_and_clusters(model: nn.Module) -> tuple[tuple[int, int, int], int]:
    for attr in ("input_shape", "num_clusters"):
        if not hasattr(model, attr):
            raise TypeError(f"{type(model).__name__} lacks {attr!r}: export needs a model of the Victim contract")
    return tuple(int(v) for v in model.input_shape), int(model.num_clusters)  # type: ignore[return-value]


def _metadata(shape: tuple[int, int, int], k: int) -> dict[str, str]:
    return {"num_clusters": str(k), "input_shape": ",".join(map(str, shape)), "output": "logits"}


def export_onnx(model: nn.Module, path: str | Path, opset: int = 17) -> Path:
    """``model.forward`` (logits) as an ONNX file with a dynamic batch and clusterattack metadata."""
    import onnx

    shape, k = _shape_and_clusters(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    device = next(model.parameters(), torch.empty(0)).device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's notice
        torch.onnx.export(
            model,
            (example.to(device),),
            str(path),
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
        )
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {f"{META_KEY}.{k_}": v for k_, v in _metadata(shape, k).items()})
    onnx.save(proto, str(path))
    log.info("wrote %s (ONNX opset %d, %d clusters, input %s)", path, opset, k, shape)
    return path


def export_torchscript(model: nn.Module, path: str | Path) -> Path:
    """``model.forward`` (logits) traced to TorchScript, with clusterattack metadata as an extra file."""
    shape, k = _shape_and_clusters(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    example = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_EXTRA: json.dumps(_metadata(shape, k))})
    log.info("wrote %s (TorchScript, %d clusters, input %s)", path, k, shape)
    return path
