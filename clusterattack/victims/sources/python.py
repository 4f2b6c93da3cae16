"""Victims from Python: ``py:package.module:factory`` or ``path/to/file.py:factory``.

The attribute is called (with the spec's extra options as keyword arguments) unless it
already is a model (it has ``predict_proba`` or ``predict``). The object may be a torch
module keeping the Victim contract (kept as it is: white-box attacks and defenses that
need ``features`` work on it), or anything with ``predict_proba`` (memberships, or logits
with ``output=logits``) or only ``predict`` (cluster ids: decision-only), taking images as
torch tensors, numpy arrays N x C x H x W (the default for non-torch objects), or flat
numpy rows N x (C*H*W) (``input=flat``: a bare scikit-learn estimator).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clusterattack.victims.sources.spec import ParsedVictimSpec, VictimSpecError

__all__ = ["PythonBackend", "import_attribute", "load_python_object"]

log = logging.getLogger(__name__)

_RESERVED = {"clusters", "shape", "output", "input", "name"}


def _convert(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _module_from_file(path: Path, text: str):
    if not path.is_file():
        raise VictimSpecError(f"victim spec {text!r}: no Python file {str(path)!r}")
    resolved = path.resolve()
    # A stable name per file: a second resolve reuses the module instead of re-running it.
    name = f"_clusterattack_victim_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, resolved)
    if loader_spec is None or loader_spec.loader is None:
        raise VictimSpecError(f"victim spec {text!r}: cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise VictimSpecError(f"victim spec {text!r}: running {str(path)!r} raised {type(exc).__name__}: {exc}") from exc
    try:
        # Objects of classes defined in the file travel to Ray workers by value.
        import cloudpickle

        cloudpickle.register_pickle_by_value(module)
    except (ImportError, ValueError) as exc:  # pragma: no cover - cloudpickle comes with Ray
        log.debug("cannot register %s for pickling by value: %s", name, exc)
    return module


def _import_module(module_name: str, text: str):
    # As ``python -m`` would: modules next to the working directory are importable.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise VictimSpecError(
                f"victim spec {text!r}: no module named {missing!r} (looked in the working directory "
                f"{cwd} and sys.path)"
            ) from exc
        raise VictimSpecError(
            f"victim spec {text!r}: importing {module_name!r} failed, it needs the module {missing!r}: {exc}"
        ) from exc
    except Exception as exc:
        raise VictimSpecError(
            f"victim spec {text!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc


def import_attribute(spec: ParsedVictimSpec) -> Any:
    """The attribute a ``python`` spec names (module imported or file run), or VictimSpecError."""
    where, _, attr = spec.target.rpartition(":")
    module = _module_from_file(Path(where), spec.text) if where.endswith(".py") else _import_module(where, spec.text)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            raise VictimSpecError(
                f"victim spec {spec.text!r}: {where!r} has no attribute {attr!r} "
                f"(it has: {', '.join(public[:20]) or 'nothing public'})"
            )
        obj = getattr(obj, part)
    return obj


def _is_model(obj: Any) -> bool:
    return not inspect.isclass(obj) and (
        callable(getattr(obj, "predict_proba", None)) or callable(getattr(obj, "predict", None))
    )


def load_python_object(spec: ParsedVictimSpec) -> Any:
    """The model a ``python`` spec names: the factory's result (kwargs from the extra options)."""
    attr = import_attribute(spec)
    kwargs = {k: _convert(v) for k, v in spec.options.items() if k not in _RESERVED}
    if _is_model(attr):
        if kwargs:
            raise VictimSpecError(
                f"victim spec {spec.text!r} names a model, not a factory: options {sorted(kwargs)} "
                "have nothing to be passed to"
            )
        obj = attr
    elif callable(attr):
        try:
            obj = attr(**kwargs)
        except TypeError as exc:
            raise VictimSpecError(
                f"victim spec {spec.text!r}: calling {spec.target.rpartition(':')[2]}"
                f"({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: {exc}"
            ) from exc
    else:
        raise VictimSpecError(
            f"victim spec {spec.text!r}: {spec.target!r} is a {type(attr).__name__}, expected a factory "
            "(callable) or a model with predict_proba or predict"
        )
    if not _is_model(obj):
        raise VictimSpecError(
            f"victim spec {spec.text!r}: the factory returned a {type(obj).__name__} without "
            "predict_proba (memberships) or predict (cluster ids); a victim needs one of them"
        )
    return obj


class PythonBackend:
    """Calls ``method`` of a Python model with images as torch, numpy N x C x H x W, or flat numpy."""

    def __init__(self, obj: Any, method: str, input_format: str, device: str = "cpu") -> None:
        self.obj = obj
        self.method = method
        self.input_format = input_format
        self.device = torch.device(device)

    def __call__(self, x: torch.Tensor) -> Any:
        fn = getattr(self.obj, self.method)
        if self.input_format == "torch":
            out = fn(x.to(self.device))
            return out.to(x.device) if isinstance(out, torch.Tensor) else out
        images = x.detach().to("cpu", torch.float32).numpy()
        if self.input_format == "flat":
            images = images.reshape(len(images), -1)
        return fn(np.ascontiguousarray(images))


def default_input_format(obj: Any) -> str:
    """torch for torch modules, numpy N x C x H x W for anything else."""
    return "torch" if isinstance(obj, nn.Module) else "numpy"
