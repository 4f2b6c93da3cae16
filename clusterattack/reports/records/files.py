"""Records as files under ``docs/results/``: reading and validating them, writing one atomically, and the
fields jobs build for them (:func:`mean_std`, :func:`code_provenance`)."""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from clusterattack.reports.records.schema import (
    SCHEMA_VERSION,
    Record,
    RecordError,
    validate_record,
)

__all__ = [
    "REPO_ROOT",
    "RESULTS_DIR",
    "code_provenance",
    "machine_description",
    "load_record",
    "load_records",
    "mean_std",
    "write_record",
]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]
RESULTS_DIR = REPO_ROOT / "docs" / "results"


def load_record(path: str | os.PathLike[str]) -> Record:
    """The validated record in ``path``; its id must be the file's stem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RecordError(str(path), [f"cannot read a JSON record ({exc})"]) from None
    record = validate_record(data, str(path))
    if record.id != path.stem:
        raise RecordError(str(path), [f"id {record.id!r} must equal the file name's stem {path.stem!r}"])
    return Record(**{**record.__dict__, "path": path})


def load_records(folder: str | os.PathLike[str] = RESULTS_DIR) -> list[Record]:
    """Every ``*.json`` record of ``folder``, validated, in page order (order, then id)."""
    paths = sorted(Path(folder).glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"no *.json records in {folder}")
    records = [load_record(p) for p in paths]
    return sorted(records, key=lambda r: (r.order, r.id))


def mean_std(values: Iterable[float]) -> dict[str, float | int]:
    """``{"mean", "std", "n"}`` of one metric over seeds (sample std; 0 for one value)."""
    values = [float(v) for v in values]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"mean_std needs finite values, got {values!r}")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def machine_description(threads: int | None = None) -> str:
    """The machine a figure was measured on: CPU model and count (and torch threads), or the GPU."""
    import contextlib
    import os
    import platform
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} GPU), {os.cpu_count()} CPUs"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    used = threads if threads is not None else torch.get_num_threads()
    return f"{model}, {os.cpu_count()} CPUs (torch threads {used}), no GPU"


def code_provenance(tags: Mapping[str, str]) -> dict[str, Any]:
    """``commit`` and ``dirty`` from a run's source tags (``tracking.store.source_tags()`` or an
    MLflow run's tags: ``clusterattack.git_commit``, ``clusterattack.git_dirty``, and
    ``clusterattack.git_diff`` kept as ``diff`` when the tree was dirty)."""
    commit = tags.get("clusterattack.git_commit")
    dirty = tags.get("clusterattack.git_dirty")
    if not commit or dirty not in ("true", "false"):
        raise ValueError(
            "expected the tags clusterattack.git_commit and clusterattack.git_dirty ('true' or "
            f"'false'), got {({k: v for k, v in tags.items() if k.startswith('clusterattack.git')})!r}"
        )
    out: dict[str, Any] = {"commit": commit, "dirty": dirty == "true"}
    if tags.get("clusterattack.git_diff"):
        out["diff"] = tags["clusterattack.git_diff"]
    return out


def write_record(
    name: str,
    rows: Sequence[Mapping[str, Any]],
    provenance: Mapping[str, Any],
    *,
    title: str,
    description: str = "",
    kind: str = "attack",
    columns: Sequence[tuple[str, str]] | None = None,
    headline: bool = False,
    order: int = 100,
    folder: str | os.PathLike[str] = RESULTS_DIR,
) -> Path:
    """Validate and write one table as ``<folder>/<name>.json``; returns the path.

    ``rows``: one dict per table row, each with a ``metrics`` dict (numbers, or
    :func:`mean_std` dicts when the row has several seeds) and whatever differs between
    rows (``victim``, ``gradient_source``, ``image_queries`` ...). ``provenance``: the fields
    all rows share (``command``, ``commit``, ``dirty``, ``machine``, ``date`` ...; see
    ``REQUIRED_FIELDS[kind]``); a row's own value wins. Full provenance is assumed; pass
    ``{"provenance": "legacy", "source": ...}`` in it for figures whose runs are not known.
    The file is replaced atomically, and nothing is written when a field is missing or
    malformed: :class:`RecordError` lists every problem.
    """
    common = dict(provenance)
    kind_of_provenance = common.pop("provenance", "full")
    source = common.pop("source", None)
    data: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "id": name,
        "title": title,
        "kind": kind,
        "provenance": kind_of_provenance,
    }
    if source is not None:
        data["source"] = source
    if description:
        data["description"] = description
    if headline:
        data["headline"] = True
    if order != 100:
        data["order"] = order
    if columns is not None:
        data["columns"] = [list(c) for c in columns]
    data["common"] = common
    data["rows"] = [dict(r) for r in rows]
    validate_record(data, f"record {name!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("wrote record %s (%d rows)", path, len(data["rows"]))
    return path
