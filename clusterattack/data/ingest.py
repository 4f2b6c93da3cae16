"""Ingest a registered data set into Parquet, or reuse one already stored (``ensure_dataset``)."""

from __future__ import annotations

import inspect
import json
import logging
import os

from clusterattack.data.errors import DatasetExists, DatasetNotFound
from clusterattack.data.parquet import (
    parquet_dataset_exists,
    read_manifest,
    write_parquet_dataset,
)
from clusterattack.data.registry import load_dataset, reader_options, resolve_reader

__all__ = ["dataset_spec", "ensure_dataset", "ingest_dataset"]

logger = logging.getLogger(__name__)


def dataset_spec(name: str, **opts) -> dict:
    """What identifies how a data set was made: canonical name and every reader option.

    Defaults are filled in, so ``seed=0`` given or left out makes the same spec; values
    are in JSON form (tuples become lists), as they are stored in the manifest.
    """
    key, factory = resolve_reader(name)
    accepted = reader_options(key)
    options = {
        p.name: p.default
        for p in inspect.signature(factory).parameters.values()
        if p.name in accepted and p.name != "path" and p.default is not inspect.Parameter.empty
    }
    options.update(opts)
    try:
        options = json.loads(json.dumps(options, sort_keys=True))
    except TypeError as err:
        raise ValueError(f"reader options must be JSON-serialisable, got {opts!r}") from err
    return {"name": key, "options": options}


def ingest_dataset(
    name: str,
    uri: str | os.PathLike,
    root: str | os.PathLike | None = None,
    overwrite: bool = False,
    rows_per_part: int | None = None,
    **opts,
) -> str:
    """Read data set ``name`` (see ``load_dataset``) and store it as Parquet at ``uri``."""
    spec = dataset_spec(name, **opts)
    if not overwrite and parquet_dataset_exists(uri):
        # Refuse before reading: a large data set takes minutes to load for nothing.
        raise DatasetExists(
            f"a complete data set is already stored at {os.fspath(uri)}; pass overwrite=True "
            "(--overwrite) to replace it"
        )
    ds = load_dataset(name, root=root, **opts)
    return write_parquet_dataset(
        ds, uri, overwrite=overwrite, rows_per_part=rows_per_part, spec=spec
    )


def ensure_dataset(
    name: str, uri: str | os.PathLike, root: str | os.PathLike | None = None, **opts
) -> str:
    """``uri`` holding data set ``name``: the complete one stored there, else a fresh ingest.

    Raises :class:`DatasetExists` if ``uri`` holds a different data set (another name or
    other reader options), rather than silently training on the wrong data.
    """
    uri = os.fspath(uri)
    spec = dataset_spec(name, **opts)
    try:
        manifest = read_manifest(uri)
    except DatasetNotFound:
        logger.info("no data set at %s yet: ingesting %s", uri, spec["name"])
        return ingest_dataset(name, uri, root=root, **opts)
    if manifest.get("spec") != spec:
        raise DatasetExists(
            f"{uri} holds {manifest.get('spec') or manifest.get('name')!r}, not {spec!r}; "
            "choose another URI or re-ingest with overwrite"
        )
    logger.info("reusing %s (%d rows) at %s", spec["name"], manifest["rows"], uri)
    return uri
