"""Data sets: readers of real on-disk formats, a registry by name, and Parquet storage.

``load_dataset(name)`` reads a registered data set into an :class:`ImageDataset`;
``write_parquet_dataset``/``read_parquet_dataset``/``read_ray_dataset`` store and read it as
Parquet at a local path or s3:// URI; ``ensure_dataset(name, uri)`` does both as needed.
"""

from clusterattack.data.dataset import SPLITS, ImageDataset
from clusterattack.data.errors import (
    DatasetError,
    DatasetExists,
    DatasetFormatError,
    DatasetNotFound,
    DatasetSchemaError,
    UnknownDataset,
)
from clusterattack.data.ingest import dataset_spec, ensure_dataset, ingest_dataset
from clusterattack.data.parquet import (
    batch_images,
    parquet_dataset_exists,
    read_manifest,
    read_parquet_dataset,
    read_ray_dataset,
    write_parquet_dataset,
)
from clusterattack.data.paths import data_root
from clusterattack.data.registry import DATASETS, list_datasets, load_dataset

__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetError",
    "DatasetExists",
    "DatasetFormatError",
    "DatasetNotFound",
    "DatasetSchemaError",
    "ImageDataset",
    "UnknownDataset",
    "batch_images",
    "data_root",
    "dataset_spec",
    "ensure_dataset",
    "ingest_dataset",
    "list_datasets",
    "load_dataset",
    "parquet_dataset_exists",
    "read_manifest",
    "read_parquet_dataset",
    "read_ray_dataset",
    "write_parquet_dataset",
]
