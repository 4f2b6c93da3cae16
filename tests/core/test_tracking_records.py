"""What the MLflow UI reads from our records: experiment kind, data set inputs and digests, shared views."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from clusterattack.data.dataset import ImageDataset
from clusterattack.data.parquet import read_manifest, write_parquet_dataset
from clusterattack.tracking import store
from clusterattack.tracking.datasets import (
    EVALUATION,
    TRAINING,
    DatasetUse,
    dataset_inputs,
    memory_dataset,
    parquet_dataset,
)
from clusterattack.tracking.sweeps import SweepRecorder
from clusterattack.tracking.ui import SHARED_VIEW_TAG, experiment_url, run_url, sweep_views


def _images(seed: int = 0, n_train: int = 12, n_test: int = 6) -> ImageDataset:
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    return ImageDataset(
        name="synthetic",
        images=rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8),
        labels=np.arange(n) % 3,
        split=np.array(["train"] * n_train + ["test"] * n_test),
        class_names=("a", "b", "c"),
        source="tests/core/test_tracking_records.py",
    )


def test_a_parquet_split_is_a_dataset_with_its_source_digest_and_profile(tmp_path):
    uri = write_parquet_dataset(_images(), tmp_path / "synthetic")
    train = parquet_dataset(uri, "train")
    assert (train.name, train.source_type) == ("synthetic.train", "local")
    assert json.loads(train.source) == {"uri": uri}
    assert len(train.digest) == 10
    assert json.loads(train.profile)["num_rows"] == 12 and json.loads(train.profile)["image_shape"] == [1, 8, 8]
    assert json.loads(train.schema)["mlflow_colspec"][3] == {"type": "binary", "name": "image", "required": True}
    test = parquet_dataset(uri, "test")
    assert test.name == "synthetic.test" and test.digest != train.digest
    # The same manifest is the same digest; an overwrite (a new write attempt) is another.
    assert parquet_dataset(uri, "train").digest == train.digest
    write_parquet_dataset(_images(), uri, overwrite=True)
    assert parquet_dataset(uri, "train").digest != train.digest
    with pytest.raises(ValueError, match="no split 'val'"):
        parquet_dataset(uri, "val")


def test_an_s3_parquet_source_is_typed_s3():
    manifest = {"name": "mnist", "splits": {"train": 5}, "shape": [1, 28, 28], "attempt": "a-1"}
    entity = parquet_dataset("s3://bucket/data/mnist", "train", manifest)
    assert entity.source_type == "s3" and json.loads(entity.source) == {"uri": "s3://bucket/data/mnist"}


def test_an_in_memory_split_is_digested_by_its_content():
    first = memory_dataset(_images(0), "train")
    assert first.digest == memory_dataset(_images(0), "train").digest
    assert first.digest != memory_dataset(_images(1), "train").digest
    assert first.source_type == "clusterattack" and json.loads(first.profile)["num_rows"] == 12
    with pytest.raises(ValueError, match="no image in split 'val'"):
        memory_dataset(_images(0), "val")


def test_inputs_say_context_split_and_how_many_images(tmp_path):
    uri = write_parquet_dataset(_images(), tmp_path / "synthetic")
    inputs = dataset_inputs(uri, [DatasetUse("train", TRAINING, 10, 3), DatasetUse("test", EVALUATION)])
    tags = [{t.key: t.value for t in i.tags} for i in inputs]
    assert tags[0] == {"mlflow.data.context": "training", "split": "train", "images": "10", "subset_seed": "3"}
    assert tags[1] == {"mlflow.data.context": "evaluation", "split": "test"}
    assert read_manifest(uri)["name"] == "synthetic"
    with pytest.raises(ValueError, match="context must be one of"):
        DatasetUse("train", "testing")
    with pytest.raises(TypeError, match="Parquet URI"):
        dataset_inputs(42, [DatasetUse("train", TRAINING)])


def test_experiments_are_created_and_kept_model_training(mlflow_uri):
    experiment_id = store.ensure_experiment("sweeps")
    kind = MlflowClient().get_experiment(experiment_id).tags[store.EXPERIMENT_KIND_TAG]
    assert kind == store.TRAINING_KIND == "custom_model_development"
    # One made before experiments were marked (or switched in the UI) is marked on next use.
    old = mlflow.create_experiment("attacks")
    MlflowClient().set_experiment_tag(old, store.EXPERIMENT_KIND_TAG, "genai_development")
    assert store.ensure_experiment("attacks") == old
    assert MlflowClient().get_experiment(old).tags[store.EXPERIMENT_KIND_TAG] == store.TRAINING_KIND
    mlflow.create_experiment("reports")
    assert store.mark_training_experiments() == ["reports"]


def test_sweep_views_filter_its_seed_runs_and_set_comparison_charts():
    seeds, rows = sweep_views("demo", "abc123")
    assert seeds.key != rows.key and sweep_views("demo", "abc123")[0].key == seeds.key
    assert seeds.state["searchFilter"] == "tags.`mlflow.parentRunId` = 'abc123' and tags.phase = 'final'"
    assert seeds.state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "victim"}]
    assert rows.state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "table_row"}]
    assert (seeds.state["useGroupedValuesInCharts"], rows.state["useGroupedValuesInCharts"]) == (False, True)
    kinds = [c["type"] for c in seeds.state["compareRunCharts"]]
    assert kinds[:3] == ["PARALLEL", "SCATTER", "SCATTER"] and "BAR" in kinds
    parallel = seeds.state["compareRunCharts"][0]
    assert parallel["selectedParams"][0] == "eps" and parallel["selectedMetrics"] == ["nmi_drop"]
    section = seeds.state["compareRunSections"][0]["uuid"]
    assert all(c["metricSectionId"] == section for c in seeds.state["compareRunCharts"])
    assert len(json.dumps(seeds.state)) < 20000  # MLflow's limit on an experiment tag value
    url = experiment_url("http://127.0.0.1:5001/", "3", seeds.key, charts=True)
    assert url.startswith("http://127.0.0.1:5001/#/experiments/3/runs?workflowType=machine_learning")
    assert url.endswith(f"compareRunsMode=CHART&viewStateShareKey={seeds.key}")
    assert run_url("", "3", "r1") == "#/experiments/3/runs/r1?workflowType=machine_learning"


def test_a_new_sweep_writes_its_views_and_says_where_to_click(mlflow_uri):
    recorder = SweepRecorder(mlflow_uri)
    parent = recorder.start_parent("demo", {"budget": 1}, {"sweep": "demo"})
    links = recorder.ui_links(parent, "http://127.0.0.1:5001")
    seeds, rows = sweep_views("demo", parent)
    assert list(links)[:2] == [seeds.title, rows.title]
    assert links[seeds.title].endswith(f"viewStateShareKey={seeds.key}")
    assert links["the sweep's parent run"].endswith(f"/runs/{parent}?workflowType=machine_learning")
    tags = MlflowClient().get_experiment(recorder.experiment_id).tags
    assert json.loads(tags[SHARED_VIEW_TAG + seeds.key]) == seeds.state
    note = MlflowClient().get_run(parent).data.tags["mlflow.note.content"]
    assert f"(#/experiments/{recorder.experiment_id}/runs?" in note and rows.key in note
