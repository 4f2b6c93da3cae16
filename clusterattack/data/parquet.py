"""Image data sets as Parquet (one row per image), written atomically to a local path or s3://.

Layout of a data set at ``<uri>``::

    <uri>/attempt-<UTC time>-<id>/part-00000.parquet ...   one folder per write attempt
    <uri>/_SUCCESS                                          JSON manifest, written last

A write puts its part files under a fresh attempt folder and only then publishes the
manifest that names them (one PUT on S3, a rename on local disk: both atomic). Readers
require the manifest and read only the parts it lists, so an interrupted write never
reads as a data set, and an interrupted overwrite leaves the previous data set intact.
Part paths in the manifest are relative, so a data set can be copied (``aws s3 sync``).

Columns: index (int64), split (string), label (int64), image (binary: the raw uint8 bytes
of one C x H x W image, C-order), shape (list<int32>: [C, H, W]). The schema metadata
holds the data set's name, class names (JSON), source and the format version.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from clusterattack.data.dataset import SPLITS, ImageDataset
from clusterattack.data.errors import (
    DatasetExists,
    DatasetFormatError,
    DatasetNotFound,
    DatasetSchemaError,
)
from clusterattack.data.storage import join_uri, resolve_uri

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SCHEMA",
    "batch_images",
    "check_schema",
    "parquet_dataset_exists",
    "read_manifest",
    "read_parquet_dataset",
    "read_ray_dataset",
    "write_parquet_dataset",
]

logger = logging.getLogger(__name__)

FORMAT = "clusterattack.images"
FORMAT_VERSION = 1
MANIFEST_NAME = "_SUCCESS"
META_PREFIX = "clusterattack."
SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("split", pa.string()),
        ("label", pa.int64()),
        ("image", pa.binary()),
        ("shape", pa.list_(pa.int32())),
    ]
)
# Types a reader accepts per column: other writers (ray.data, pandas) may pick the large_*
# variants, which hold the same values.
_ACCEPTED_TYPES = {
    "index": (pa.int64(),),
    "split": (pa.string(), pa.large_string()),
    "label": (pa.int64(),),
    "image": (pa.binary(), pa.large_binary()),
    "shape": (pa.list_(pa.int32()), pa.large_list(pa.int32())),
}
# Part files of about this many image bytes: several parts let ray.data read in parallel,
# and binary offsets (int32) stay far below their 2 GiB limit.
_PART_BYTES = 32 * 1024 * 1024
_ROW_GROUP_BYTES = 8 * 1024 * 1024
# Attempt folders that no manifest names and are older than this are left-overs of
# interrupted writes; younger ones may belong to a write still running elsewhere.
_STALE_ATTEMPT = dt.timedelta(days=1)
_ATTEMPT_TIME = "%Y%m%dT%H%M%S%fZ"


def _metadata(ds: ImageDataset) -> dict[bytes, bytes]:
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "name": ds.name,
        "class_names": json.dumps(list(ds.class_names)),
        "source": ds.source,
    }
    try:
        meta["extra"] = json.dumps(ds.extra)
    except TypeError:
        logger.warning("%s: extra %s is not JSON-serialisable; not stored", ds.name, list(ds.extra))
    return {(META_PREFIX + k).encode(): v.encode() for k, v in meta.items()}


def _image_table(ds: ImageDataset, start: int, stop: int, schema: pa.Schema) -> pa.Table:
    n = stop - start
    c, h, w = ds.shape
    per_image = c * h * w
    flat = np.ascontiguousarray(ds.images[start:stop]).reshape(-1)
    # Zero-copy binary column: one value per image, all of the same length.
    offsets = np.arange(n + 1, dtype=np.int32) * np.int32(per_image)
    image = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(flat)])
    shape = pa.ListArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32) * 3),
        pa.array(np.tile(np.array([c, h, w], dtype=np.int32), n)),
    )
    return pa.Table.from_arrays(
        [
            pa.array(np.arange(start, stop, dtype=np.int64)),
            pa.array(ds.split[start:stop].astype(str), pa.string()),
            pa.array(ds.labels[start:stop].astype(np.int64)),
            image,
            shape,
        ],
        schema=schema,
    )


def _new_attempt() -> str:
    now = dt.datetime.now(dt.timezone.utc)
    return f"attempt-{now.strftime(_ATTEMPT_TIME)}-{uuid.uuid4().hex[:8]}"


def _attempt_time(name: str) -> dt.datetime | None:
    try:
        stamp = name.split("-")[1]
        return dt.datetime.strptime(stamp, _ATTEMPT_TIME).replace(tzinfo=dt.timezone.utc)
    except (IndexError, ValueError):
        return None


def _publish(fs: pafs.FileSystem, path: str, payload: bytes) -> None:
    """Write ``payload`` at ``path`` so that readers see all of it or none of it."""
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic rename on POSIX and Windows
    else:
        # An S3 PUT is atomic: the object appears whole when the upload completes.
        with fs.open_output_stream(path) as out:
            out.write(payload)


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_dir(path)
    except OSError as err:
        logger.warning("could not delete %s: %s", path, err)


def _collect_garbage(fs, root: str, keep: str, previous: str | None) -> None:
    """Delete the attempt the old manifest named and stale left-overs of interrupted writes."""
    if previous and previous != keep:
        _delete_dir(fs, join_uri(root, previous))
    now = dt.datetime.now(dt.timezone.utc)
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        name = info.base_name
        if (
            info.type != pafs.FileType.Directory
            or not name.startswith("attempt-")
            or name in (keep, previous)
        ):
            continue
        started = _attempt_time(name)
        if started is not None and now - started > _STALE_ATTEMPT:
            logger.info("removing stale attempt %s (started %s)", name, started.isoformat())
            _delete_dir(fs, info.path)


def write_parquet_dataset(
    ds: ImageDataset,
    uri: str | os.PathLike,
    *,
    overwrite: bool = False,
    rows_per_part: int | None = None,
    spec: dict[str, Any] | None = None,
) -> str:
    """Store ``ds`` at ``uri`` (local path or s3://bucket/prefix) atomically; returns ``uri``.

    Raises :class:`DatasetExists` if a complete data set is there and ``overwrite`` is
    false. ``rows_per_part`` defaults to about 32 MiB of images per part file. ``spec``
    (JSON-serialisable: how the data set was made, e.g. registry name and options) is kept
    in the manifest so :func:`clusterattack.data.ensure_dataset` can tell whether a stored
    data set is the one asked for.
    """
    uri = os.fspath(uri)
    fs, root = resolve_uri(uri)
    try:
        previous = _read_manifest_or_none(fs, root, uri)
    except DatasetFormatError:
        if not overwrite:
            raise
        logger.warning("replacing the unreadable manifest at %s", uri)
        previous = None
    if previous is not None and not overwrite:
        raise DatasetExists(
            f"a complete data set ({previous.get('name')!r}, {previous.get('rows')} rows) is "
            f"already stored at {uri}; pass overwrite=True (--overwrite) to replace it"
        )
    n = len(ds)
    per_image = max(1, int(np.prod(ds.shape)))
    if rows_per_part is None:
        rows_per_part = max(1, _PART_BYTES // per_image)
    if rows_per_part < 1 or rows_per_part * per_image >= 2**31:
        raise ValueError(
            f"rows_per_part must be >= 1 and keep a part under 2 GiB of images, got "
            f"{rows_per_part} rows of {per_image} bytes"
        )
    row_group = max(1, min(rows_per_part, _ROW_GROUP_BYTES // per_image))
    schema = SCHEMA.with_metadata(_metadata(ds))
    attempt = _new_attempt()
    attempt_dir = join_uri(root, attempt)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(attempt_dir)  # S3 has no folders: a key prefix needs no creating
    starts = list(range(0, n, rows_per_part)) or [0]
    parts = []
    try:
        for i, start in enumerate(tqdm(starts, desc=f"writing {ds.name}", unit="part")):
            stop = min(n, start + rows_per_part)
            rel = f"{attempt}/part-{i:05d}.parquet"
            table = _image_table(ds, start, stop, schema)
            pq.write_table(
                table,
                join_uri(root, rel),
                filesystem=fs,
                compression="zstd",
                row_group_size=row_group,
            )
            parts.append({"path": rel, "rows": stop - start})
        splits, counts = np.unique(ds.split, return_counts=True)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": ds.name,
            "rows": n,
            "shape": list(ds.shape),
            "num_classes": ds.num_classes,
            "splits": {str(s): int(c) for s, c in zip(splits, counts, strict=True)},
            "attempt": attempt,
            "parts": parts,
            "spec": spec,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        _publish(fs, join_uri(root, MANIFEST_NAME), json.dumps(manifest, indent=1).encode())
    except BaseException:
        # Nothing names these parts yet, so removing them is safe; a kill -9 leaves them to
        # the garbage collection of a later write.
        _delete_dir(fs, attempt_dir)
        raise
    _collect_garbage(fs, root, keep=attempt, previous=previous.get("attempt") if previous else None)
    logger.info("wrote %s: %d rows in %d part(s) to %s", ds.name, n, len(parts), uri)
    return uri


def _read_manifest_or_none(fs: pafs.FileSystem, root: str, uri: str) -> dict | None:
    path = join_uri(root, MANIFEST_NAME)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        raw = f.read()
    try:
        manifest = json.loads(raw)
    except ValueError as err:
        raise DatasetFormatError(f"{uri}/{MANIFEST_NAME}: not a JSON manifest: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetFormatError(
            f"{uri}/{MANIFEST_NAME}: not a {FORMAT} manifest (format "
            f"{manifest.get('format') if isinstance(manifest, dict) else None!r})"
        )
    if int(manifest.get("format_version", -1)) > FORMAT_VERSION:
        raise DatasetFormatError(
            f"{uri}: format version {manifest['format_version']} is newer than this reader's "
            f"({FORMAT_VERSION}); upgrade clusterattack"
        )
    if not isinstance(manifest.get("parts"), list) or not manifest["parts"]:
        raise DatasetFormatError(f"{uri}/{MANIFEST_NAME}: lists no part files")
    return manifest


def read_manifest(uri: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the complete data set at ``uri``; :class:`DatasetNotFound` if none."""
    uri = os.fspath(uri)
    fs, root = resolve_uri(uri)
    manifest = _read_manifest_or_none(fs, root, uri)
    if manifest is None:
        raise DatasetNotFound(
            f"no complete Parquet data set at {uri}: {MANIFEST_NAME} manifest missing (nothing "
            "written there, or a write was interrupted). Write one with "
            "`python jobs/ingest.py --dataset NAME --out URI`."
        )
    return manifest


def parquet_dataset_exists(uri: str | os.PathLike) -> bool:
    """Whether a complete data set (manifest and all) is stored at ``uri``."""
    try:
        read_manifest(uri)
    except DatasetNotFound:
        return False
    return True


def check_schema(schema: pa.Schema, where: str) -> None:
    """Raise :class:`DatasetSchemaError` naming the first missing or mistyped column."""
    for name, accepted in _ACCEPTED_TYPES.items():
        idx = schema.get_field_index(name)
        if idx < 0:
            raise DatasetSchemaError(
                f"{where}: missing column {name!r} (expected {accepted[0]}); columns are "
                f"{schema.names}"
            )
        if schema.field(idx).type not in accepted:
            raise DatasetSchemaError(
                f"{where}: column {name!r} has type {schema.field(idx).type}, expected "
                f"{' or '.join(str(t) for t in accepted)}"
            )
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    for key in ("format_version", "name", "class_names"):
        if META_PREFIX + key not in meta:
            raise DatasetSchemaError(
                f"{where}: schema metadata lacks {META_PREFIX + key!r} (not written by "
                "clusterattack.data.write_parquet_dataset?)"
            )
    if int(meta[META_PREFIX + "format_version"]) > FORMAT_VERSION:
        raise DatasetSchemaError(
            f"{where}: format version {meta[META_PREFIX + 'format_version']} is newer than "
            f"this reader's ({FORMAT_VERSION})"
        )


def _decode_images(column: pa.ChunkedArray, shapes: pa.ChunkedArray, where: str) -> np.ndarray:
    """N x C x H x W uint8 from a binary column of equally sized images (no per-row copies)."""
    if len(column) == 0:
        return np.zeros((0, 0, 0, 0), dtype=np.uint8)
    first = shapes[0].as_py()
    chw = tuple(int(v) for v in first)
    per_image = int(np.prod(chw))
    out = []
    for chunk in column.chunks:
        if len(chunk) == 0:
            continue
        offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], dtype=offset_type)[
            chunk.offset : chunk.offset + len(chunk) + 1
        ]
        if chunk.null_count or np.any(np.diff(offsets) != per_image):
            raise DatasetFormatError(
                f"{where}: every image must hold {per_image} bytes (shape {list(chw)}); found "
                "nulls or other lengths"
            )
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        out.append(data.reshape(-1, *chw))
    # Every row must state the same shape, else the byte lengths only matched by accident.
    flat_shapes = np.asarray(shapes.combine_chunks().flatten())
    if flat_shapes.size != 3 * len(column) or np.any(flat_shapes.reshape(-1, 3) != chw):
        raise DatasetFormatError(f"{where}: rows differ in 'shape' (first is {list(chw)})")
    return np.concatenate(out)


