"""jobs/transfer.py and jobs/defend.py end to end on tiny CC victim files and the 8 x 8 digits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

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

    pca = ["pca", "--dataset", "digits", "--victim", "p", "--generator", gen, "--images", "100", "--out", str(tmp_path / "pca")]
    assert _job("defend").main(pca) == 0
    assert "overlap (knn15_cv5_accuracy)" in capsys.readouterr().out

    detect = [
        "detect", "--dataset", "digits", "--victim", "p", "--victim-file", str(victim_files[0]), "--generator", gen,
        "--images", "300", "--trials", "5", "--fit-images", "600", "--heldout-images", "300", "--quiet",
    ]
    assert _job("defend").main(detect) == 0
    line = capsys.readouterr().out
    assert "detection rate" in line and "5 trials" in line


def test_jobs_reject_bad_values_with_a_message(capsys):
    assert _job("transfer").main(["matrix", "--dataset", "digits", "--victims", "p", "--eps", "-1", "--no-mlflow"]) == 2
    assert "eps must be a positive number, got -1.0" in capsys.readouterr().err
    bad = ["detect", "--dataset", "digits", "--victim", "p", "--generator", "g.pt", "--target-fpr", "2", "--no-mlflow"]
    assert _job("defend").main(bad) == 2
    assert "target_fpr must lie in (0, 1), got 2.0" in capsys.readouterr().err
