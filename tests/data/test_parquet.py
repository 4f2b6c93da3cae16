"""Parquet storage on local disk: round trip, schema checks, atomic writes, ensure_dataset."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clusterattack.data import (
    DatasetExists,
    DatasetFormatError,
    DatasetNotFound,
    DatasetSchemaError,
    ImageDataset,
    ensure_dataset,
    parquet_dataset_exists,
    read_manifest,
    read_parquet_dataset,
    write_parquet_dataset,
)
from clusterattack.data import parquet as parquet_module


@pytest.fixture
def tiny(rng) -> ImageDataset:
    """11 RGB 5x4 images of 3 classes, train and test interleaved."""
    n = 11
    return ImageDataset(
        name="tiny",
        images=rng.integers(0, 256, size=(n, 3, 5, 4), dtype=np.uint8),
        labels=np.arange(n) % 3,
        split=np.where(np.arange(n) % 4 == 0, "test", "train"),
        class_names=("a", "b", "c"),
        source="synthetic, seed 0",
        extra={"note": "kept"},
    )


def _assert_same(a: ImageDataset, b: ImageDataset) -> None:
    assert a.images.tobytes() == b.images.tobytes() and a.images.shape == b.images.shape
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.split, b.split)
    assert (a.name, a.class_names, a.source) == (b.name, b.class_names, b.source)


def test_round_trip_is_byte_identical(tmp_path, tiny):
    uri = str(tmp_path / "tiny")
    assert write_parquet_dataset(tiny, uri, rows_per_part=4) == uri
    back = read_parquet_dataset(uri)
    _assert_same(tiny, back)
    assert back.extra == {"note": "kept"}
    manifest = read_manifest(uri)
    assert manifest["rows"] == 11 and len(manifest["parts"]) == 3
    assert manifest["splits"] == {"test": 3, "train": 8} and manifest["shape"] == [3, 5, 4]


def test_parquet_columns_and_metadata(tmp_path, tiny):
    uri = tmp_path / "tiny"
    write_parquet_dataset(tiny, uri)
    part = uri / read_manifest(uri)["parts"][0]["path"]
    table = pq.read_table(part)
    assert table.schema.names == ["index", "split", "label", "image", "shape"]
    assert table.schema.field("image").type == pa.binary()
    assert table.column("shape")[0].as_py() == [3, 5, 4]
    assert table.column("image")[2].as_py() == tiny.images[2].tobytes()
    meta = table.schema.metadata
    assert json.loads(meta[b"clusterattack.class_names"]) == ["a", "b", "c"]
    assert meta[b"clusterattack.format_version"] == b"1"


def test_read_one_split(tmp_path, tiny):
    write_parquet_dataset(tiny, tmp_path / "tiny", rows_per_part=5)
    test = read_parquet_dataset(tmp_path / "tiny", split="test")
    _assert_same(tiny.subset("test"), test)


def _rewrite_part(uri, transform):
    part = uri / read_manifest(uri)["parts"][0]["path"]
    table = pq.read_table(part)
    pq.write_table(transform(table), part)


def test_missing_column_is_named(tmp_path, tiny):
    uri = tmp_path / "tiny"
    write_parquet_dataset(tiny, uri)
    _rewrite_part(uri, lambda t: t.drop_columns(["label"]))
    with pytest.raises(DatasetSchemaError, match=r"missing column 'label' \(expected int64\)"):
        read_parquet_dataset(uri)


def test_wrong_column_type_is_named(tmp_path, tiny):
    uri = tmp_path / "tiny"
    write_parquet_dataset(tiny, uri)
    _rewrite_part(uri, lambda t: t.set_column(2, "label", t.column("label").cast(pa.string())))
    with pytest.raises(DatasetSchemaError, match="column 'label' has type string, expected int64"):
        read_parquet_dataset(uri)


def test_foreign_parquet_without_metadata(tmp_path, tiny):
    uri = tmp_path / "tiny"
    write_parquet_dataset(tiny, uri)
    _rewrite_part(uri, lambda t: t.replace_schema_metadata(None))
    with pytest.raises(DatasetSchemaError, match="lacks 'clusterattack.format_version'"):
        read_parquet_dataset(uri)


def test_no_manifest_means_no_dataset(tmp_path, tiny):
    with pytest.raises(DatasetNotFound, match="_SUCCESS manifest missing"):
        read_parquet_dataset(tmp_path / "nothing")
    uri = tmp_path / "tiny"
    write_parquet_dataset(tiny, uri)
    (uri / "_SUCCESS").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="not a JSON manifest"):
        read_parquet_dataset(uri)


def test_manifest_part_missing(tmp_path, tiny):
    uri = tmp_path / "tiny"
    write_parquet_dataset(tiny, uri, rows_per_part=6)
    (uri / read_manifest(uri)["parts"][1]["path"]).unlink()
    with pytest.raises(DatasetFormatError, match=r"manifest lists part .*part-00001.parquet"):
        read_parquet_dataset(uri)


def _fail_on_second_part(monkeypatch):
    real = pq.write_table
    calls = []

    def flaky(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real(table, where, **kwargs)

    monkeypatch.setattr(parquet_module.pq, "write_table", flaky)


def test_interrupted_first_write_leaves_nothing_readable(tmp_path, tiny, monkeypatch):
    uri = tmp_path / "tiny"
    _fail_on_second_part(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        write_parquet_dataset(tiny, uri, rows_per_part=4)
    assert not parquet_dataset_exists(uri)
    assert list(uri.iterdir()) == []  # the attempt's parts were removed


def test_interrupted_overwrite_keeps_previous_dataset(tmp_path, tiny, monkeypatch):
    uri = tmp_path / "tiny"
    write_parquet_dataset(tiny, uri, rows_per_part=4)
    before = read_manifest(uri)
    changed = ImageDataset(
        "tiny", 255 - tiny.images, tiny.labels, tiny.split, tiny.class_names, "changed"
    )
    _fail_on_second_part(monkeypatch)
    # A killed process would not clean up: keep its parts to show they are never read.
    monkeypatch.setattr(parquet_module, "_delete_dir", lambda fs, path: None)
    with pytest.raises(OSError, match="simulated"):
        write_parquet_dataset(changed, uri, rows_per_part=4, overwrite=True)
    assert read_manifest(uri) == before
    _assert_same(tiny, read_parquet_dataset(uri))
    assert len([p for p in uri.iterdir() if p.name.startswith("attempt-")]) == 2


def test_overwrite_replaces_and_collects_old_attempts(tmp_path, tiny):
    uri = tmp_path / "tiny"
    write_parquet_dataset(tiny, uri)
    stale = uri / "attempt-20000101T000000000000Z-deadbeef"  # left by a write killed long ago
    stale.mkdir()
    with pytest.raises(DatasetExists, match="pass overwrite=True"):
        write_parquet_dataset(tiny, uri)
    smaller = tiny.subset("train")
    write_parquet_dataset(smaller, uri, overwrite=True)
    _assert_same(smaller, read_parquet_dataset(uri))
    attempts = [p.name for p in uri.iterdir() if p.name.startswith("attempt-")]
    assert attempts == [read_manifest(uri)["attempt"]]


def test_ensure_dataset_ingests_once_then_reuses(tmp_path):
    uri = str(tmp_path / "digits")
    assert ensure_dataset("digits", uri, seed=1) == uri
    first = read_manifest(uri)
    assert first["spec"] == {"name": "digits", "options": {"seed": 1, "test_fraction": 0.2}}
    assert ensure_dataset("Digits", uri, seed=1, test_fraction=0.2) == uri  # defaults filled
    assert read_manifest(uri)["attempt"] == first["attempt"]  # not written again
    with pytest.raises(DatasetExists, match="choose another URI"):
        ensure_dataset("digits", uri, seed=2)
    assert len(read_parquet_dataset(uri)) == 1797
