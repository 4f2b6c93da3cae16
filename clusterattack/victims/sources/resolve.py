"""``resolve_victim``: one specification in, a checked victim out, before any attack query.

Every kind ends in the Victim contract (or the decision-only one) with the same checks:
the model is found (module, attribute, file, URI, service), it answers what it says (the
first answer of a local model is asked here, on four seeded random images that are not
attack queries; a remote service's first answer is checked when the attack asks it),
and its input shape agrees with the data set's.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clusterattack.victims.sources.answers import as_tensor, check_memberships
from clusterattack.victims.sources.decision import OneHotMemberships, is_decision_only
from clusterattack.victims.sources.spec import (
    ParsedVictimSpec,
    VictimSpecError,
    parse_shape,
    parse_victim_spec,
)
from clusterattack.victims.sources.wrappers import build_victim_from_backend

__all__ = ["PROBE_IMAGES", "VictimFactory", "describe_victim", "resolve_victim"]

log = logging.getLogger(__name__)

#: Images a local model is asked at resolve time to check what it answers.
PROBE_IMAGES = 4

DatasetLike = Any  # a data set name, an ImageDataset, or a (C, H, W) shape


def _dataset_shape(dataset: DatasetLike) -> tuple[tuple[int, int, int] | None, str]:
    if dataset is None:
        return None, ""
    if isinstance(dataset, tuple | list):
        return parse_shape(",".join(map(str, dataset)), "dataset shape"), "x".join(map(str, dataset))
    if isinstance(dataset, str):
        from clusterattack.data import load_dataset

        dataset = load_dataset(dataset)
    shape = getattr(dataset, "shape", None)
    if shape is None:
        raise TypeError(f"dataset must be a name, an ImageDataset or a (C, H, W) shape, got {type(dataset).__name__}")
    return tuple(int(v) for v in shape), str(getattr(dataset, "name", ""))  # type: ignore[return-value]


def _check_shape(spec: ParsedVictimSpec, shape: tuple[int, ...], data_shape: tuple[int, int, int] | None, data_name: str) -> None:
    if data_shape is not None and tuple(shape) != tuple(data_shape):
        raise VictimSpecError(
            f"victim {spec.text!r} takes images {'x'.join(map(str, shape))} (C x H x W) but the data set "
            f"{data_name or ''} has images {'x'.join(map(str, data_shape))}: they must agree"
        )


def _reconcile(spec: ParsedVictimSpec, key: str, said: Any, option: Any) -> Any:
    if said is not None and option is not None and said != option:
        raise VictimSpecError(
            f"victim {spec.text!r}: option {key}={spec.options[key]} contradicts the model, which says {said!r}"
        )
    return option if option is not None else said


def _probe_images(shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.rand(PROBE_IMAGES, *shape, generator=torch.Generator().manual_seed(0))


def _from_backend(
    spec: ParsedVictimSpec,
    backend: Any,
    declared: dict[str, Any],
    *,
    kind: str,
    data_shape: tuple[int, int, int] | None,
    data_name: str,
    default_output: str | None,
    differentiable: bool,
    probe: bool,
) -> Any:
    opts = spec.options
    clusters = _reconcile(spec, "clusters", declared.get("clusters"), int(opts["clusters"]) if "clusters" in opts else None)
    shape = _reconcile(spec, "shape", declared.get("shape"), parse_shape(opts["shape"]) if "shape" in opts else None)
    output = _reconcile(spec, "output", declared.get("output"), opts.get("output"))
    output = output or declared.get("output_hint") or default_output
    if output is None:
        raise VictimSpecError(
            f"victim {spec.text!r} does not say whether it answers logits or memberships: add "
            "?output=logits or ?output=memberships (or ?output=labels for cluster ids)"
        )
    if shape is None:
        if data_shape is None:
            raise VictimSpecError(
                f"victim {spec.text!r} does not say its input shape: add ?shape=C,H,W or name the data set"
            )
        shape = data_shape
    _check_shape(spec, shape, data_shape, data_name)
    flat = declared.get("flat_size")
    if flat is not None and flat != math.prod(shape):
        raise VictimSpecError(
            f"victim {spec.text!r} takes rows of {flat} values, but images {'x'.join(map(str, shape))} "
            f"have {math.prod(shape)}"
        )
    if clusters is None:
        if output == "labels":
            raise VictimSpecError(
                f"victim {spec.text!r} answers cluster ids and does not say how many clusters it has: add ?clusters=K"
            )
        if not probe:
            raise VictimSpecError(f"victim {spec.text!r} does not say its number of clusters: add ?clusters=K")
        with torch.no_grad():
            first = as_tensor(backend(_probe_images(shape)), f"victim {spec.text!r}")
        if first.ndim != 2 or first.shape[0] != PROBE_IMAGES:
            raise VictimSpecError(
                f"victim {spec.text!r} answered shape {tuple(first.shape)} for {PROBE_IMAGES} images, "
                f"expected {PROBE_IMAGES} x K {output}"
            )
        clusters = int(first.shape[1])
    victim = build_victim_from_backend(
        backend,
        output=output,
        name=spec.display_name,
        spec=spec.text,
        kind=kind,
        num_clusters=clusters,
        input_shape=shape,
        differentiable=differentiable,
    )
    if probe:
        with torch.no_grad():
            (victim.predict if output == "labels" else victim.predict_proba)(_probe_images(shape))
    return victim


def _contract_module(obj: Any) -> bool:
    return isinstance(obj, nn.Module) and all(
        hasattr(obj, a) for a in ("num_clusters", "input_shape", "predict_proba")
    )


def _checked_module(spec: ParsedVictimSpec, model: nn.Module, data_shape, data_name, device, probe: bool) -> nn.Module:
    """A torch module of the Victim contract, kept as it is (autograd, ``features``), checked."""
    shape = tuple(int(v) for v in model.input_shape)
    for key, said in (("clusters", int(model.num_clusters)), ("shape", shape)):
        if key in spec.options:
            option = int(spec.options[key]) if key == "clusters" else parse_shape(spec.options[key])
            _reconcile(spec, key, said, option)
    _check_shape(spec, shape, data_shape, data_name)
    model = model.to(device).eval()
    if probe:
        with torch.no_grad():
            probs = model.predict_proba(_probe_images(shape).to(device))
        check_memberships(as_tensor(probs, f"victim {spec.text!r}"), PROBE_IMAGES, int(model.num_clusters),
                          f"victim {spec.text!r}")
    return model


def _python(spec: ParsedVictimSpec, data_shape, data_name, device, probe):
    from clusterattack.victims.sources.python import (
        PythonBackend,
        default_input_format,
        load_python_object,
    )

    obj = load_python_object(spec)
    if _contract_module(obj) and not ({"input", "output"} & set(spec.options)):
        return _checked_module(spec, obj, data_shape, data_name, device, probe)
    has_proba = callable(getattr(obj, "predict_proba", None))
    output = spec.options.get("output") or ("memberships" if has_proba else "labels")
    if output != "labels" and not has_proba:
        raise VictimSpecError(
            f"victim {spec.text!r}: the {type(obj).__name__} has no predict_proba, so it cannot answer "
            f"{output}; it has predict (say ?output=labels, or drop the option)"
        )
    method = "predict" if output == "labels" else "predict_proba"
    if method == "predict" and not callable(getattr(obj, "predict", None)):
        raise VictimSpecError(f"victim {spec.text!r}: output=labels needs predict(), which the {type(obj).__name__} lacks")
    declared: dict[str, Any] = {}
    if hasattr(obj, "num_clusters"):
        declared["clusters"] = int(obj.num_clusters)
    if hasattr(obj, "input_shape"):
        declared["shape"] = parse_shape(",".join(map(str, obj.input_shape)), f"input_shape of {type(obj).__name__}")
    input_format = spec.options.get("input") or default_input_format(obj)
    if isinstance(obj, nn.Module):
        obj = obj.to(device).eval()
    backend = PythonBackend(obj, method, input_format, device)
    differentiable = isinstance(obj, nn.Module) and input_format == "torch"
    return _from_backend(
        spec, backend, declared, kind="python", data_shape=data_shape, data_name=data_name,
        default_output=output, differentiable=differentiable, probe=probe,
    )


def _onnx(spec, data_shape, data_name, device, probe):
    from clusterattack.victims.sources.files import OnnxBackend

    backend = OnnxBackend(spec.target, spec.options.get("output_name"), device)
    declared = backend.inspect()
    return _from_backend(
        spec, backend, declared, kind="onnx", data_shape=data_shape, data_name=data_name,
        default_output=None, differentiable=False, probe=probe,
    )


def _torchscript(spec, data_shape, data_name, device, probe):
    from clusterattack.victims.sources.files import TorchScriptBackend

    backend = TorchScriptBackend(spec.target, device)
    declared = backend.inspect()
    return _from_backend(
        spec, backend, declared, kind="torchscript", data_shape=data_shape, data_name=data_name,
        default_output=None, differentiable=True, probe=probe,
    )


def _mlflow(spec, data_shape, data_name, device, probe):
    from clusterattack import tracking
    from clusterattack.tracking.pyfunc import model_flavors
    from clusterattack.victims.base import ClusteringModel
    from clusterattack.victims.sources.pyfunc import load_pyfunc_backend

    uri = spec.target
    try:
        flavors = model_flavors(uri)
    except Exception as exc:  # MlflowException, OSError: not found, no registry, bad URI
        raise VictimSpecError(f"cannot read the MLflow model {uri!r}: {exc}") from exc
    if "pytorch" in flavors:
        model = tracking.load_model(uri, torch.device(device))
        if isinstance(model, ClusteringModel) or _contract_module(model):
            return _checked_module(spec, model, data_shape, data_name, device, probe=False)
        log.info("%s is a torch model without the Victim contract: using its pyfunc", uri)
    if "python_function" not in flavors:
        raise VictimSpecError(f"MLflow model {uri!r} has no pyfunc flavor (flavors: {sorted(flavors)})")
    backend, declared = load_pyfunc_backend(uri, spec.options.get("input"))
    return _from_backend(
        spec, backend, declared, kind="mlflow", data_shape=data_shape, data_name=data_name,
        default_output="memberships" if declared.get("clusters") else None, differentiable=False, probe=probe,
    )


def _adapter(spec, adapter_path, url, data_shape, data_name, api_key, max_image_queries, check):
    from clusterattack.victims.sources.adapter import load_adapter
    from clusterattack.victims.sources.remote import make_adapter_victim

    config = load_adapter(adapter_path, url=url)
    if spec.options.get("name"):
        config = config.replace(name=spec.options["name"])
    if max_image_queries is not None:
        cap = config.politeness.max_image_queries
        cap = max_image_queries if cap is None else min(cap, max_image_queries)
        config = config.replace(politeness=_replace(config.politeness, max_image_queries=cap))
    if config.input_shape is not None:
        _check_shape(spec, config.input_shape, data_shape, data_name)
    return make_adapter_victim(config, input_shape=data_shape, api_key=api_key, spec=spec.text, check=check)


def _replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


def resolve_victim(
    spec: str | Path | tuple[str, str] | ParsedVictimSpec,
    *,
    dataset: DatasetLike = None,
    options: Mapping[str, Any] | None = None,
    api_key: str | None = None,
    device: str | torch.device = "cpu",
    probe: bool = True,
    max_image_queries: int | None = None,
) -> Any:
    """The victim ``spec`` names, checked before any attack query (see ``spec.py`` for the grammar).

    ``dataset`` (a name, an ``ImageDataset`` or a C x H x W shape) fills an input shape the
    model leaves open and must agree with one it states. ``options`` are added to the
    spec's own (they win; ``adapter=FILE`` turns an http(s) URL into someone else's
    service). ``api_key``: the key of one of our served victims, or the secret of an
    adapter whose ``auth.env`` is unset. ``probe``: ask a local model four seeded random
    images now (nothing is counted), so a model that answers no probabilities fails here.
    ``max_image_queries`` caps an adapter's image-queries (below its own cap).

    Returns a Victim (``predict_proba``) or a decision-only victim (``predict`` only);
    raises VictimSpecError (a ValueError) naming the fault.
    """
    parsed = spec if isinstance(spec, ParsedVictimSpec) else parse_victim_spec(spec)
    parsed = parsed.with_options(options)
    data_shape, data_name = _dataset_shape(dataset)
    device = str(device)
    kind = parsed.kind
    if kind == "file" and (Path(parsed.target) / "MLmodel").is_file():
        parsed = ParsedVictimSpec(parsed.text, "mlflow", parsed.target, parsed.options)
        kind = "mlflow"
    if kind in ("registry", "file"):
        from clusterattack.victims.io import load_builtin_victim

        model = load_builtin_victim(parsed.target, device=device)
        return _checked_module(parsed, model, data_shape, data_name, device, probe=False)
    if kind == "served":
        if "adapter" in parsed.options:
            return _adapter(parsed, parsed.options["adapter"], parsed.target, data_shape, data_name,
                            api_key, max_image_queries, check=True)
        from clusterattack.serving import ServedVictim
        from clusterattack.victims.sources.remote import check_reachable

        if not api_key:
            raise VictimSpecError(
                f"an API key is required for the served victim {parsed.target} (--api-key); for a service "
                "that is not ours, give its adapter (--adapter FILE or adapter:FILE)"
            )
        check_reachable(parsed.target)  # a clear error now, not five retries of a refused connection
        victim = ServedVictim(parsed.target, api_key, device="cpu")
        _check_shape(parsed, victim.input_shape, data_shape, data_name)
        return victim
    if kind == "adapter":
        return _adapter(parsed, parsed.target, None, data_shape, data_name, api_key, max_image_queries, check=True)
    handlers = {"python": _python, "onnx": _onnx, "torchscript": _torchscript, "mlflow": _mlflow}
    return handlers[kind](parsed, data_shape, data_name, device, probe)


def describe_victim(victim: Any) -> dict[str, Any]:
    """What a record says about a resolved victim: kind, spec, output, clusters, shape."""
    describe = getattr(victim, "describe", None)
    if callable(describe):
        return dict(describe())
    return {
        "kind": "torch",
        "name": getattr(victim, "name", "") or type(victim).__name__,
        "output": "labels" if is_decision_only(victim) else "memberships",
        "num_clusters": int(victim.num_clusters),
        "input_shape": list(victim.input_shape),
    }


@dataclass(frozen=True)
class VictimFactory:
    """A picklable recipe that resolves a spec where it is called (a Serve replica).

    ``search_path``: directories put on ``sys.path`` first (the launcher's working directory,
    so ``py:`` modules import in the replica as they did where the job started); relative
    paths in the spec are made absolute by :meth:`for_serving`. ``mode``: in ``labels`` a
    decision-only victim is served as its one-hot memberships (the server answers their
    argmax, the ids); in ``scores`` it is refused.
    """

    spec: str
    options: tuple[tuple[str, str], ...] = ()
    search_path: tuple[str, ...] = ()
    mode: str = "scores"
    input_shape: tuple[int, int, int] | None = None
    api_key: str | None = None

    @classmethod
    def for_serving(cls, spec: str, *, mode: str, options: Mapping[str, Any] | None = None,
                    input_shape: tuple[int, int, int] | None = None, api_key: str | None = None) -> VictimFactory:
        parsed = parse_victim_spec(spec).with_options(options)
        text = parsed.text
        if parsed.kind == "python":
            where, _, attr = parsed.target.rpartition(":")
            if where.endswith(".py"):
                query = text.partition("?")[2]
                text = f"{Path(where).resolve()}:{attr}" + (f"?{query}" if query else "")
        elif parsed.kind in ("onnx", "torchscript", "adapter", "file", "mlflow") and Path(parsed.target).exists():
            prefix = "" if parsed.kind == "file" else f"{parsed.kind}:"
            query = text.partition("?")[2] if parsed.kind != "file" else ""
            text = f"{prefix}{Path(parsed.target).resolve()}" + (f"?{query}" if query else "")
        opts = dict(parsed.options)
        if "adapter" in opts:
            opts["adapter"] = str(Path(opts["adapter"]).resolve())
        extra = {k: v for k, v in opts.items() if k not in parse_victim_spec(text).options}
        return cls(text, tuple(sorted(extra.items())), (os.getcwd(),), mode, input_shape, api_key)

    def __call__(self) -> Any:
        for path in self.search_path:
            if path not in sys.path:
                sys.path.insert(0, path)
        victim = resolve_victim(self.spec, options=dict(self.options), dataset=self.input_shape, api_key=self.api_key)
        if is_decision_only(victim):
            if self.mode != "labels":
                raise VictimSpecError(
                    f"victim {self.spec!r} answers cluster ids only: serve it with --mode labels"
                )
            return OneHotMemberships(victim)
        return victim
