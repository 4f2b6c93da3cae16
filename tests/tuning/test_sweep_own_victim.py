"""The main job on a model of one's own: a scikit-learn factory named by a victim spec, served and swept."""

from __future__ import annotations

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow

SPEC = "py:examples.sklearn_digits:build"


def test_a_victim_spec_is_served_and_swept_like_a_zoo_victim(ray_session, tmp_path, monkeypatch):
    import pandas as pd

    from clusterattack.tuning.config import SweepConfig
    from clusterattack.tuning.summary import TABLE1, TABLE2
    from clusterattack.tuning.sweep import run_sweep
    from tests.tuning.helpers import mlflow_client, sweep_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.setenv("CLUSTERATTACK_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    config = SweepConfig.preset(
        "tiny", targets=((SPEC, "digits"),), eps_grid=(0.2,), num_samples=1, seeds=1, experiment="own",
        storage=str(tmp_path / "sweeps"), data_dir=str(tmp_path / "data"), serve_port=free_port(),
    )  # fmt: skip
    outcome = run_sweep(config)
    table1 = pd.read_parquet(outcome.tables[TABLE1]["parquet"]).to_dict("records")
    table2 = pd.read_parquet(outcome.tables[TABLE2]["parquet"]).to_dict("records")
    (row,) = table1
    # Named by its spec, versioned by a digest of it; nothing was trained or registered for it.
    assert row["model"] == "sklearn_digits_build" and row["victim"] == SPEC
    assert row["victim_version"].startswith("sha256:")
    assert 0.0 <= row["nmi_post"] <= 1.0 and row["nmi_pre"] > 0.5  # the GMM clusters the digits
    assert table2[0]["image_queries"] > 0 and table2[0]["selection_image_queries"] > 0
    client = mlflow_client(tmp_path)
    assert not client.search_registered_models(filter_string="name LIKE 'victim-%'")
    _, children = sweep_runs(client, "own")
    assert {c.data.params["victim"] for c in children} == {SPEC}
    assert outcome.generators == {"sklearn_digits_build-digits-surrogate-eps0.2": "generator-sklearn_digits_build-digits/1"}


def test_a_decision_only_spec_is_refused_before_any_trial(tmp_path):
    from clusterattack.data import load_dataset
    from clusterattack.tuning.targets import own_victim

    with pytest.raises(ValueError, match="answers cluster ids only: the sweep's gradient sources need memberships"):
        own_victim("py:examples.sklearn_digits:build_labels", load_dataset("digits"))


def test_targets_take_specs_and_refuse_what_is_neither(tmp_path):
    from clusterattack.tuning.config import SweepConfig, target_name

    assert target_name("cc") == "cc" and target_name(SPEC) == "sklearn_digits_build"
    assert target_name("onnx:models/my model.onnx") == "my_model"
    with pytest.raises(ValueError, match="must be a zoo model"):
        SweepConfig.preset("tiny", targets=(("victim-cc-digits", "digits"),))
    with pytest.raises(ValueError, match="targets must not repeat"):
        SweepConfig.preset("tiny", targets=((SPEC, "digits"), ("examples/sklearn_digits.py:build", "digits")))


def test_trials_share_the_attackers_pretext_cache_of_the_driver(ray_session, tmp_path, monkeypatch):
    """Tune runs each trial in a working folder of its own: the attacker's backbones must still be
    cached where the driver's (relative) cache folder points, once per pool and seed, not per trial."""
    from clusterattack.tuning.config import SweepConfig
    from clusterattack.tuning.sweep import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.setenv("CLUSTERATTACK_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    monkeypatch.setenv("CLUSTERATTACK_CACHE_DIR", "attacker-cache")  # relative to the driver's folder
    monkeypatch.chdir(tmp_path)
    config = SweepConfig.preset(
        "tiny", targets=((SPEC, "digits"),), eps_grid=(0.2,), num_samples=2, seeds=1, experiment="cached",
        storage=str(tmp_path / "sweeps"), data_dir=str(tmp_path / "data"), serve_port=free_port(),
        **{"surrogate.arch": "pretext", "surrogate.ensemble": 1, "surrogate.pretext_epochs": 1},
    )  # fmt: skip
    outcome = run_sweep(config)
    assert not outcome.interrupted and len(outcome.table1) == 1
    # Two search trials share the search seed's backbone; the seed run has a seed of its own.
    seeds = {config.attack.seed, *config.final_seeds()}
    cached = sorted((tmp_path / "attacker-cache").glob("attacker-pretext-*.pt"))
    assert len(cached) == len(seeds) == 2, [p.name for p in cached]
