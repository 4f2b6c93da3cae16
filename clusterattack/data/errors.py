"""Typed errors of the data layer, so callers can tell 'not installed' from 'corrupt'."""

from __future__ import annotations

__all__ = [
    "DatasetError",
    "DatasetExists",
    "DatasetFormatError",
    "DatasetNotFound",
    "DatasetSchemaError",
    "UnknownDataset",
]


class DatasetError(Exception):
    """Base class of every error raised by ``clusterattack.data``."""


class DatasetNotFound(DatasetError, FileNotFoundError):
    """A data set is not present where it was looked for; the message says how to get it."""


class DatasetFormatError(DatasetError, ValueError):
    """Files exist but do not hold what their format promises (bad magic, wrong sizes)."""


class DatasetSchemaError(DatasetFormatError):
    """A Parquet data set lacks a column, has a wrong column type or wrong metadata."""


class DatasetExists(DatasetError, FileExistsError):
    """A complete data set is already stored at the target and overwriting was not asked for."""


class UnknownDataset(DatasetError, ValueError):
    """A name that the registry does not know."""
