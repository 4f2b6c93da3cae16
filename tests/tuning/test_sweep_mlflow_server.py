"""The tiny sweep logging to an MLflow tracking server over HTTP, read back through the server's REST API.

What cluster.yaml and the KubeRay manifests configure (MLFLOW_TRACKING_URI=http://...): runs,
params, metrics, tables (artifacts proxied by the server) and the registered generator.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import free_port
from tests.tuning.helpers import REPO, VENV_BIN, sweep_args, sweep_env

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", (tmp_path / "server-artifacts").as_uri(),
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the MLflow server did not answer within 120 s"
        time.sleep(1)
    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _api(url: str, endpoint: str, **params):
    answer = requests.get(f"{url}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
    assert answer.ok, f"{endpoint}: {answer.status_code} {answer.text[:500]}"
    return answer.json()


def test_the_tiny_sweep_logs_to_a_tracking_server_over_http(tmp_path, mlflow_server):
    env = sweep_env(tmp_path)
    env.pop("CLUSTERATTACK_ARTIFACT_ROOT")  # the server decides where artifacts go
    env.update(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_REGISTRY_URI=mlflow_server)
    args = sweep_args(tmp_path, "over-http", "--eps", "0.15", "--num-samples", "1", "--seeds", "1", "--quiet")
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    # Nothing went to a local store: the sweep's only store is the server.
    assert not (tmp_path / "mlflow.db").exists()
    experiment = _api(mlflow_server, "experiments/get-by-name", experiment_name="sweeps")["experiment"]
    runs = requests.post(
        f"{mlflow_server}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment["experiment_id"]], "max_results": 100}, timeout=30,
    ).json()["runs"]  # fmt: skip
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    parents = [r for r in runs if "mlflow.parentRunId" not in tags[r["info"]["run_id"]]]
    (parent,) = [p for p in parents if p["info"]["run_name"] == "over-http"]
    parent_id = parent["info"]["run_id"]
    assert parent["info"]["status"] == "FINISHED" and tags[parent_id]["selection"] == "label_free"
    children = [r for r in runs if tags[r["info"]["run_id"]].get("mlflow.parentRunId") == parent_id]
    # One search trial and one seed run, each with its params and streamed metrics.
    assert sorted(tags[c["info"]["run_id"]]["phase"] for c in children) == ["final", "search"]
    for child in children:
        params = {p["key"]: p["value"] for p in child["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in child["data"]["metrics"]}
        assert params["eps"] == "0.15" and params["selection"] == "label_free"
        assert metrics["image_queries"] > 0 and "objective" in metrics
        history = _api(mlflow_server, "metrics/get-history", run_id=child["info"]["run_id"], metric_key="epoch")
        assert [m["step"] for m in history["metrics"]][:3] == [1, 2, 3]

    # The tables are artifacts the server holds and serves.
    listed = _api(mlflow_server, "artifacts/list", run_id=parent_id, path="tables")
    names = {f["path"] for f in listed["files"]}
    assert {"tables/table1_attack.csv", "tables/table2_queries.parquet"} <= names
    csv = requests.get(
        f"{mlflow_server}/get-artifact", params={"path": "tables/table1_attack.csv", "run_uuid": parent_id}, timeout=30
    )
    assert csv.ok and "cc" in csv.text and "label_free" in csv.text

    # The generator is registered in the server's registry, tagged with how it was chosen.
    versions = _api(mlflow_server, "model-versions/search", filter="name='generator-cc-digits'")["model_versions"]
    assert len(versions) == 1 and versions[0]["status"] == "READY"
    version_tags = {t["key"]: t["value"] for t in versions[0].get("tags", [])}
    assert version_tags["selection"] == "label_free" and float(version_tags["eps"]) == 0.15
