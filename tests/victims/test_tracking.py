"""MLflow tracking and registry: default store, run logging, register and load victims by name."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch

from clusterattack import tracking
from clusterattack.victims import VICTIMS, TrainJob, load_victim, run_train_job


def test_registered_name_format_and_validation():
    assert tracking.registered_name("cc", "fashion_mnist") == "victim-cc-fashion_mnist"
    with pytest.raises(ValueError, match="dataset name must use letters"):
        tracking.registered_name("cc", "fashion mnist")


def test_default_store_is_local_sqlite_under_mlruns(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("CLUSTERATTACK_ARTIFACT_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking.configure()
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}"
    assert tracking.artifact_root(uri) == (tmp_path.resolve() / "mlruns" / "artifacts").as_uri()
    assert (tmp_path / "mlruns").is_dir()
    assert tracking.UI_COMMAND == "mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db"
    assert tracking.ui_command(uri, port=5055).endswith(f"--backend-store-uri {uri} --port 5055")


def _git(cwd, *args):
    subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True)


def test_source_tags_say_which_commit_and_whether_the_code_differed(tmp_path):
    from clusterattack.tracking import store

    repo = tmp_path / "checkout"
    (repo / "pkg").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "pkg" / "code.py").write_text("x = 1\n")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()

    def tags():
        return store.read_source_tags(repo)

    assert tags() == {store.SOURCE_COMMIT_TAG: head, store.SOURCE_DIRTY_TAG: "false"}
    (repo / "untracked.txt").write_text("not code the run imported\n")
    (repo / "README.md").write_text("documentation changes nothing a run computes\n")
    _git(repo, "add", "README.md")
    assert tags()[store.SOURCE_DIRTY_TAG] == "false"
    (repo / "pkg" / "code.py").write_text("x = 2\n")
    dirty = tags()
    assert dirty[store.SOURCE_COMMIT_TAG] == head and dirty[store.SOURCE_DIRTY_TAG] == "true"
    assert len(dirty[store.SOURCE_DIFF_TAG]) == 12
    (repo / "pkg" / "code.py").write_text("x = 3\n")
    assert tags()[store.SOURCE_DIFF_TAG] != dirty[store.SOURCE_DIFF_TAG]
    assert store.read_source_tags(tmp_path / "no-checkout") == {}
    # What a run records is the commit of the checkout the package was imported from, as
    # git named it when the session started (tests/conftest.py), and a consistent dirty flag.
    recorded = tracking.source_tags()
    assert len(os.environ["CLUSTERATTACK_TEST_HEAD"]) == 40  # this suite runs from a git checkout
    assert recorded[store.SOURCE_COMMIT_TAG] == os.environ["CLUSTERATTACK_TEST_HEAD"]
    assert recorded[store.SOURCE_DIRTY_TAG] in ("true", "false")
    assert (store.SOURCE_DIFF_TAG in recorded) == (recorded[store.SOURCE_DIRTY_TAG] == "true")
    recorded[store.SOURCE_COMMIT_TAG] = "changed by a caller"
    assert tracking.source_tags()[store.SOURCE_COMMIT_TAG] == os.environ["CLUSTERATTACK_TEST_HEAD"]


def test_flatten_params_uses_dotted_keys():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {
        "a.b": 1,
        "a.c.d": 2,
        "e": 3,
    }


@pytest.mark.slow
def test_every_victim_round_trips_through_the_mlflow_registry(tiny, tiny_data, mlflow_uri):
    # One store for all six: creating the sqlite schema is most of the cost of a store.
    x = tiny_data.batch(torch.arange(6), torch.device("cpu"), test=True)
    expected = {}
    with tracking.start_run("victims-test", run_name="roundtrip", params={"config": {"k": 3}}) as run:
        run_id = run.info.run_id
        tracking.log_metrics({"nmi": 0.5, "note": "not a number"}, step=1)
        for name in sorted(VICTIMS):
            model = tiny.model(name, seed=2).eval()
            version = tracking.log_victim(model, model.config, {"nmi": 0.5}, dataset="synthetic")
            assert version.name == f"victim-{name}-synthetic" and str(version.version) == "1"
            assert version.tags["nmi"] == "0.5000" and version.tags["dataset"] == "synthetic"
            expected[name] = model.predict_proba(x)
    for name in sorted(VICTIMS):
        sources = [
            f"victim-{name}-synthetic",
            f"{name}/synthetic",
            (name, "synthetic"),
            f"models:/victim-{name}-synthetic/1",
        ]
        for source in sources:
            loaded = load_victim(source)
            assert loaded.name == name and not loaded.training
            torch.testing.assert_close(loaded.predict_proba(x), expected[name])
    # Every run says which code made it (this test runs from a git checkout, as CI does).
    run_tags = tracking.client().get_run(run_id).data.tags
    assert run_tags["clusterattack.git_commit"] == os.environ["CLUSTERATTACK_TEST_HEAD"]
    assert run_tags["clusterattack.git_dirty"] in ("true", "false")
    artifacts = Path(tracking.artifact_root(mlflow_uri).removeprefix("file://"))
    assert artifacts.is_dir() and any(artifacts.rglob("victim_config.json"))
    assert [v["name"] for v in tracking.list_victims()] == [
        f"victim-{n}-synthetic" for n in sorted(VICTIMS)
    ]


@pytest.mark.slow
def test_train_job_logs_epochs_and_registers_versions(synthetic_dataset, mlflow_uri, tmp_path):
    job = TrainJob(
        model="cc",
        dataset="synthetic",
        epochs=2,
        checkpoint_dir=str(tmp_path / "ckpt"),
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    first = run_train_job(job, dataset=synthetic_dataset)
    second = run_train_job(job, dataset=synthetic_dataset)
    assert (first.registered_name, first.model_version, second.model_version) == (
        "victim-cc-synthetic",
        "1",
        "2",
    )
    c = tracking.client()
    run = c.get_run(first.run_id)
    assert run.data.params["job.model"] == "cc" and run.data.params["recipe.epochs"] == "2"
    assert run.data.params["config.backbone.width"] == "32"
    nmi_per_epoch = c.get_metric_history(first.run_id, "nmi")
    assert [m.step for m in nmi_per_epoch[:2]] == [1, 2]
    assert set(first.scores) >= {"nmi", "ari", "acc"} and first.wall_s > 0
    newest = load_victim("victim-cc-synthetic")
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(newest.predict_proba(x), second.model.predict_proba(x))
    assert (tmp_path / "ckpt" / "victim.pt").exists()


@pytest.mark.slow
def test_train_victims_job_cli_on_a_registered_dataset(mlflow_uri, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "train_victims", Path(__file__).parents[2] / "jobs" / "train_victims.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = [
        "--model",
        "cc",
        "--dataset",
        "digits",
        "--epochs",
        "1",
        "--train-limit",
        "256",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
    ]
    assert job.main(argv) == 0
    out = capsys.readouterr().out
    assert "RESULT cc: NMI" in out and "victim-cc-digits v1" in out and "mlflow ui" in out
    assert load_victim("cc/digits").input_shape == (1, 8, 8)
