"""The schema of a result record: its fields, what each must hold, and the validated :class:`Record`.

The fields and their meaning are documented in ``docs/results/README.md``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "KINDS",
    "LEGACY_REQUIRED",
    "NORMS",
    "PROVENANCE_KINDS",
    "REQUIRED_FIELDS",
    "SCHEMA_VERSION",
    "Record",
    "RecordError",
    "is_record_id",
    "validate_record",
]

SCHEMA_VERSION = 1

PROVENANCE_KINDS = ("full", "legacy")
#: ``attack``: a generator (or baseline) attack's figures; ``victims``: training a victim;
#: ``benchmark``: anything else measured (serving throughput, diagnostics, analyses).
KINDS = ("attack", "victims", "benchmark")
NORMS = ("linf", "l2")

_BASE_FIELDS = ("command", "commit", "dirty", "machine", "date", "wall_s", "metrics")
#: The fields every row of a full-provenance record must resolve (its own or the record's).
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "attack": _BASE_FIELDS
    + (
        "victim",
        "victim_version",
        "dataset",
        "splits",
        "gradient_source",
        "recipe",
        "selection",
        "eps",
        "norm",
        "seeds",
        "image_queries",
        "calls",
        "calls_256",
    ),
    "victims": _BASE_FIELDS + ("victim", "victim_version", "dataset", "splits", "seeds"),
    "benchmark": _BASE_FIELDS,
}
#: What a legacy record must still say: where its figures came from, and when.
LEGACY_REQUIRED = ("date", "metrics")

_TOP_KEYS = {
    "schema", "id", "title", "description", "kind", "provenance", "source", "headline",
    "order", "columns", "common", "rows",
}
_COMMIT = re.compile(r"^[0-9a-f]{7,40}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_RECORD_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,80}$")


def is_record_id(text: str) -> bool:
    """Whether ``text`` can name a record (its id and file name): what a job checks before it runs."""
    return bool(_RECORD_ID.match(text))


_STAT_KEYS = {"mean", "std", "n"}

_DEFAULT_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "attack": (
        ("victim", "victim"),
        ("gradient_source", "gradient source"),
        ("nmi_pre", "NMI before"),
        ("nmi_post", "NMI after"),
        ("nmi_drop", "NMI drop"),
        ("image_queries", "image-queries"),
        ("calls_256", "calls of 256"),
    ),
    "victims": (
        ("victim", "victim"),
        ("nmi", "NMI"),
        ("ari", "ARI"),
        ("acc", "ACC"),
        ("wall_s", "wall s"),
    ),
    "benchmark": (),
}


class RecordError(ValueError):
    """A record that does not satisfy the schema; ``problems`` lists every fault found."""

    def __init__(self, where: str, problems: Sequence[str]) -> None:
        self.where = where
        self.problems = list(problems)
        super().__init__(f"{where}: " + "; ".join(self.problems))


@dataclass(frozen=True)
class Record:
    """One validated record: a table with its provenance (see the module docstring)."""

    id: str
    title: str
    kind: str
    provenance: str
    rows: tuple[dict[str, Any], ...]  # common fields merged in, row values winning
    common: dict[str, Any] = field(default_factory=dict)
    columns: tuple[tuple[str, str], ...] = ()
    description: str = ""
    source: str = ""
    headline: bool = False
    order: int = 100
    path: Path | None = None

    @property
    def legacy(self) -> bool:
        return self.provenance == "legacy"

    def missing_fields(self) -> list[str]:
        """Required fields of a full record that no row of this (legacy) record gives."""
        required = REQUIRED_FIELDS[self.kind]
        return [name for name in required if not all(name in row for row in self.rows)]


# ---------------------------------------------------------------------- validation
def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_stat(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and set(value) >= _STAT_KEYS
        and _is_number(value["mean"])
        and _is_number(value["std"])
        and isinstance(value["n"], int)
        and value["n"] >= 1
    )


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_field(name: str, value: Any, problems: list[str], where: str, legacy: bool) -> None:
    """Append a problem when ``value`` is not what the schema expects of field ``name``."""

    def bad(expected: str) -> None:
        problems.append(f"{where}: {name} must be {expected}, got {_describe(value)}")

    if name == "command":
        if not isinstance(value, str) or not value.strip():
            bad("the command line that produced the figures (a non-empty string)")
    elif name == "commit":
        if not isinstance(value, str) or not _COMMIT.match(value):
            bad("a git commit (7-40 lower-case hex digits)")
    elif name == "dirty":
        if not isinstance(value, bool):
            bad("true or false (uncommitted changes to code when the run started)")
    elif name == "date":
        if not isinstance(value, str) or not _DATE.match(value):
            bad("an ISO date YYYY-MM-DD")
    elif name in ("machine", "victim", "dataset", "recipe", "selection"):
        if not isinstance(value, str) or not value.strip():
            bad("a non-empty string")
    elif name == "victim_version":
        if not (isinstance(value, str) and value.strip()) and not (
            isinstance(value, int) and not isinstance(value, bool)
        ):
            bad("a registry version (int) or a version string")
    elif name == "splits":
        if (
            not isinstance(value, Mapping)
            or not value
            or not all(isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in value.items())
        ):
            bad('a dict of split name to image count, e.g. {"pool": 60000, "eval": 10000}')
    elif name == "gradient_source":
        # Any registered source (the attack validates its own names), never empty.
        if not isinstance(value, str) or not value.strip():
            bad("the attack's gradient source, e.g. 'surrogate' (a non-empty string)")
    elif name == "norm":
        if value not in NORMS:
            bad(f"one of {NORMS}")
    elif name == "eps":
        if not _is_number(value) or value <= 0:
            bad("a positive number")
    elif name == "seeds":
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in value)
        ):
            bad("a non-empty list of integer seeds")
    elif name in ("image_queries", "calls", "calls_256"):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0) and not _is_stat(value):
            bad("a non-negative integer (or a {mean, std, n} dict over seeds)")
    elif name == "wall_s":
        if not (_is_number(value) and value >= 0) and not _is_stat(value):
            bad("seconds, a non-negative number")
    elif name == "metrics":
        if not isinstance(value, Mapping) or not value:
            bad("a non-empty dict of metric name to number or {mean, std, n}")
        else:
            for key, metric in value.items():
                if not (_is_number(metric) or _is_stat(metric) or (legacy and metric is None)):
                    problems.append(
                        f"{where}: metrics.{key} must be a finite number or a {{mean, std, n}} dict, "
                        f"got {_describe(metric)}"
                    )


def validate_record(data: Mapping[str, Any], where: str = "record") -> Record:
    """The :class:`Record` of a record's JSON data; :class:`RecordError` listing every fault."""
    problems: list[str] = []
    if not isinstance(data, Mapping):
        raise RecordError(where, [f"a record must be a JSON object, got {type(data).__name__}"])
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        problems.append(f"unknown top-level keys {unknown}; expected some of {sorted(_TOP_KEYS)}")
    if data.get("schema") != SCHEMA_VERSION:
        problems.append(f"schema must be {SCHEMA_VERSION}, got {_describe(data.get('schema'))}")
    record_id = data.get("id")
    if not isinstance(record_id, str) or not _RECORD_ID.match(record_id):
        problems.append(
            f"id must be 1-81 characters of a-z, 0-9, '_', '.', '-' (the file name), got {_describe(record_id)}"
        )
    title = data.get("title")
    if not isinstance(title, str) or not title.strip():
        problems.append(f"title must be a non-empty string, got {_describe(title)}")
    kind = data.get("kind", "attack")
    if kind not in KINDS:
        problems.append(f"kind must be one of {KINDS}, got {_describe(kind)}")
        kind = "benchmark"
    provenance = data.get("provenance")
    if provenance not in PROVENANCE_KINDS:
        problems.append(f"provenance must be one of {PROVENANCE_KINDS}, got {_describe(provenance)}")
    legacy = provenance == "legacy"
    source = data.get("source", "")
    if legacy and (not isinstance(source, str) or not source.strip()):
        problems.append("a legacy record needs a source: where its figures were taken from")
    for name in ("headline",):
        if name in data and not isinstance(data[name], bool):
            problems.append(f"{name} must be true or false, got {_describe(data[name])}")
    order = data.get("order", 100)
    if not isinstance(order, int) or isinstance(order, bool):
        problems.append(f"order must be an integer, got {_describe(order)}")
        order = 100
    columns = data.get("columns")
    if columns is None:
        columns = _DEFAULT_COLUMNS[kind]
    elif not isinstance(columns, list) or not all(
        isinstance(c, list | tuple) and len(c) == 2 and all(isinstance(s, str) for s in c) for c in columns
    ):
        problems.append(f'columns must be a list of [key, label] pairs, got {_describe(columns)}')
        columns = ()
    common = data.get("common", {})
    if not isinstance(common, Mapping):
        problems.append(f"common must be a dict of fields every row shares, got {_describe(common)}")
        common = {}
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, Mapping) for r in rows):
        problems.append(f"rows must be a non-empty list of dicts, got {_describe(rows)}")
        rows = []
    merged = [{**common, **row} for row in rows]
    required = LEGACY_REQUIRED if legacy else REQUIRED_FIELDS[kind]
    for index, row in enumerate(merged):
        at = f"row {index}"
        for name in required:
            if name not in row:
                problems.append(
                    f"{at}: missing {name!r} (give it in the row or in the provenance shared by all rows)"
                )
        for name in REQUIRED_FIELDS["attack"]:
            if name in row:
                _check_field(name, row[name], problems, at, legacy)
        _check_seeds_and_stats(row, problems, at)
        _check_calls(row, problems, at)
    if problems:
        raise RecordError(where, problems)
    if not columns:
        columns = tuple((key, key) for key in merged[0]["metrics"])
    return Record(
        id=record_id,
        title=title.strip(),
        kind=kind,
        provenance=provenance,
        rows=tuple(merged),
        common=dict(common),
        columns=tuple((str(k), str(v)) for k, v in columns),
        description=str(data.get("description", "")).strip(),
        source=str(source).strip(),
        headline=bool(data.get("headline", False)),
        order=order,
    )


