"""The declarative adapter of someone else's HTTP clustering service: a YAML or JSON file.

It says how images are sent (a JSON field or an .npy body; layout, dtype and scale such as
8-bit pixels), where the memberships, logits or cluster ids are in the answer (a path such
as ``result.clusters[*].p``), the auth header (its secret read from an environment
variable, never from the file), and the client's politeness: a rate limit, retries with
exponential back-off that honour ``Retry-After``, and a cap on image-queries. Example::

    url: https://clusters.example.com/v2/assign
    num_clusters: 10
    input_shape: [1, 8, 8]
    batch_size: 32
    request: {format: json, field: inputs.pixels, layout: flat, dtype: uint8}
    response: {path: "result.assignments[*].probabilities", kind: memberships}
    auth: {header: Authorization, env: CLUSTER_API_TOKEN, prefix: "Bearer "}
    politeness: {rate_per_s: 5, burst: 5, max_retries: 5, max_image_queries: 20000}
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from clusterattack.victims.sources.spec import OUTPUTS, VictimSpecError, parse_shape

__all__ = [
    "AdapterConfig",
    "AdapterPathError",
    "AuthSpec",
    "Politeness",
    "RequestFormat",
    "ResponseFormat",
    "get_path",
    "load_adapter",
    "parse_path",
    "set_path",
]

_LAYOUTS = ("nchw", "nhwc", "flat")
_DTYPES = ("uint8", "float32", "float64")
_FORMATS = ("json", "npy")
_TOKEN = re.compile(r"\.?([^.\[\]]+)|\[(\d+|\*)\]")


class AdapterPathError(VictimSpecError):
    """A path of the adapter does not exist in the service's answer."""


def parse_path(text: str) -> tuple[str | int, ...]:
    """``a.b[0].c`` or ``a[*].p`` as tokens (str keys, int indices, ``"*"`` for every item); ``""`` is the root."""
    text = text.strip().removeprefix("$").lstrip(".")
    tokens: list[str | int] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise VictimSpecError(f"adapter path {text!r} is not a path like a.b[0].c or a[*].p (at {text[pos:]!r})")
        key, index = match.groups()
        tokens.append(key if key is not None else ("*" if index == "*" else int(index)))
        pos = match.end()
    return tuple(tokens)


def _show(tokens: tuple[str | int, ...]) -> str:
    out = ""
    for t in tokens:
        out += f"[{t}]" if isinstance(t, int) or t == "*" else f".{t}"
    return out.lstrip(".") or "the root"


def get_path(doc: Any, text: str) -> Any:
    """The value at ``text`` in ``doc``; ``[*]`` maps the rest over a list; AdapterPathError naming the step."""
    tokens = parse_path(text)

    def walk(node: Any, i: int) -> Any:
        if i == len(tokens):
            return node
        token, here = tokens[i], _show(tokens[:i])
        if token == "*":
            if not isinstance(node, list):
                raise AdapterPathError(
                    f"adapter path {text!r}: {here} is a {type(node).__name__}, not a list for [*]"
                )
            return [walk(item, i + 1) for item in node]
        if isinstance(token, int):
            if not isinstance(node, list) or not -len(node) <= token < len(node):
                size = len(node) if isinstance(node, list) else type(node).__name__
                raise AdapterPathError(f"adapter path {text!r}: no item [{token}] in {here} ({size})")
            return walk(node[token], i + 1)
        if not isinstance(node, dict) or token not in node:
            has = sorted(node)[:12] if isinstance(node, dict) else type(node).__name__
            raise AdapterPathError(
                f"adapter path {text!r} not found in the answer: no key {token!r} in {here} (it has {has})"
            )
        return walk(node[token], i + 1)

    return walk(doc, 0)


