"""Sweep progress gauges: what the Tune callback publishes, and what it refuses."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest

from clusterattack.tuning import metrics as tuning_metrics
from clusterattack.tuning.metrics import (
    TRIAL_STATUSES,
    SweepMetricsCallback,
    record_sweep_progress,
)


class FakeGauge:
    def __init__(self) -> None:
        self.values: dict[tuple, float] = {}

    def set(self, value, tags):
        self.values[tuple(sorted(tags.items()))] = value

    def get(self, **tags):
        return self.values.get(tuple(sorted(tags.items())))


@pytest.fixture
def gauges(monkeypatch):
    trials, best = FakeGauge(), FakeGauge()
    monkeypatch.setattr(tuning_metrics, "_gauges", lambda: (trials, best))
    return SimpleNamespace(trials=trials, best=best)


def trial(trial_id, status, **config):
    return SimpleNamespace(trial_id=trial_id, status=status, config=config)


TAGS = {"experiment": "exp", "model": "cc", "dataset": "cifar10"}


def test_record_publishes_every_status_and_the_best_drop(gauges):
    record_sweep_progress(**TAGS, trials_by_status={"RUNNING": 2, "terminated": 3}, best_nmi_drop=0.4)
    published = {s: gauges.trials.get(**TAGS, status=s) for s in TRIAL_STATUSES}
    assert published == {"pending": 0, "running": 2, "paused": 0, "terminated": 3, "error": 0}
    assert gauges.best.get(**TAGS) == 0.4


def test_record_without_a_drop_leaves_the_best_unset(gauges):
    record_sweep_progress(**TAGS, trials_by_status={})
    assert gauges.best.values == {}
    assert gauges.trials.get(**TAGS, status="pending") == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trials_by_status": {"finished": 1}}, "'finished'"),
        ({"trials_by_status": {"running": -1}}, "-1"),
        ({"trials_by_status": {"running": 1.5}}, "1.5"),
        ({"trials_by_status": {}, "best_nmi_drop": math.nan}, "nan"),
        ({"trials_by_status": {}, "model": ""}, "model"),
    ],
)
def test_record_rejects_bad_values_by_name(gauges, kwargs, message):
    with pytest.raises(ValueError, match=message):
        record_sweep_progress(**{**TAGS, **kwargs})


def test_callback_counts_trials_and_keeps_the_best_drop(gauges):
    callback = SweepMetricsCallback("exp", ("cc", "cifar10"))
    t1, t2, t3 = trial("a", "RUNNING"), trial("b", "RUNNING"), trial("c", "PENDING")
    trials = [t1, t2, t3]
    callback.on_trial_result(0, trials, t1, {"nmi_drop": 0.3})
    callback.on_trial_result(1, trials, t2, {"nmi_drop": 0.5})
    callback.on_trial_result(2, trials, t1, {"nmi_drop": 0.4})
    assert gauges.best.get(**TAGS) == 0.5
    t1.status, t2.status, t3.status = "TERMINATED", "ERROR", "RUNNING"
    callback.on_trial_error(3, trials, t2)
    assert gauges.trials.get(**TAGS, status="terminated") == 1
    assert gauges.trials.get(**TAGS, status="error") == 1
    assert gauges.trials.get(**TAGS, status="running") == 1
    assert gauges.trials.get(**TAGS, status="pending") == 0


def test_callback_ignores_a_diverged_result_with_a_warning(gauges, caplog):
    callback = SweepMetricsCallback("exp", ("cc", "cifar10"))
    t1 = trial("a", "RUNNING")
    callback.on_trial_result(0, [t1], t1, {"nmi_drop": 0.2})
    with caplog.at_level(logging.WARNING, logger="clusterattack.tuning.metrics"):
        callback.on_trial_result(1, [t1], t1, {"nmi_drop": float("nan")})
        callback.on_trial_result(2, [t1], t1, {"loss": 1.0})
    assert gauges.best.get(**TAGS) == 0.2
    assert "nmi_drop=nan" in caplog.text


def test_callback_tags_each_victim_from_the_trial_config(gauges):
    callback = SweepMetricsCallback("exp", lambda c: (c["model"], c["dataset"]))
    t1 = trial("a", "RUNNING", model="cc", dataset="cifar10")
    t2 = trial("b", "TERMINATED", model="scan", dataset="stl10")
    callback.on_trial_result(0, [t1, t2], t2, {"nmi_drop": 0.7})
    assert gauges.trials.get(**TAGS, status="running") == 1
    scan = {"experiment": "exp", "model": "scan", "dataset": "stl10"}
    assert gauges.trials.get(**scan, status="terminated") == 1
    assert gauges.best.get(**scan) == 0.7
    assert gauges.best.get(**TAGS) is None


def test_callback_names_a_trial_whose_victim_is_unknown(gauges):
    callback = SweepMetricsCallback("exp", lambda c: (c["model"], c["dataset"]))
    with pytest.raises(ValueError, match=r"trial x .*\['model'\]"):
        callback.on_trial_start(0, [trial("x", "PENDING", model="cc")], None)


def test_callback_step_end_is_throttled(gauges):
    callback = SweepMetricsCallback("exp", ("cc", "cifar10"), min_interval_s=3600)
    t1 = trial("a", "RUNNING")
    callback.on_trial_start(0, [t1], t1)
    t1.status = "TERMINATED"
    callback.on_step_end(1, [t1])
    assert gauges.trials.get(**TAGS, status="running") == 1
    callback.on_experiment_end([t1])
    assert gauges.trials.get(**TAGS, status="terminated") == 1
    assert gauges.trials.get(**TAGS, status="running") == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", ("cc", "cifar10")), "experiment"),
        (("exp", ("cc",)), r"\('cc',\)"),
        (("exp", ("cc", "")), "dataset"),
    ],
)
def test_callback_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        SweepMetricsCallback(*args)
