"""The victim specification: one string that names a victim everywhere, parsed without loading it.

Grammar (options after ``?``, ``&``-separated ``key=value``; URLs take none, their ``?`` is theirs)::

    victim-<model>-<dataset> | <model>/<dataset>    zoo victim, newest registered version
    PATH                                            file written by save_victim
    models:/NAME/VERSION | runs:/ID/PATH | mlflow:URI_OR_DIR
                                                    MLflow model: a ClusteringModel, else its pyfunc
    py:PACKAGE.MODULE:ATTR[?opts]                   Python factory (or object) in an importable module
    PATH/TO/FILE.py:ATTR[?opts]                     the same from a file
    onnx:PATH[?opts]  (or PATH.onnx[?opts])         ONNX model run by onnxruntime
    torchscript:PATH[?opts]                         TorchScript module (torch.jit.save)
    adapter:FILE.yaml|FILE.json                     someone else's HTTP service, described by an adapter
    http(s)://HOST:PORT/APP                         a victim served by jobs/serve.py (with an API key);
                                                    with an ``adapter`` option, someone else's service

Options: ``clusters=K``, ``shape=C,H,W``, ``output=memberships|logits|labels`` (what the model
answers), ``input=torch|numpy|flat`` (how a Python or MLflow model takes images), ``name=TEXT``
(display name), ``output_name=NAME`` (ONNX output); any other option of a ``py:`` spec is a
keyword argument of its factory (ints, floats, true/false and none are converted).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

__all__ = [
    "KINDS",
    "OUTPUTS",
    "ParsedVictimSpec",
    "VictimSpecError",
    "parse_shape",
    "parse_victim_spec",
]

#: What a specification can name.
KINDS = ("registry", "file", "mlflow", "python", "onnx", "torchscript", "served", "adapter")
#: What a model's answer is.
OUTPUTS = ("memberships", "logits", "labels")
INPUTS = ("torch", "numpy", "flat")

_COMMON = {"clusters", "shape", "output", "name"}
_ALLOWED: dict[str, set[str] | None] = {
    "registry": {"name"},
    "file": {"name"},
    "served": {"adapter", "name"},  # from flags only: a URL's "?" belongs to the URL
    "python": None,  # anything: the rest are factory keyword arguments
    "onnx": _COMMON | {"output_name"},
    "torchscript": _COMMON,
    "mlflow": _COMMON | {"input"},
    "adapter": {"name"},
}
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE = re.compile(rf"^{_IDENT}(\.{_IDENT})*$")
_ATTR = re.compile(rf"^{_IDENT}(\.{_IDENT})*$")
_REGISTERED = re.compile(r"^victim-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+$")
_MODEL_DATASET = re.compile(r"^[A-Za-z0-9_.]+/[A-Za-z0-9_.]+$")
_MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


class VictimSpecError(ValueError):
    """A victim specification that is malformed, names nothing, or names an unusable model."""


@dataclass(frozen=True)
class ParsedVictimSpec:
    """A parsed specification: ``kind`` (one of KINDS), ``target`` (path, URI, module:attr), options.

    ``options`` are strings as written (``clusters`` and ``shape`` checked); ``text`` is the
    specification as given, what records and run names keep.
    """

    text: str
    kind: str
    target: str
    options: Mapping[str, str] = field(default_factory=dict)

    @property
    def display_name(self) -> str:
        """A short name for tables and app names: the ``name`` option, else from the target."""
        if self.options.get("name"):
            return str(self.options["name"])
        if self.kind == "registry":
            return self.target
        if self.kind == "python":
            where, _, attr = self.target.rpartition(":")
            module = Path(where).stem if where.endswith(".py") else where.rsplit(".", 1)[-1]
            return f"{module}.{attr}"
        if self.kind == "served":
            return self.target.rstrip("/").rsplit("/", 1)[-1]
        if self.kind == "mlflow":
            scheme, sep, rest = self.target.partition(":/")
            parts = [p for p in rest.split("/") if p] if sep and scheme in ("models", "runs") else []
            if parts:
                return parts[0] if scheme == "models" else f"run-{parts[0][:8]}"
            return Path(self.target).name
        return Path(self.target).stem

    def with_options(self, extra: Mapping[str, Any] | None) -> ParsedVictimSpec:
        """This spec with ``extra`` options added (they win over the text's), checked again."""
        if not extra:
            return self
        merged = {**self.options, **{str(k): _option_text(v) for k, v in extra.items()}}
        _check_options(self.kind, self.text, merged)
        return ParsedVictimSpec(self.text, self.kind, self.target, merged)


def _option_text(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


def parse_shape(text: str, what: str = "shape") -> tuple[int, int, int]:
    """``C,H,W`` (or ``CxHxW``) as three positive ints."""
    parts = re.split(r"[,x]", str(text).strip().strip("()[]"))
    try:
        dims = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise VictimSpecError(f"{what} must be C,H,W (three positive integers, e.g. 1,28,28), got {text!r}")
    return dims  # type: ignore[return-value]


def _check_options(kind: str, text: str, options: Mapping[str, str]) -> None:
    allowed = _ALLOWED[kind]
    if allowed is not None:
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise VictimSpecError(
                f"victim spec {text!r} ({kind}) takes no option {unknown}; "
                f"it takes {sorted(allowed) or 'none'}"
            )
    if "clusters" in options:
        try:
            k = int(options["clusters"])
        except ValueError:
            k = 0
        if k < 2:
            raise VictimSpecError(f"option clusters must be an integer >= 2, got {options['clusters']!r}")
    if "shape" in options:
        parse_shape(options["shape"], "option shape")
    if "output" in options and options["output"] not in OUTPUTS:
        raise VictimSpecError(f"option output must be one of {OUTPUTS}, got {options['output']!r}")
    if "input" in options and options["input"] not in INPUTS:
        raise VictimSpecError(f"option input must be one of {INPUTS}, got {options['input']!r}")


def _split_options(text: str) -> tuple[str, dict[str, str]]:
    head, sep, query = text.partition("?")
    options: dict[str, str] = {}
    if not sep:
        return head, options
    for part in query.split("&"):
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = unquote(key.strip())
        if not eq or not key:
            raise VictimSpecError(f"victim spec options must be key=value joined by '&', got {part!r} in {text!r}")
        if key in options:
            raise VictimSpecError(f"option {key!r} is given twice in {text!r}")
        options[key] = unquote(value.strip())
    return head, options


def _python_target(head: str, text: str) -> str:
    """``module:attr`` or ``file.py:attr``, syntax checked."""
    body = head[3:] if head.startswith("py:") else head
    where, sep, attr = body.rpartition(":")
    if not sep or not where or not attr:
        raise VictimSpecError(
            f"a Python victim is py:PACKAGE.MODULE:FACTORY or PATH/FILE.py:FACTORY, got {text!r}"
        )
    if not _ATTR.match(attr):
        raise VictimSpecError(f"factory name {attr!r} in {text!r} is not a Python identifier")
    if not where.endswith(".py") and not _MODULE.match(where):
        raise VictimSpecError(
            f"module {where!r} in {text!r} is not a dotted module name (use PATH/FILE.py:FACTORY for a file)"
        )
    return f"{where}:{attr}"


def parse_victim_spec(spec: str | Path | tuple[str, str]) -> ParsedVictimSpec:
    """Parse and check the text of a victim specification; nothing is imported, read or asked.

    Raises VictimSpecError naming what is wrong (an unknown option, a malformed module
    path, a bad ``clusters``/``shape``/``output``). A ``(model, dataset)`` tuple is the
    zoo victim ``victim-<model>-<dataset>``.
    """
    if isinstance(spec, tuple):
        if len(spec) != 2 or not all(isinstance(p, str) and p for p in spec):
            raise VictimSpecError(f"a zoo victim is (model, dataset), got {spec!r}")
        return ParsedVictimSpec(f"{spec[0]}/{spec[1]}", "registry", f"victim-{spec[0]}-{spec[1]}")
    if isinstance(spec, Path):
        spec = str(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise VictimSpecError(f"a victim spec must be a non-empty string, got {spec!r}")
    text = spec.strip()
    if text.startswith(("http://", "https://")):
        return ParsedVictimSpec(text, "served", text)
    head, options = _split_options(text)
    if head.startswith("py:") or re.search(r"\.py:[^/\\]+$", head):
        kind, target = "python", _python_target(head, text)
    elif head.startswith("onnx:") or (head.endswith(".onnx") and ":" not in head):
        kind, target = "onnx", head.removeprefix("onnx:")
    elif head.startswith("torchscript:"):
        kind, target = "torchscript", head.removeprefix("torchscript:")
    elif head.startswith("adapter:"):
        kind, target = "adapter", head.removeprefix("adapter:")
    elif head.startswith("mlflow:"):
        kind, target = "mlflow", head.removeprefix("mlflow:")
    elif head.startswith(_MLFLOW_SCHEMES):
        kind, target = "mlflow", head
    elif _REGISTERED.match(head):
        kind, target = "registry", head
    elif _MODEL_DATASET.match(head) and not Path(head).exists():
        model, dataset = head.split("/")
        kind, target = "registry", f"victim-{model}-{dataset}"
    else:
        kind, target = "file", head
    if not target:
        raise VictimSpecError(f"victim spec {text!r} names no {kind} target after its prefix")
    _check_options(kind, text, options)
    return ParsedVictimSpec(text, kind, target, options)