def set_path(doc: dict[str, Any], text: str, value: Any) -> dict[str, Any]:
    """``doc`` with ``value`` placed at the key path ``text`` (dicts created on the way)."""
    tokens = parse_path(text)
    if not tokens or not all(isinstance(t, str) and t != "*" for t in tokens):
        raise VictimSpecError(f"request.field must be a key path such as images or inputs.pixels, got {text!r}")
    node = doc
    for key in tokens[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise VictimSpecError(f"request.field {text!r} crosses {key!r}, which request.extra sets to a non-object")
    node[tokens[-1]] = value
    return doc


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise VictimSpecError(f"adapter {name} must be one of {choices}, got {value!r}")


def _number(name: str, value: Any, minimum: float, integer: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= minimum
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "an integer" if integer else "a number"
        raise VictimSpecError(f"adapter {name} must be {kind} >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class RequestFormat:
    """How images travel: ``json`` (nested lists at ``field``, beside the fixed ``extra`` fields)
    or ``npy`` (the array as the body); ``layout`` nchw, nhwc or flat rows; pixel values are
    ``x * scale`` cast to ``dtype`` (uint8 rounds and clips; ``scale`` defaults to 255 for it)."""

    format: str = "json"
    field: str = "images"
    layout: str = "nchw"
    dtype: str = "float32"
    scale: float | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _choice("request.format", self.format, _FORMATS)
        _choice("request.layout", self.layout, _LAYOUTS)
        _choice("request.dtype", self.dtype, _DTYPES)
        _number("request.scale", self.scale, 1e-12, allow_none=True)
        if self.format == "json":
            set_path(dict(self.extra), self.field, None)  # checks the field path

    @property
    def pixel_scale(self) -> float:
        return float(self.scale) if self.scale is not None else (255.0 if self.dtype == "uint8" else 1.0)


@dataclass(frozen=True)
class ResponseFormat:
    """Where the answer is: a JSON ``path`` (``""``: the whole body) or an .npy body; ``kind``
    memberships, logits or labels."""

    format: str = "json"
    path: str = ""
    kind: str = "memberships"

    def __post_init__(self) -> None:
        _choice("response.format", self.format, _FORMATS)
        _choice("response.kind", self.kind, OUTPUTS)
        parse_path(self.path)


@dataclass(frozen=True)
class AuthSpec:
    """``header: prefix + secret``, the secret from the environment variable ``env`` (or the
    job's ``--api-key``)."""

    header: str = "Authorization"
    env: str | None = None
    prefix: str = ""


@dataclass(frozen=True)
class Politeness:
    """The client's manners. ``rate_per_s``/``burst``: a token bucket of requests; transient
    failures (connection lost, 5xx) are retried ``max_retries`` times with back-off from
    ``backoff_s`` doubling up to ``max_backoff_s``; a 429 (or 503) waits its ``Retry-After``
    (or the back-off) as long as the waits of one request add up to ``max_rate_wait_s``
    and none asks more than ``max_retry_after_s``; ``max_image_queries`` caps what the
    client will ever ask (None: no cap); ``timeout_s`` per request."""

    rate_per_s: float | None = None
    burst: int = 1
    max_retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 120.0
    max_rate_wait_s: float = 600.0
    max_image_queries: int | None = None
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _number("politeness.rate_per_s", self.rate_per_s, 1e-9, allow_none=True)
        _number("politeness.burst", self.burst, 1, integer=True)
        _number("politeness.max_retries", self.max_retries, 0, integer=True)
        for name in ("backoff_s", "max_backoff_s", "max_retry_after_s", "max_rate_wait_s"):
            _number(f"politeness.{name}", getattr(self, name), 0)
        _number("politeness.max_image_queries", self.max_image_queries, 0, integer=True, allow_none=True)
        _number("politeness.timeout_s", self.timeout_s, 1e-3)


@dataclass(frozen=True)
class AdapterConfig:
    """One foreign service: where, what it takes and answers, how to ask it (see the module doc)."""

    url: str
    num_clusters: int
    input_shape: tuple[int, int, int] | None = None
    method: str = "POST"
    batch_size: int = 64
    name: str | None = None
    request: RequestFormat = dataclasses.field(default_factory=RequestFormat)
    response: ResponseFormat = dataclasses.field(default_factory=ResponseFormat)
    auth: AuthSpec | None = None
    politeness: Politeness = dataclasses.field(default_factory=Politeness)
    source: str = ""

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise VictimSpecError(f"adapter url must be http(s)://host[:port]/path, got {self.url!r}")
        _number("num_clusters", self.num_clusters, 2, integer=True)
        _number("batch_size", self.batch_size, 1, integer=True)
        if self.method.upper() not in ("POST", "PUT"):
            raise VictimSpecError(f"adapter method must be POST or PUT, got {self.method!r}")
        if self.input_shape is not None:
            object.__setattr__(
                self, "input_shape", parse_shape(",".join(map(str, self.input_shape)), "adapter input_shape")
            )

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)


_SECTIONS = {"request": RequestFormat, "response": ResponseFormat, "auth": AuthSpec, "politeness": Politeness}


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise VictimSpecError(f"adapter {where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - {"source"}
    unknown = sorted(set(data) - names)
    if unknown:
        raise VictimSpecError(f"adapter {where} has unknown keys {unknown}; known: {sorted(names)}")
    kwargs = dict(data)
    for key, sub in _SECTIONS.items():
        if cls is AdapterConfig and key in kwargs and kwargs[key] is not None:
            kwargs[key] = _build(sub, kwargs[key], key)
    if cls is AdapterConfig:
        missing = [k for k in ("url", "num_clusters") if k not in kwargs]
        if missing:
            raise VictimSpecError(f"adapter {where} lacks {missing}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise VictimSpecError(f"adapter {where}: {exc}") from exc


def load_adapter(path: str | Path, url: str | None = None) -> AdapterConfig:
    """The adapter in a YAML or JSON file (``url`` replaces the file's), checked; VictimSpecError naming the fault."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise VictimSpecError(f"no adapter file {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise VictimSpecError(f"adapter file {str(path)!r} is not valid YAML or JSON: {exc}") from exc
    if isinstance(data, Mapping) and url is not None:
        data = {**data, "url": url}
    config = _build(AdapterConfig, data, f"file {str(path)!r}")
    return config.replace(source=str(path))
