"""Victims from model files: ONNX (onnxruntime) and TorchScript (``torch.jit.save``).

What each file says about itself is read first: the input's C x H x W and the output's
width from the graph, and ``clusterattack.*`` metadata written by
:mod:`clusterattack.victims.sources.export` (number of clusters, input shape, output
kind). Options fill what the file leaves open; an option that contradicts the file is an
error naming both.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clusterattack.victims.sources.spec import OUTPUTS, VictimSpecError, parse_shape

__all__ = ["META_KEY", "OnnxBackend", "TorchScriptBackend", "output_from_name"]

log = logging.getLogger(__name__)

#: Prefix of the metadata keys (ONNX metadata_props) and name of the TorchScript extra file.
META_KEY = "clusterattack"
TORCHSCRIPT_EXTRA = "clusterattack.json"


def output_from_name(name: str) -> str | None:
    """Output kind suggested by an output's name (logits, probabilities, labels), else None."""
    lowered = name.lower()
    if "logit" in lowered:
        return "logits"
    if any(word in lowered for word in ("prob", "membership", "softmax")):
        return "memberships"
    if any(word in lowered for word in ("label", "cluster_id", "assignment")):
        return "labels"
    return None


def _declared(meta: dict[str, Any], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if meta.get("num_clusters") not in (None, ""):
        out["clusters"] = int(meta["num_clusters"])
    if meta.get("input_shape") not in (None, ""):
        value = meta["input_shape"]
        out["shape"] = parse_shape(",".join(map(str, value)) if isinstance(value, list | tuple) else str(value),
                                   f"input_shape in {path}")
    if meta.get("output") not in (None, ""):
        if meta["output"] not in OUTPUTS:
            raise VictimSpecError(f"{path} says its output is {meta['output']!r}, expected one of {OUTPUTS}")
        out["output"] = meta["output"]
    return out


class OnnxBackend:
    """An onnxruntime session over an ONNX file; the session is opened lazily and not pickled."""

    def __init__(self, path: str | Path, output_name: str | None = None, device: str = "cpu") -> None:
        self.path = str(path)
        self.output_name = output_name
        self.device = str(device)
        self._session: Any = None
        if not Path(self.path).is_file():
            raise VictimSpecError(f"no ONNX file {self.path!r}")
        self.session()  # open now: a broken file fails at resolve time, not at the first query

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "output_name": self.output_name, "device": self.device}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._session = None

    def session(self) -> Any:
        if self._session is None:
            try:
                import onnxruntime as ort
            except ImportError as exc:  # pragma: no cover - a dependency of the package
                raise VictimSpecError("onnx: victims need onnxruntime (pip install onnxruntime)") from exc
            providers = ["CPUExecutionProvider"]
            if self.device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            try:
                self._session = ort.InferenceSession(self.path, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise VictimSpecError(f"onnxruntime cannot open {self.path!r}: {exc}") from exc
            inputs = self._session.get_inputs()
            if len(inputs) != 1:
                raise VictimSpecError(
                    f"ONNX model {self.path!r} has {len(inputs)} inputs {[i.name for i in inputs]}; "
                    "a victim takes one, the images"
                )
            names = [o.name for o in self._session.get_outputs()]
            if self.output_name is None:
                self.output_name = names[0]
            elif self.output_name not in names:
                raise VictimSpecError(
                    f"ONNX model {self.path!r} has no output {self.output_name!r}; its outputs are {names}"
                )
        return self._session

    def inspect(self) -> dict[str, Any]:
        """What the file says: shape, clusters, output (each only when it says it)."""
        session = self.session()
        meta_map = session.get_modelmeta().custom_metadata_map
        prefix = META_KEY + "."
        declared = _declared({k[len(prefix):]: v for k, v in meta_map.items() if k.startswith(prefix)}, self.path)
        image = session.get_inputs()[0]
        if image.type not in ("tensor(float)", "tensor(double)"):
            raise VictimSpecError(
                f"ONNX model {self.path!r} takes {image.type} images; a victim takes float images in [0, 1]"
            )
        dims = list(image.shape)
        if len(dims) != 4:
            raise VictimSpecError(
                f"ONNX model {self.path!r} takes input {image.name!r} of rank {len(dims)} ({dims}); "
                "a victim takes N x C x H x W images"
            )
        if all(isinstance(d, int) for d in dims[1:]):
            shape = tuple(int(d) for d in dims[1:])
            if "shape" in declared and declared["shape"] != shape:
                raise VictimSpecError(
                    f"ONNX model {self.path!r}: metadata says input {declared['shape']}, graph says {shape}"
                )
            declared["shape"] = shape
        output = next(o for o in session.get_outputs() if o.name == self.output_name)
        if output.type.startswith("tensor(int"):
            declared.setdefault("output", "labels")
        elif "output" not in declared:
            hint = output_from_name(self.output_name)
            if hint is not None:
                declared["output_hint"] = hint
        out_dims = list(output.shape)
        if declared.get("output") != "labels" and len(out_dims) == 2 and isinstance(out_dims[1], int):
            declared.setdefault("clusters", int(out_dims[1]))
        return declared

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        session = self.session()
        image = session.get_inputs()[0]
        dtype = np.float64 if image.type == "tensor(double)" else np.float32
        feed = {image.name: np.ascontiguousarray(x.detach().to("cpu").numpy().astype(dtype, copy=False))}
        return session.run([self.output_name], feed)[0]


class TorchScriptBackend:
    """A TorchScript module (``torch.jit.load``); ``predict_proba`` when it exports one, else forward."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        self.path = str(path)
        self.device = str(device)
        self.method = "forward"
        self._module: Any = None
        self._extra: dict[str, Any] = {}
        if not Path(self.path).is_file():
            raise VictimSpecError(f"no TorchScript file {self.path!r}")
        self.module()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "device": self.device, "method": self.method}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._module, self._extra = None, {}

    def module(self) -> Any:
        if self._module is None:
            extra = {TORCHSCRIPT_EXTRA: ""}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's notice
                    self._module = torch.jit.load(self.path, map_location=self.device, _extra_files=extra)
            except Exception as exc:  # torch raises RuntimeError and friends for a bad archive
                raise VictimSpecError(f"torch.jit.load cannot read {self.path!r}: {exc}") from exc
            self._module.eval()
            raw = extra[TORCHSCRIPT_EXTRA]
            if raw:
                try:
                    self._extra = json.loads(raw)
                except ValueError as exc:
                    raise VictimSpecError(f"{self.path!r}: {TORCHSCRIPT_EXTRA} is not JSON: {exc}") from exc
        return self._module

    def inspect(self) -> dict[str, Any]:
        module = self.module()
        meta = dict(self._extra)
        for attr, key in (("num_clusters", "num_clusters"), ("input_shape", "input_shape")):
            if key not in meta and hasattr(module, attr):
                meta[key] = getattr(module, attr)
        declared = _declared(meta, self.path)
        if hasattr(module, "predict_proba"):
            self.method = "predict_proba"
            if declared.get("output", "memberships") != "memberships":
                raise VictimSpecError(
                    f"{self.path!r} exports predict_proba but says its output is {declared['output']!r}"
                )
            declared["output"] = "memberships"
        return declared

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module()
        out = getattr(module, self.method)(x.to(self.device))
        return out.to(x.device)
