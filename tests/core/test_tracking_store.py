"""The local MLflow store helpers."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from clusterattack.tracking import store


def test_an_experiment_created_by_another_process_in_between_is_read_not_fatal(mlflow_uri, monkeypatch):
    # Two attacks started side by side both find "pilots" missing; the other one creates it
    # first. Force that interleaving: the lookup creates it behind our back once, then
    # answers "missing", so our create hits the store's unique constraint.
    real_lookup = mlflow.get_experiment_by_name
    raced = []

    def lookup(name):
        if not raced:
            raced.append(MlflowClient().create_experiment(name))
            return None
        return real_lookup(name)

    monkeypatch.setattr(mlflow, "get_experiment_by_name", lookup)
    assert store.ensure_experiment("pilots") == raced[0]
    assert store.ensure_experiment("pilots") == raced[0]


def test_a_failing_create_that_is_not_a_race_still_raises(mlflow_uri, monkeypatch):
    monkeypatch.setattr(mlflow, "get_experiment_by_name", lambda name: None)

    def refuse(name, artifact_location=None):
        raise mlflow.exceptions.MlflowException("store is read-only")

    monkeypatch.setattr(mlflow, "create_experiment", refuse)
    with pytest.raises(mlflow.exceptions.MlflowException, match="read-only"):
        store.ensure_experiment("pilots")
