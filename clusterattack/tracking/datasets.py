"""Data sets as MLflow run inputs: the Parquet source (or an in-memory reader's data) with its digest.

A run shows, under *Datasets used*, which images it trained on and which it was scored on.
One input names one split of one data set (``mnist.train``, ``mnist.test``), with the
context MLflow shows beside it:

* ``training``: images the run learns from (a victim's training split; an attacker's pool,
  whose labels it never reads);
* ``evaluation``: images a run is scored on with labels (the test split).

MLflow keeps one input per (data set, run), so the two roles of one stored data set are
two data sets, one per split. The digest says which bytes those were:

* a Parquet data set (:mod:`clusterattack.data.parquet`, local path or ``s3://``): the
  SHA-256 of its manifest (which names the write attempt, its part files and their row
  counts) and the split, so a re-ingest or an overwrite reads as another digest;
* an :class:`~clusterattack.data.dataset.ImageDataset` held in memory (a job that read raw
  files without Parquet): the SHA-256 of the split's images, labels and indices.

Input tags say how many images of the split the run used (``images``) and with which seed
it drew them (``subset_seed``) when it used fewer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

__all__ = [
    "CONTEXTS",
    "EVALUATION",
    "TRAINING",
    "DatasetUse",
    "dataset_inputs",
    "log_dataset_inputs",
    "memory_dataset",
    "parquet_dataset",
]

log = logging.getLogger(__name__)

TRAINING = "training"
EVALUATION = "evaluation"
CONTEXTS = (TRAINING, EVALUATION)
#: Columns of a stored image data set (``clusterattack.data.parquet.SCHEMA``), as MLflow shows them.
_SCHEMA = Schema(
    [
        ColSpec(DataType.long, "index"),
        ColSpec(DataType.string, "split"),
        ColSpec(DataType.long, "label"),
        ColSpec(DataType.binary, "image"),
        ColSpec(Array(DataType.integer), "shape"),
    ]
)
_DIGEST_CHARS = 10  # MLflow recommends at most 10 characters


@dataclass(frozen=True)
class DatasetUse:
    """One split of one data set as a run used it: ``context`` is ``training`` or ``evaluation``;
    ``images`` how many of the split's images it used (None: all), drawn with ``subset_seed``."""

    split: str
    context: str
    images: int | None = None
    subset_seed: int | None = None

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise ValueError(f"dataset context must be one of {CONTEXTS}, got {self.context!r}")
        if self.images is not None and self.images < 0:
            raise ValueError(f"images must be >= 0 or None, got {self.images}")

    def tags(self) -> list[InputTag]:
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, self.context), InputTag("split", self.split)]
        if self.images is not None:
            tags.append(InputTag("images", str(self.images)))
        if self.subset_seed is not None:
            tags.append(InputTag("subset_seed", str(self.subset_seed)))
        return tags


def _schema_json() -> str:
    # The form MLflow's own datasets store (mlflow.data.meta_dataset.MetaDataset.to_dict).
    return json.dumps({"mlflow_colspec": _SCHEMA.to_dict()})


def _source(uri: str) -> tuple[str, str]:
    """(source type, source JSON) of a stored data set: what MLflow's Local/S3ArtifactDatasetSource write."""
    kind = uri.split("://", 1)[0] if "://" in uri and not uri.startswith("file://") else "local"
    return kind, json.dumps({"uri": uri})


def parquet_dataset(uri: str, split: str, manifest: Mapping[str, Any] | None = None) -> DatasetEntity:
    """MLflow data set of ``split`` of the Parquet data set at ``uri`` (local path or ``s3://``).

    ``manifest`` is its ``_SUCCESS`` manifest (read from ``uri`` when left out). The digest
    is the SHA-256 of the manifest and the split; the profile holds the split's row count,
    the image shape and the class count.
    """
    if manifest is None:
        from clusterattack.data.parquet import read_manifest

        manifest = read_manifest(uri)
    splits = manifest.get("splits") or {}
    if split not in splits:
        raise ValueError(f"{uri} has no split {split!r}: its manifest lists {sorted(splits)}")
    text = json.dumps(dict(manifest), sort_keys=True, default=str)
    digest = hashlib.sha256(f"{text}\n{split}".encode()).hexdigest()[:_DIGEST_CHARS]
    source_type, source = _source(uri)
    profile = {
        "num_rows": int(splits[split]),
        "image_shape": list(manifest.get("shape") or []),
        "num_classes": manifest.get("num_classes"),
        "format": f"{manifest.get('format')} v{manifest.get('format_version')}",
        "written": manifest.get("created"),
    }
    return DatasetEntity(
        name=f"{manifest.get('name') or uri.rstrip('/').rsplit('/', 1)[-1]}.{split}",
        digest=digest,
        source_type=source_type,
        source=source,
        schema=_schema_json(),
        profile=json.dumps(profile),
    )


def memory_dataset(data: Any, split: str) -> DatasetEntity:
    """MLflow data set of ``split`` of an in-memory ``ImageDataset`` (read from raw files, no Parquet).

    The digest is the SHA-256 of the split's images, labels and indices; the source is the
    reader's own description of where the files were (``data.source``).
    """
    import numpy as np

    mask = np.asarray(data.split) == split
    if not mask.any():
        raise ValueError(f"data set {data.name!r} has no image in split {split!r}")
    sha = hashlib.sha256()
    for array in (np.flatnonzero(mask), np.asarray(data.labels)[mask], np.asarray(data.images)[mask]):
        sha.update(np.ascontiguousarray(array).tobytes())
    profile = {
        "num_rows": int(mask.sum()),
        "image_shape": list(data.shape),
        "num_classes": int(data.num_classes),
    }
    return DatasetEntity(
        name=f"{data.name}.{split}",
        digest=sha.hexdigest()[:_DIGEST_CHARS],
        source_type="clusterattack",
        source=json.dumps({"reader": data.name, "description": str(data.source)}),
        schema=_schema_json(),
        profile=json.dumps(profile),
    )


def dataset_inputs(source: Any, uses: Iterable[DatasetUse]) -> list[DatasetInput]:
    """The run inputs of ``uses`` of one data set: ``source`` a Parquet URI (str) or an ``ImageDataset``.

    A Parquet manifest is read once for all uses.
    """
    uses = list(uses)
    if isinstance(source, str):
        from clusterattack.data.parquet import read_manifest

        manifest = read_manifest(source)
        entities = [parquet_dataset(source, use.split, manifest) for use in uses]
    elif hasattr(source, "images") and hasattr(source, "split"):
        entities = [memory_dataset(source, use.split) for use in uses]
    else:
        raise TypeError(f"data set source must be a Parquet URI (str) or an ImageDataset, got {type(source).__name__}")
    return [DatasetInput(dataset=entity, tags=use.tags()) for entity, use in zip(entities, uses, strict=True)]


def log_dataset_inputs(client: MlflowClient, run_id: str, inputs: list[DatasetInput]) -> None:
    """Link ``inputs`` to ``run_id`` (MLflow keeps one link per data set and run: logging twice is harmless)."""
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
        log.debug("run %s: data set inputs %s", run_id, [i.dataset.name for i in inputs])
