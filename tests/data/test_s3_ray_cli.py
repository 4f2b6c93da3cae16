"""S3 (moto server on loopback), ray.data reads and the ingest CLI, end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import boto3
import numpy as np
import pytest

from clusterattack.data import (
    ImageDataset,
    batch_images,
    ensure_dataset,
    parquet_dataset_exists,
    read_manifest,
    read_parquet_dataset,
    read_ray_dataset,
    write_parquet_dataset,
)
from clusterattack.data import parquet as parquet_module
from clusterattack.data.storage import resolve_uri


def _ingest_main():
    path = Path(__file__).resolve().parents[2] / "jobs" / "ingest.py"
    spec = importlib.util.spec_from_file_location("ingest_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def tiny(rng) -> ImageDataset:
    n = 9
    return ImageDataset(
        "tiny",
        rng.integers(0, 256, size=(n, 1, 6, 5), dtype=np.uint8),
        np.arange(n) % 3,
        np.where(np.arange(n) < 6, "train", "test"),
        ("x", "y", "z"),
        "synthetic",
    )


def _keys(bucket: str) -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


@pytest.mark.slow
def test_s3_filesystem_from_aws_variables(s3_bucket, moto_endpoint):
    fs, path = resolve_uri(f"s3://{s3_bucket}/some/prefix/")
    assert path == f"{s3_bucket}/some/prefix"
    assert fs.region == "us-east-1"
    options = fs.__reduce__()[1][0]  # what a Ray worker rebuilds the filesystem from
    assert options["endpoint_override"] == moto_endpoint.removeprefix("http://")
    assert options["scheme"] == "http"


@pytest.mark.slow
def test_s3_round_trip_and_interrupted_overwrite(s3_bucket, tiny, monkeypatch):
    uri = f"s3://{s3_bucket}/tiny"
    write_parquet_dataset(tiny, uri, rows_per_part=4)
    back = read_parquet_dataset(uri)
    assert back.images.tobytes() == tiny.images.tobytes()
    np.testing.assert_array_equal(back.split, tiny.split)
    assert "tiny/_SUCCESS" in _keys(s3_bucket)

    before = _keys(s3_bucket)
    real = parquet_module.pq.write_table

    def fail_second(table, where, **kwargs):
        if where.endswith("part-00001.parquet"):
            raise OSError("connection reset (simulated)")
        real(table, where, **kwargs)

    monkeypatch.setattr(parquet_module.pq, "write_table", fail_second)
    with pytest.raises(OSError, match="simulated"):
        write_parquet_dataset(tiny.subset("train"), uri, rows_per_part=4, overwrite=True)
    assert read_parquet_dataset(uri).images.tobytes() == tiny.images.tobytes()
    assert [k for k in _keys(s3_bucket) if k.endswith(".parquet")] == [
        k for k in before if k.endswith(".parquet")
    ]


@pytest.mark.slow
def test_s3_nothing_there(s3_bucket):
    assert not parquet_dataset_exists(f"s3://{s3_bucket}/absent")


def test_ingest_cli_local(tmp_path, capsys):
    out = tmp_path / "digits"
    assert _ingest_main()(["--dataset", "digits", "--out", str(out), "--opt", "seed=3"]) == 0
    printed = capsys.readouterr().out
    assert f"digits at {out}: 1797 rows, images 1x8x8" in printed
    assert "split test: 359" in printed and "split train: 1438" in printed
    assert "class 0: 178" in printed
    assert read_manifest(out)["spec"]["options"] == {"seed": 3, "test_fraction": 0.2}
    assert _ingest_main()(["--dataset", "digits", "--out", str(out)]) == 2  # exists: refused
    assert "pass overwrite=True (--overwrite)" in capsys.readouterr().err


@pytest.mark.slow
def test_ingest_cli_to_s3_then_ensure_reuses(s3_bucket, capsys):
    uri = f"s3://{s3_bucket}/datasets/digits"
    assert _ingest_main()(["--dataset", "digits", "--out", uri]) == 0
    printed = capsys.readouterr().out
    assert "1797 rows" in printed and "class 9: 180" in printed
    attempt = read_manifest(uri)["attempt"]
    assert ensure_dataset("digits", uri) == uri
    assert read_manifest(uri)["attempt"] == attempt
    with pytest.raises(SystemExit):  # argparse refuses a missing --out
        _ingest_main()(["--dataset", "digits"])


@pytest.mark.slow
def test_ray_data_reads_parts_listed_in_manifest(ray_session, tmp_path, tiny):
    uri = tmp_path / "tiny"
    write_parquet_dataset(tiny, uri, rows_per_part=4)
    (uri / "attempt-20990101T000000000000Z-00000000").mkdir()  # unlisted: must be ignored
    ds = read_ray_dataset(uri)
    batch = ds.take_batch(100, batch_format="numpy")
    order = np.argsort(batch["index"])
    np.testing.assert_array_equal(batch_images(batch)[order], tiny.images)
    np.testing.assert_array_equal(batch["label"][order], tiny.labels)
    assert read_ray_dataset(uri, split="test").count() == 3


@pytest.mark.slow
def test_ray_data_reads_a_data_set_on_s3(ray_session, s3_bucket, tiny):
    # The path a cluster job takes: Parquet parts on s3:// (the moto server), read by Ray
    # workers through the filesystem (endpoint, region) the driver resolved from the AWS
    # variables; only local paths were read through ray.data before.
    uri = f"s3://{s3_bucket}/datasets/tiny"
    write_parquet_dataset(tiny, uri, rows_per_part=4)
    parts = [k for k in _keys(s3_bucket) if k.endswith(".parquet")]
    assert len(parts) == 3  # 9 rows, 4 per part: the read spans several objects
    ds = read_ray_dataset(uri)
    batch = ds.take_batch(100, batch_format="numpy")
    order = np.argsort(batch["index"])
    np.testing.assert_array_equal(batch["index"][order], np.arange(9))
    np.testing.assert_array_equal(batch_images(batch)[order], tiny.images)
    np.testing.assert_array_equal(batch["label"][order], tiny.labels)
    test_rows = read_ray_dataset(uri, split="test").take_batch(100, batch_format="numpy")
    assert sorted(test_rows["index"].tolist()) == [6, 7, 8]
    np.testing.assert_array_equal(batch_images(test_rows)[np.argsort(test_rows["index"])], tiny.images[6:])
