"""jobs/attack.py end to end on a tiny local victim file and the 8 x 8 digits, logged to MLflow."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from clusterattack.attacks.io import load_generator
from clusterattack.victims.backbones import BackboneConfig
from clusterattack.victims.cc import CC, CCConfig
from clusterattack.victims.io import save_victim

JOB = Path(__file__).resolve().parents[2] / "jobs" / "attack.py"


def _job():
    spec = importlib.util.spec_from_file_location("attack_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def victim_file(tmp_path) -> Path:
    torch.manual_seed(0)
    model = CC(CCConfig(10, (1, 8, 8), BackboneConfig("convnet", 1, 8, 4)))
    return save_victim(model.eval(), tmp_path / "cc-digits.pt")


@pytest.mark.slow
def test_job_runs_one_attack_and_records_it(victim_file, tmp_path, mlflow_uri, capsys):
    out = tmp_path / "out"
    code = _job().main(
        [
            "--victim", str(victim_file), "--dataset", "digits", "--gradient-source", "estimate",
            "--eps", "0.1", "--epochs", "1", "--train-limit", "128", "--seed", "1", "--quiet",
            "--budget", "100000", "--out", str(out), "--threads", "1",
            "--set", "generator_width=4", "--set", "estimator.samples=1",
        ]
    )
    assert code == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert "| estimate | linf eps 0.1 |" in row and "image-queries" in row
    record = json.loads((out / "record.json").read_text())
    assert record["victim"] == "cc" and record["dataset"] == "digits" and record["seed"] == 1
    assert record["image_queries"] == 128 + 128 * 3  # clean memberships + (1 + 2q) per image
    assert record["linf_max"] <= 0.1 + 1e-6
    assert {"confusion_pre.png", "confusion_post.png", "cluster_sizes.png"} <= {p.name for p in out.iterdir()}
    generator, config, extra = load_generator(out / "generator.pt")
    assert config.gradient_source == "estimate" and extra["victim"] == "cc"
    assert generator(torch.rand(2, 1, 8, 8)).shape == (2, 1, 8, 8)

    from clusterattack.tracking import client
    from clusterattack.tracking.attacks import download_generator

    runs = client().search_runs([client().get_experiment_by_name("attacks").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["gradient_source"] == "estimate" and run.data.tags["victim"] == "cc"
    assert run.data.metrics["image_queries"] == record["image_queries"]
    assert run.data.params["eps"] == "0.1"
    assert load_generator(download_generator(run.info.run_id, tmp_path / "dl"))[1] == config


def test_job_rejects_a_bad_config_with_a_message(victim_file, capsys):
    assert _job().main(["--victim", str(victim_file), "--dataset", "digits", "--eps", "-1", "--no-mlflow"]) == 2
    assert "eps must be > 0, got -1.0" in capsys.readouterr().err