def read_parquet_dataset(uri: str | os.PathLike, split: str | None = None) -> ImageDataset:
    """The data set stored at ``uri`` (all rows, or one ``split``) read with pyarrow."""
    uri = os.fspath(uri)
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")
    fs, root = resolve_uri(uri)
    manifest = read_manifest(uri)
    tables = []
    for part in tqdm(manifest["parts"], desc=f"reading {manifest.get('name')}", unit="part"):
        path = join_uri(root, part["path"])
        try:
            table = pq.read_table(
                path, filesystem=fs, filters=[("split", "=", split)] if split else None
            )
        except FileNotFoundError as err:
            raise DatasetFormatError(
                f"{uri}: manifest lists part {part['path']}, which is missing"
            ) from err
        check_schema(table.schema, f"{uri}/{part['path']}")
        tables.append(table)
    table = pa.concat_tables(tables, promote_options="permissive")
    meta = {k.decode(): v.decode() for k, v in (tables[0].schema.metadata or {}).items()}
    index = table.column("index").to_numpy()
    images = _decode_images(table.column("image"), table.column("shape"), uri)
    if images.shape[0] == 0:
        images = np.zeros((0, *manifest["shape"]), dtype=np.uint8)
    order = np.argsort(index, kind="stable")
    if not np.all(order == np.arange(order.size)):
        images = images[order]
    extra = json.loads(meta.get(META_PREFIX + "extra", "{}"))
    return ImageDataset(
        name=meta[META_PREFIX + "name"],
        images=images,
        labels=table.column("label").to_numpy()[order],
        split=np.asarray(table.column("split").to_numpy(zero_copy_only=False), dtype=str)[order],
        class_names=tuple(json.loads(meta[META_PREFIX + "class_names"])),
        source=meta.get(META_PREFIX + "source", uri),
        extra=extra,
    )


