"""jobs/transfer.py and jobs/defend.py end to end on tiny CC victim files and the 8 x 8 digits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from clusterattack.tracking import client
from clusterattack.tracking.analyses import read_analysis
from clusterattack.victims.backbones import BackboneConfig
from clusterattack.victims.cc import CC, CCConfig
from clusterattack.victims.io import save_victim

JOBS = Path(__file__).resolve().parents[2] / "jobs"
TINY = ["--set", "generator_width=4", "--set", "generator_blocks=1", "--set", "discriminator_width=4"]


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def victim_files(tmp_path) -> list[Path]:
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = CC(CCConfig(10, (1, 8, 8), BackboneConfig("convnet", 1, 8, 4)))
        out.append(save_victim(model.eval(), tmp_path / f"cc{seed}.pt"))
    return out


def test_transfer_job_trains_missing_generators_and_logs(victim_files, tmp_path, mlflow_uri, capsys):
    args = [
        "matrix", "--dataset", "digits", "--victims", "p", "q",
        "--victim-file", f"p={victim_files[0]}", "--victim-file", f"q={victim_files[1]}",
        "--gradient-source", "whitebox", "--epochs", "1", "--train-limit", "64", "--test-limit", "100",
        "--eps", "0.2", "--no-ray", "--quiet", "--out", str(tmp_path / "gens"), *TINY,
    ]
    assert _job("transfer").main(args) == 0
    out = capsys.readouterr().out
    assert "NMI post" in out and "pre-attack" in out
    run_id = out.strip().splitlines()[-1].split()[2]
    payload = read_analysis(run_id, "transfer")
    assert payload["sources"] == ["p", "q"] and payload["test_images"] == 100
    gen = payload["generators"]["p"]
    assert Path(gen).is_file()
    trained_eps = payload["train_eps"]["p"]  # pca and detect apply a generator at its own bound

    pca = ["pca", "--dataset", "digits", "--victim", "p", "--generator", gen, "--images", "100", "--out", str(tmp_path / "pca")]
    assert _job("defend").main(pca) == 0
    out = capsys.readouterr().out
    p = read_analysis(_logged_run(out), "pca")
    assert (p["dataset"], p["victim"], p["generator"], p["images"]) == ("digits", "p", gen, 100)
    assert (p["norm"], p["eps"], p["gradient_source"]) == ("linf", trained_eps, "whitebox")
    variance = p["explained_variance"]
    assert len(variance) == 3 and 1 > variance[0] >= variance[1] >= variance[2] > 0 and sum(variance) < 1
    assert 0.4 <= p["overlap"] <= 1 and p["overlap_method"] == "knn15_cv5_accuracy"
    assert f"overlap (knn15_cv5_accuracy) {p['overlap']:.3f}" in out
    # The points file holds 100 clean and 100 adversarial points on the components the
    # record names: centred, with variances in the recorded proportions.
    points = np.load(tmp_path / "pca" / "points.npz")
    assert points["clean"].shape == points["adv"].shape == (100, 3)
    both = np.concatenate([points["clean"], points["adv"]]).astype(np.float64)
    np.testing.assert_allclose(both.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(both.var(0) / both.var(0)[0], np.array(variance) / variance[0], rtol=1e-3)
    run = client().get_run(_logged_run(out))
    assert run.data.tags["clusterattack.analysis"] == "pca" and run.data.tags["eps"] == f"{trained_eps:g}"
    assert run.data.metrics["overlap"] == pytest.approx(p["overlap"])
    logged = client().download_artifacts(run.info.run_id, "pca/points.npz", str(tmp_path / "dl"))
    np.testing.assert_array_equal(np.load(logged)["adv"], points["adv"])

    detect = [
        "detect", "--dataset", "digits", "--victim", "p", "--victim-file", str(victim_files[0]), "--generator", gen,
        "--images", "300", "--trials", "5", "--fit-images", "600", "--heldout-images", "300", "--quiet",
    ]
    assert _job("defend").main(detect) == 0
    out = capsys.readouterr().out
    d = read_analysis(_logged_run(out), "detection")
    assert (d["victim"], d["generator"], d["encoder"], d["clusters"], d["num_clusters"]) == ("p", gen, "p backbone", "kmeans", 10)
    assert (d["images"], d["trials"], d["fit_images"], d["heldout_images"], d["target_fpr"]) == (300, 5, 600, 300, 0.05)
    assert (d["norm"], d["eps"]) == ("linf", trained_eps) and 0 < d["linf_max"] <= trained_eps + 1e-6
    assert 0 <= d["detection_rate_mean"] <= 1 and d["fpr_mean"] <= 0.15  # threshold at 5 % of 300 held-out images
    assert d["detection_rate_mean"] == pytest.approx(d["flagged_adv_fraction"], abs=0.1)
    assert d["image_queries"] == payload["image_queries_by_source"]["p"] > 0
    assert f"detection rate {100 * d['detection_rate_mean']:.2f}%" in out
    assert f"FPR {100 * d['fpr_mean']:.2f}%" in out and "(target 5%, 300 images x 5 trials)" in out
    run = client().get_run(_logged_run(out))
    assert run.data.tags["clusterattack.analysis"] == "detection"
    for key in ("detection_rate_mean", "detection_rate_std", "fpr_mean", "fpr_std"):
        assert run.data.metrics[key] == pytest.approx(d[key])
    assert "figures/ssd_scores.png" in {f.path for f in client().list_artifacts(run.info.run_id, "figures")}


def _logged_run(printed: str) -> str:
    """The run id of a job's last line, ``MLflow run <id> (experiment analyses)``."""
    last = printed.strip().splitlines()[-1]
    assert last.startswith("MLflow run ") and last.endswith("(experiment analyses)"), last
    return last.split()[2]


def test_jobs_reject_bad_values_with_a_message(capsys):
    assert _job("transfer").main(["matrix", "--dataset", "digits", "--victims", "p", "--eps", "-1", "--no-mlflow"]) == 2
    assert "eps must be a positive number, got -1.0" in capsys.readouterr().err
    bad = ["detect", "--dataset", "digits", "--victim", "p", "--generator", "g.pt", "--target-fpr", "2", "--no-mlflow"]
    assert _job("defend").main(bad) == 2
    assert "target_fpr must lie in (0, 1), got 2.0" in capsys.readouterr().err
