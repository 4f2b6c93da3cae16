"""The MLflow UI as the comparison surface: a real `mlflow ui` on a store our code wrote, read over REST and in Chromium.

The store holds what the platform writes, made by its own code without Ray: the digits data
set as Parquet, a victim trained by the train job, an attack by jobs/attack.py, and a sweep
written by the sweep's recorder and its Tune callback (driven with stand-in trials) over two
victims and two gradient sources. The server must say, as the UI reads it, that each
experiment is a model-training one, that every run lists its data set splits as inputs with
their digests, and that the seed runs, the victim and the attack carry logged models; the
sweep's shared views open on its seed runs grouped by victim with the comparison charts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from clusterattack.attacks.config import AttackConfig
from clusterattack.attacks.generator import Generator
from clusterattack.attacks.io import save_generator
from clusterattack.tracking.datasets import parquet_dataset
from clusterattack.tracking.store import EXPERIMENT_KIND_TAG, TRAINING_KIND
from clusterattack.tracking.sweeps import SweepRecorder, generator_name
from clusterattack.tracking.ui import experiment_url, run_url
from clusterattack.tuning.trainable import FINAL_KEY, GENERATOR_FILE
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
VICTIMS = ("cc", "scan")
SOURCES = ("surrogate", "estimate")
EPS = (0.1, 0.2)
SEEDS = (1, 2)
pytestmark = pytest.mark.slow


def _load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trial(trial_id: str, config: dict, checkpoint=None) -> SimpleNamespace:
    """What MLflowSweepCallback reads of a Tune trial."""
    return SimpleNamespace(trial_id=trial_id, config=config, last_result={}, num_failures=0, checkpoint=checkpoint)


def _write_sweep(uri: str, data_uri: str, tmp: Path) -> tuple[str, dict[str, str]]:
    """A finished sweep as tuning.sweep writes it, through its recorder and callback; returns (parent, seed runs)."""
    from ray.tune import Checkpoint

    from clusterattack.tuning.mlflow_callback import MLflowSweepCallback

    recorder = SweepRecorder(uri)
    parent = recorder.start_parent("ui-sweep", {"budget": 5000}, {"sweep": "ui-sweep", "preset": "tiny"})
    seed_runs = {}
    torch.manual_seed(0)
    for v, model in enumerate(VICTIMS):
        for s, source in enumerate(SOURCES):
            base = AttackConfig(epochs=2, generator_width=4, generator_blocks=1).override(gradient_source=source)
            for phase in ("search", "final"):
                callback = MLflowSweepCallback(
                    recorder, parent, model, "digits", base,
                    params={"budget": 5000, "victim_version": "1", "selection": "label_free", "phase": phase},
                    tags={"sweep": "ui-sweep", "victim_version": "1", "phase": phase, "selection": "label_free"},
                    max_epochs=2, data_uri=data_uri, data_images={"train": 256, "test": 128}, data_seed=0,
                )  # fmt: skip
                runs = [(e, seed) for e in EPS for seed in (SEEDS if phase == "final" else (0,))]
                for i, (eps, seed) in enumerate(runs):
                    trial_id = f"{model}{source[:3]}{phase[0]}_{i:05d}"
                    params = {"eps": eps, "alpha_a": 1.0 + i, "alpha_c": 0.1 * (1 + s), "seed": seed}
                    checkpoint = None
                    if phase == "final":
                        folder = tmp / "checkpoints" / trial_id
                        generator = Generator((1, 8, 8), width=4, blocks=1)
                        save_generator(generator, base.override(**params), folder / GENERATOR_FILE)
                        checkpoint = Checkpoint.from_directory(str(folder))
                    trial = _trial(trial_id, {FINAL_KEY: params} if phase == "final" else params, checkpoint)
                    callback.on_trial_start(0, [], trial)
                    callback.on_trial_result(0, [], trial, {"epoch": 1, "objective": 0.5, "select_score": 0.5})
                    if phase == "final":
                        drop = 0.1 * (1 + v) + eps + 0.01 * seed + 0.05 * s
                        scores = {"nmi_pre": 0.6, "nmi_post": 0.6 - drop, "nmi_drop": drop, "acc_post": 0.3,
                                  "ari_post": 0.2, "changed_fraction": 0.4, "image_queries": 2000 + 100 * s}  # fmt: skip
                        callback.on_trial_result(0, [], trial, {"epoch": 2, "final": 1, **scores})
                    trial.last_result = {"epoch": 2}
                    callback.on_trial_complete(0, [], trial)
                    if phase == "final":
                        seed_runs[trial_id] = callback._runs[trial_id]
                        if seed == SEEDS[0]:
                            recorder.log_generator(
                                seed_runs[trial_id], generator, generator_name(model, "digits"),
                                folder / GENERATOR_FILE, {"eps": eps, "gradient_source": source},
                            )  # fmt: skip
    recorder.set_tags(parent, {"status": "completed"})
    recorder.end_run(parent)
    return parent, seed_runs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store written by the platform's code, and `mlflow ui` serving it on a free loopback port."""
    tmp = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "CLUSTERATTACK_ARTIFACT_ROOT": str(tmp / "art")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from clusterattack.data import ensure_dataset, read_parquet_dataset
        from clusterattack.victims import TrainJob, run_train_job
        from clusterattack.victims.backbones import BackboneConfig
        from clusterattack.victims.cc import CC, CCConfig
        from clusterattack.victims.io import save_victim

        data_uri = ensure_dataset("digits", str(tmp / "data" / "digits"))
        job = TrainJob(
            model="cc", dataset="digits", epochs=1, train_limit=256, progress=False,
            checkpoint_dir=str(tmp / "victim"), cache_dir=str(tmp / "cache"),
        )  # fmt: skip
        victim = run_train_job(job, dataset=read_parquet_dataset(data_uri))
        torch.manual_seed(0)
        victim_file = save_victim(CC(CCConfig(10, (1, 8, 8), BackboneConfig("convnet", 1, 8, 4))).eval(), tmp / "v.pt")
        code = _load_job("attack").main(
            [
                "--victim", str(victim_file), "--dataset", "digits", "--gradient-source", "estimate", "--eps", "0.1",
                "--epochs", "1", "--train-limit", "64", "--eval-limit", "64", "--seed", "1", "--quiet",
                "--budget", "100000", "--threads", "1", "--set", "generator_width=4", "--set", "estimator.samples=1",
            ]
        )  # fmt: skip
        assert code == 0
        parent, seed_runs = _write_sweep(uri, data_uri, tmp)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow_cli), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.read() == b"OK":
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow ui on port {port} did not come up") from None
                time.sleep(0.5)
        yield SimpleNamespace(
            base=base, data_uri=data_uri, parent=parent, seed_runs=seed_runs, victim_run=victim.run_id, tmp=tmp
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


def _api(store, path: str, body: dict | None = None) -> dict:
    url = f"{store.base}/api/2.0/mlflow/{path}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _experiment(store, name: str) -> dict:
    return _api(store, f"experiments/get-by-name?experiment_name={name}")["experiment"]


def _runs(store, experiment_id: str) -> list[dict]:
    return _api(store, "runs/search", {"experiment_ids": [experiment_id], "max_results": 1000})["runs"]


def _logged_models(store, experiment_id: str) -> list[dict]:
    models, token = [], None
    while True:
        page = _api(store, "logged-models/search", {"experiment_ids": [experiment_id], **({"page_token": token} if token else {})})
        models += page.get("models", [])
        token = page.get("next_page_token")
        if not token:
            return models


def _tags(entity: dict) -> dict[str, str]:
    return {t["key"]: t.get("value", "") for t in entity.get("tags", [])}


def _inputs(run: dict) -> dict[str, dict]:
    """name -> {digest, source, context, ...} of a run's data set inputs."""
    out = {}
    for item in run.get("inputs", {}).get("dataset_inputs", []):
        dataset = item["dataset"]
        out[dataset["name"]] = {
            "digest": dataset["digest"], "source_type": dataset["source_type"],
            "source": json.loads(dataset["source"]), **_tags(item),
        }  # fmt: skip
    return out


def test_every_experiment_opens_as_model_training(store):
    for name in ("sweeps", "victims", "attacks"):
        assert _tags(_experiment(store, name))[EXPERIMENT_KIND_TAG] == TRAINING_KIND, name


def test_every_run_lists_its_data_set_splits_with_their_digests(store):
    sweeps = _experiment(store, "sweeps")["experiment_id"]
    runs = _runs(store, sweeps)
    assert len(runs) == 1 + len(VICTIMS) * len(SOURCES) * len(EPS) * (1 + len(SEEDS))
    train = parquet_dataset(store.data_uri, "train")
    for run in runs:
        inputs = _inputs(run)
        phase = _tags(run["data"]).get("phase")
        assert inputs["digits.train"]["digest"] == train.digest, run["info"]["run_name"]
        assert inputs["digits.train"]["source"] == {"uri": store.data_uri}
        assert inputs["digits.train"]["mlflow.data.context"] == "training"
        assert inputs["digits.train"]["images"] == "256"
        # Labels are read only where runs are scored: seed runs (and the sweep as a whole).
        assert ("digits.test" in inputs) == (phase != "search"), run["info"]["run_name"]
    victim = _api(store, f"runs/get?run_id={store.victim_run}")["run"]
    assert {k: v["mlflow.data.context"] for k, v in _inputs(victim).items()} == {
        "digits.train": "training", "digits.test": "evaluation",
    }  # fmt: skip
    attack = _runs(store, _experiment(store, "attacks")["experiment_id"])[0]
    assert _inputs(attack)["digits.test"]["images"] == "64"


def test_seed_runs_victims_and_attacks_carry_logged_models(store):
    sweeps = _experiment(store, "sweeps")["experiment_id"]
    models = _logged_models(store, sweeps)
    by_run = {m["info"]["source_run_id"]: m for m in models}
    assert set(by_run) == set(store.seed_runs.values())  # one each, registration reused it
    model = by_run[store.seed_runs["ccsurf_00000"]]
    assert model["info"]["name"] == "generator-cc-digits" and model["info"]["status"] == "LOGGED_MODEL_READY"
    tags = _tags(model["info"])
    assert (tags["victim"], tags["gradient_source"], tags["eps"], tags["table_row"]) == (
        "victim-cc-digits", "surrogate", "0.1", "cc-digits-surrogate-eps0.1",
    )  # fmt: skip
    assert {m["key"] for m in model["data"]["metrics"]} >= {"nmi_post", "nmi_drop", "image_queries"}
    assert {p["key"] for p in model["data"]["params"]} >= {"eps", "alpha_a", "alpha_c", "gradient_source"}
    run = _api(store, f"runs/get?run_id={store.seed_runs['ccsurf_00000']}")["run"]
    assert [o["model_id"] for o in run["outputs"]["model_outputs"]] == [model["info"]["model_id"]]
    versions = _api(store, "registered-models/get-latest-versions", {"name": "generator-cc-digits"})
    # Each registered version is a seed run's own logged model, not a second copy of it.
    newest = versions["model_versions"][0]
    assert newest["source"] == f"models:/{by_run[newest['run_id']]['info']['model_id']}"
    for name, model_type in (("victims", "victim"), ("attacks", "generator")):
        experiment = _experiment(store, name)["experiment_id"]
        found = _logged_models(store, experiment)
        assert [m["info"]["model_type"] for m in found] == [model_type], name


def test_seed_runs_are_named_and_tagged_alike_across_victims_and_sources(store):
    sweeps = _experiment(store, "sweeps")["experiment_id"]
    finals = [r for r in _runs(store, sweeps) if _tags(r["data"]).get("phase") == "final"]
    keys = {frozenset(p["key"] for p in r["data"]["params"]) for r in finals}
    assert len(keys) == 1  # the same params in every seed run: parallel coordinates span them all
    metric_keys = {frozenset(m["key"] for m in r["data"]["metrics"]) for r in finals}
    assert len(metric_keys) == 1 and {"nmi_post", "nmi_drop", "final"} <= set(next(iter(metric_keys)))
    groups = {(t["victim"], t["gradient_source"], t["eps"]) for t in (_tags(r["data"]) for r in finals)}
    assert len(groups) == len(VICTIMS) * len(SOURCES) * len(EPS)
    names = sorted(r["info"]["run_name"] for r in finals)
    assert names[0] == "cc-digits-estimate-eps0.1-seed1" and names[-1] == "scan-digits-surrogate-eps0.2-seed2"


def test_the_sweep_links_its_shared_views(store):
    sweeps = _experiment(store, "sweeps")
    parent = _api(store, f"runs/get?run_id={store.parent}")["run"]
    keys = _tags(parent["data"])["ui.views"].split(",")
    assert len(keys) == 2
    for key in keys:
        state = json.loads(_tags(sweeps)[f"mlflow.sharedViewState.{key}"])
        assert store.parent in state["searchFilter"]
        assert f"viewStateShareKey={key}" in _tags(parent["data"])["mlflow.note.content"]


def _chromium():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver and importlib.util.find_spec("selenium")):
        # make installs all three (Debian chromium and chromium-driver, pip selenium): a missing one
        # is a broken set-up, as in tests/reports/test_browser.py, not a reason to skip.
        pytest.fail(
            f"headless Chromium is needed: chromium={chromium!r}, chromedriver={driver!r}, "
            f"selenium={'found' if importlib.util.find_spec('selenium') else 'missing'}"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1600,1000",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def _wait_for(browser, *texts: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        body = browser.find_element("tag name", "body").text
        if all(t in body for t in texts) or time.monotonic() > deadline:
            return body
        time.sleep(1.0)


def test_the_ui_shows_the_views_datasets_and_models_in_chromium(store):
    browser = _chromium()
    try:
        sweeps = _experiment(store, "sweeps")["experiment_id"]
        views = _api(store, f"runs/get?run_id={store.parent}")["run"]
        seeds_view = _tags(views["data"])["ui.views"].split(",")[0]
        browser.get(experiment_url(store.base, sweeps, seeds_view, charts=True))
        body = _wait_for(browser, "Group: victim-cc-digits", "Group: victim-scan-digits", "Parallel Coordinates")
        assert "Model training" in body and "Group: victim-scan-digits" in body and "Parallel Coordinates" in body
        run_id = store.seed_runs["ccsurf_00000"]
        browser.get(run_url(store.base, sweeps, run_id))
        digest = parquet_dataset(store.data_uri, "train").digest
        body = _wait_for(browser, f"digits.train ({digest})", "generator-cc-digits")
        assert f"digits.train ({digest})" in body and "generator-cc-digits" in body
    finally:
        browser.quit()
