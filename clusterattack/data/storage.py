"""URIs to pyarrow filesystems: local paths and s3:// (endpoint and region from the AWS variables)."""

from __future__ import annotations

import logging
import os
import posixpath
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

__all__ = ["is_local", "join_uri", "resolve_uri", "s3_filesystem"]

logger = logging.getLogger(__name__)


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured the way the AWS CLI and SDKs are.

    Endpoint: ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (for MinIO, moto, Ceph...).
    Region: ``AWS_REGION``, else ``AWS_DEFAULT_REGION``. Credentials: the SDK's standard
    chain (environment, ~/.aws files, instance metadata); none are read here.
    """
    kwargs: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"S3 endpoint {endpoint!r} (from AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL) must look "
                "like http://host:port or https://host"
            )
        kwargs["endpoint_override"] = parts.netloc
        kwargs["scheme"] = parts.scheme
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    logger.debug("S3 filesystem with %s", kwargs)
    return pafs.S3FileSystem(**kwargs)


def is_local(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` names the local filesystem (a plain path or file://)."""
    uri = os.fspath(uri)
    return "://" not in uri or uri.startswith("file://")


def resolve_uri(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds ``uri`` and the path on it.

    ``s3://bucket/prefix`` -> (S3FileSystem from the AWS variables, "bucket/prefix");
    a local path or file:// URI -> (LocalFileSystem, absolute path); any other scheme is
    left to pyarrow (``FileSystem.from_uri``).
    """
    uri = os.fspath(uri)
    if uri.startswith("s3://"):
        path = uri[len("s3://") :].strip("/")
        if not path or path.startswith("/"):
            raise ValueError(f"S3 URI {uri!r} must look like s3://bucket/prefix")
        return s3_filesystem(), path
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), Path(uri).expanduser().resolve().as_posix()


def join_uri(base: str, *parts: str) -> str:
    """``base`` and ``parts`` joined with '/' (filesystem paths are POSIX-style in pyarrow)."""
    return posixpath.join(base, *parts)