def read_ray_dataset(
    uri: str | os.PathLike, split: str | None = None, decode: bool = True, **read_parquet_args
):
    """The data set at ``uri`` as a lazy ``ray.data.Dataset``.

    Columns are those of the Parquet schema; with ``decode`` (default) ``image`` becomes a
    uint8 tensor column of shape C x H x W, so numpy batches hold an N x C x H x W array
    (:func:`batch_images` handles both forms). Only the parts the manifest lists are read,
    through an explicit pyarrow filesystem: its endpoint and region travel to the Ray
    workers, which find S3 credentials through the standard chain in their own environment.
    Extra keyword arguments go to ``ray.data.read_parquet`` (e.g. ``override_num_blocks``).
    """
    import ray.data
    from ray.data.expressions import col, lit

    uri = os.fspath(uri)
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")
    fs, root = resolve_uri(uri)
    manifest = read_manifest(uri)
    paths = [join_uri(root, part["path"]) for part in manifest["parts"]]
    check_schema(pq.read_schema(paths[0], filesystem=fs), f"{uri}/{manifest['parts'][0]['path']}")
    ds = ray.data.read_parquet(paths, filesystem=fs, **read_parquet_args)
    if split is not None:
        ds = ds.filter(expr=col("split") == lit(split))  # pushed down into the Parquet scan
    if decode:
        # A map step rather than read_parquet's tensor_column_schema: Ray 2.60 applies that
        # schema after column pruning and fails on count() or select_columns without image.
        ds = ds.map_batches(
            functools.partial(_decode_batch, shape=tuple(manifest["shape"])),
            batch_format="numpy",
            zero_copy_batch=True,
        )
    return ds


def _decode_batch(batch: dict[str, np.ndarray], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    batch["image"] = batch_images(batch, shape)
    return batch


def batch_images(batch: dict[str, Any], shape: tuple[int, ...] | None = None) -> np.ndarray:
    """uint8 N x C x H x W images of a numpy-format batch of :func:`read_ray_dataset`.

    Accepts the decoded tensor column or the raw binary one (``decode=False``); ``shape``
    (C, H, W) defaults to the batch's own ``shape`` column.
    """
    images = batch["image"]
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4:
        return images
    if shape is None:
        if len(images) == 0:
            raise ValueError("cannot infer the image shape of an empty batch: pass shape=")
        shape = tuple(int(v) for v in np.asarray(batch["shape"][0]))
    return np.frombuffer(b"".join(images), dtype=np.uint8).reshape(-1, *shape)
