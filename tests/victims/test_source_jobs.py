"""Victim specs in the jobs: attack, serve, transfer and defend take any spec, and refuse bad ones."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = Path(__file__).resolve().parent / "own_models.py"
TINY = [
    "--epochs", "1", "--train-limit", "64", "--eval-limit", "64", "--threads", "1", "--no-mlflow", "--quiet",
    "--set", "surrogate.distill_queries=64", "--set", "surrogate.refresh_rounds=0", "--set", "surrogate.online=false",
    "--set", "surrogate.width=4", "--set", "generator_width=4", "--set", "generator_blocks=1",
    "--set", "discriminator_width=4",
]


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job_sources", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_attack_job_takes_a_python_factory(capsys):
    args = ["--victim", f"{MODELS}:good", "--dataset", "digits", "--eps", "0.1", *TINY]
    assert _job("attack").main(args) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("own_models.good | digits | surrogate | linf eps 0.1") and "NMI " in row


def test_attack_job_takes_a_decision_only_victim_on_the_surrogate_path(capsys):
    args = ["--victim", f"{MODELS}:labels_only", "--dataset", "digits", "--budget", "400", *TINY]
    assert _job("attack").main(args) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert "own_models.labels_only | digits | surrogate" in row and "NMI " in row


@pytest.mark.parametrize(
    ("victim", "extra", "fault"),
    [
        (f"{MODELS}:labels_only", ["--gradient-source", "estimate"], "decision-only .*'estimate'"),
        (f"{MODELS}:good", ["--gradient-source", "whitebox"], "no autograd graph"),
        (f"{MODELS}:missing", [], "has no attribute 'missing'"),
        (f"{MODELS}:no_predict", [], "without predict_proba"),
        (f"{MODELS}:unnormalised", [], "rows do not sum to 1"),
        (f"{MODELS}:wrong_shape", [], "takes images 1x28x28 .* has images 1x8x8"),
        ("py:no_such_module:build", [], "no module named 'no_such_module'"),
        ("onnx:nowhere.onnx", [], "no ONNX file"),
        ("http://127.0.0.1:9/cc", [], "API key is required"),
    ],
)
def test_attack_job_refuses_bad_specs_before_any_query(victim, extra, fault, capsys):
    assert _job("attack").main(["--victim", victim, "--dataset", "digits", *extra, *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    import re

    assert re.search(fault, err), err


def test_serve_job_names_apps_after_specs_and_checks_them_before_ray():
    serve = _job("serve")
    assert serve.parse_victim("py:examples.sklearn_digits:build") == (
        "sklearn_digits.build", "py:examples.sklearn_digits:build"
    )
    assert serve.parse_victim("gmm=py:examples.sklearn_digits:build?components=8") == (
        "gmm", "py:examples.sklearn_digits:build?components=8"
    )
    assert serve.parse_victim("py:examples.sklearn_digits:build?components=8")[0] == "sklearn_digits.build"
    assert serve.parse_victim("onnx:models/cc.onnx") == ("cc", "onnx:models/cc.onnx")
    with pytest.raises(argparse.ArgumentTypeError, match="takes no option"):
        serve.parse_victim("onnx:models/cc.onnx?colour=red")
    with pytest.raises(ValueError, match="serve it with --mode labels"):
        serve.resolve_sources({"l": f"{MODELS}:labels_only"}, mode="scores")
    with pytest.raises(ValueError, match="already served"):
        serve.resolve_sources({"s": "http://127.0.0.1:8000/cc"}, mode="scores")
    with pytest.raises(ValueError, match="takes images 1x8x8 .* has images 1x28x28"):
        serve.resolve_sources({"g": f"{MODELS}:good"}, mode="scores", dataset="mnist5k")
    sources = serve.resolve_sources({"g": f"{MODELS}:good", "l": f"{MODELS}:labels_only"}, mode="labels")
    from clusterattack.victims.sources import OneHotMemberships

    assert isinstance(sources["l"](), OneHotMemberships)  # the server answers its argmax: the ids
    assert serve.main(["--victim", f"{MODELS}:nope", "--key", "a:1"]) == 2


def test_transfer_and_defend_name_spec_victims():
    transfer = _job("transfer")
    names, files = transfer.named_victims(["cc", "mine=py:examples.sklearn_digits:build", f"{MODELS}:good"], [])
    assert names == ["cc", "mine", "own_models.good"]
    assert files == [("mine", "py:examples.sklearn_digits:build"), ("own_models.good", f"{MODELS}:good")]
    with pytest.raises(ValueError, match="decision-only .*'estimate'"):
        transfer.check_sources(["l"], [("l", f"{MODELS}:labels_only")], "digits", "estimate")
    transfer.check_sources(["l"], [("l", f"{MODELS}:labels_only")], "digits", "surrogate")

    defend = _job("defend")
    args = defend.parse_args(["retrain", "--dataset", "digits", "--victim", f"{MODELS}:good", "--generator", "g.pt"])
    defend.split_victim(args)
    assert (args.victim, args.victim_file) == ("own_models.good", f"{MODELS}:good")
    with pytest.raises(ValueError, match="retrains a model of this package"):
        defend.check_victim(args)
    args = defend.parse_args(["detect", "--dataset", "digits", "--victim", f"{MODELS}:good", "--generator", "g.pt"])
    defend.split_victim(args)
    with pytest.raises(ValueError, match="has no features\\(\\).* --encoder"):
        defend.check_victim(args)
    args = defend.parse_args(["detect", "--dataset", "digits", "--victim", f"{MODELS}:torch_victim",
                              "--encoder", "cc", "--generator", "g.pt"])
    defend.split_victim(args)
    assert defend.check_victim(args) is not None


@pytest.mark.slow
def test_served_python_factory_behind_keys_budgets_and_rate_limits(ray_session, tmp_path):
    """jobs/serve.py's path for a py: spec on Ray Serve: keys, budget, the model's answers."""
    import numpy as np
    import torch
    from ray import serve as ray_serve

    from clusterattack.serving import ServedVictim
    from clusterattack.serving.config import ServeConfig
    from clusterattack.serving.deployment import KeySpec, launch_victims
    from clusterattack.serving.errors import BudgetExceeded
    from clusterattack.serving.ledger_actor import LedgerConfig, kill_ledger
    from clusterattack.victims.sources import resolve_victim
    from tests.conftest import free_port

    serve = _job("serve")
    spec = "py:examples.sklearn_digits:build?components=8"
    sources = serve.resolve_sources({"gmm": spec}, mode="scores", dataset="digits")
    ledger = LedgerConfig(db_path=str(tmp_path / "ledger.sqlite"), actor_name="test-ledger-sources")
    config = ServeConfig(mode="scores", num_cpus=0.25, torch_threads=1, max_batch_size=64)
    launched = launch_victims(
        sources, config=config, ledger=ledger, port=free_port(), keys=[KeySpec("red", 100, rate_per_s=1000)]
    )
    try:
        key = next(k.api_key for k in launched.keys if k.name == "red")
        client = ServedVictim(launched.urls["gmm"], key)
        assert (client.num_clusters, client.input_shape) == (10, (1, 8, 8))
        x = torch.rand(60, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        local = resolve_victim(spec, dataset="digits")
        np.testing.assert_allclose(client.predict_proba(x).numpy(), local.predict_proba(x).numpy(), atol=1e-5)
        assert client.image_queries == 60
        with pytest.raises(BudgetExceeded):
            client.predict_proba(x)  # 60 more than the 40 left
        assert client.budget()["remaining"] == 40
    finally:
        ray_serve.shutdown()
        kill_ledger(ledger)
