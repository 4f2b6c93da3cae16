"""The MLflow contract of the analyses: experiment, tags, JSON payload, figures and tables (temp store)."""

from __future__ import annotations

import mlflow
import pytest
from matplotlib.figure import Figure

from clusterattack.analyses import TransferConfig, log_result, log_transfer, run_transfer
from clusterattack.analyses.defenses import AnalysisResult
from clusterattack.tracking.analyses import log_analysis, read_analysis
from tests.analyses.conftest import tiny_attack

TRANSFER_KEYS = {
    "dataset", "norm", "eps", "sources", "targets", "generators", "pre", "post", "image_queries", "test_images", "seed",
}


def _artifacts(client, run_id: str, path: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


def test_transfer_run_follows_the_contract(mlflow_uri, tmp_path, blobs, victims):
    train, test, labels, _ = blobs
    config = TransferConfig(
        dataset="blobs", targets=("a", "b"), eps=0.2, attack=tiny_attack(), out_dir=str(tmp_path), use_ray=False,
        progress=False,
    )
    run_id = log_transfer(run_transfer(config, victims=victims, data=(train, test, labels)))
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "analyses"
    tags = run.data.tags
    assert tags["clusterattack.analysis"] == "transfer" and tags["clusterattack.dataset"] == "blobs"
    assert (tags["gradient_source"], tags["norm"], tags["eps"], tags["seed"]) == ("whitebox", "linf", "0.2", "0")
    payload = read_analysis(run_id, "transfer")
    assert set(payload) >= TRANSFER_KEYS
    assert set(payload["post"]) == {"nmi", "ari", "acc"} and len(payload["post"]["nmi"]) == 2
    assert set(payload["pre"]["a"]) == {"nmi", "ari", "acc"}
    assert _artifacts(client, run_id, "figures") == {f"figures/transfer_{m}.png" for m in ("nmi", "ari", "acc")}
    assert "tables/transfer_pairs.json" in _artifacts(client, run_id, "tables")
    table = client.load_table(exp.experiment_id, "tables/transfer_pairs.json", run_ids=[run_id])
    assert len(table) == 4 and {"source", "target", "nmi_post"} <= set(table.columns)


def test_defense_result_logs_files_and_nan_as_null(mlflow_uri, tmp_path):
    points = tmp_path / "points.npz"
    points.write_bytes(b"not really npz")
    result = AnalysisResult(
        "pca",
        {"dataset": "blobs", "victim": "a", "generator": "g", "eps": 0.1, "norm": "linf", "overlap": float("nan"),
         "explained_variance": [0.5, 0.2, 0.1], "overlap_method": "m", "points": "pca/points.npz", "seed": 3},
        "surrogate",
        figures={"pca_3d": Figure()},
        files={"pca/points.npz": str(points)},
    )
    run_id = log_result(result)
    client = mlflow.MlflowClient(mlflow_uri)
    assert client.get_run(run_id).data.tags["clusterattack.analysis"] == "pca"
    assert client.get_run(run_id).data.tags["seed"] == "3"
    assert read_analysis(run_id, "pca")["overlap"] is None
    assert "pca/points.npz" in _artifacts(client, run_id, "pca")
    assert "figures/pca_3d.png" in _artifacts(client, run_id, "figures")


def test_unknown_kind_is_rejected(mlflow_uri):
    with pytest.raises(ValueError, match="kind"):
        log_analysis("robustness", {}, dataset="d", gradient_source=None, norm=None, eps=None, seed=0)