def _check_seeds_and_stats(row: Mapping[str, Any], problems: list[str], at: str) -> None:
    """Several seeds: every metric is a {mean, std, n} with n == the number of seeds, unless
    the spread is over something else (``"over": "draws"``, ``"trials"``)."""
    seeds = row.get("seeds")
    metrics = row.get("metrics")
    if not isinstance(seeds, list) or not isinstance(metrics, Mapping):
        return
    for key, metric in metrics.items():
        if len(seeds) > 1 and _is_number(metric):
            problems.append(
                f"{at}: metrics.{key} is a single number but the row has {len(seeds)} seeds "
                f"{seeds}; give {{mean, std, n}} (mean_std(values) builds it)"
            )
        over = metric.get("over", "seeds") if _is_stat(metric) else None
        if over == "seeds" and metric["n"] != len(seeds):
            problems.append(
                f"{at}: metrics.{key} has n={metric['n']} but the row has {len(seeds)} seeds "
                f"(a spread over something else names it: \"over\": \"draws\")"
            )


def _check_calls(row: Mapping[str, Any], problems: list[str], at: str) -> None:
    images, calls_256 = row.get("image_queries"), row.get("calls_256")
    if isinstance(images, int) and isinstance(calls_256, int) and calls_256 != math.ceil(images / 256):
        problems.append(
            f"{at}: calls_256 is {calls_256} but {images} image-queries make "
            f"{math.ceil(images / 256)} calls of 256"
        )
