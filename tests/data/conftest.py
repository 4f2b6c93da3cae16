"""Fixtures of the data tests: an empty data root and a moto S3 server on loopback."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """An empty data root, also set as $CLUSTERATTACK_DATA_DIR."""
    root = tmp_path / "datasets"
    root.mkdir()
    monkeypatch.setenv("CLUSTERATTACK_DATA_DIR", str(root))
    return root


@pytest.fixture(scope="session")
def moto_endpoint() -> str:
    """A moto S3 server on loopback (a free port, never 5000) for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch) -> str:
    """A fresh bucket on the moto server, reached through the standard AWS variables."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket
