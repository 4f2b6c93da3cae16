"""GroupedASHA: rungs compare a trial only with trials of its own eps."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from clusterattack.tuning.schedulers import GroupedASHA


def _trial(trial_id: str, eps: float) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"eps": eps, "alpha_a": 1.0})


def _play(scheduler, results):
    """Feed (trial, epoch, objective) results in order; the trials each decision stopped."""
    scheduler.set_search_properties("objective", "min")
    stopped = []
    for trial in {t.trial_id: t for t, _, _ in results}.values():
        scheduler.on_trial_add(None, trial)
    for trial, epoch, objective in results:
        action = scheduler.on_trial_result(None, trial, {"epoch": epoch, "objective": objective})
        if action == TrialScheduler.STOP:
            stopped.append(trial.trial_id)
    return stopped


# A larger eps nearly always reaches a lower objective: the small-eps trials all score worse
# than every large-eps trial at the first rung (epoch 1).
BIG = [_trial(f"big{i}", 0.2) for i in range(3)]
SMALL = [_trial(f"small{i}", 0.05) for i in range(3)]
RESULTS = [(t, 1, 0.10 + 0.01 * i) for i, t in enumerate(BIG)] + [(t, 1, 0.60 + 0.01 * i) for i, t in enumerate(SMALL)]
ASHA = {"time_attr": "epoch", "max_t": 4, "grace_period": 1, "reduction_factor": 2.0}


def test_one_asha_over_every_eps_stops_all_small_eps_trials():
    # What the sweep must not do: the first rung compares 0.05 with 0.2 and drops all of 0.05.
    stopped = _play(AsyncHyperBandScheduler(**ASHA), RESULTS)
    assert {"small0", "small1", "small2"} <= set(stopped)


def test_grouped_asha_keeps_the_best_trial_of_each_eps_going():
    scheduler = GroupedASHA("eps", **ASHA)
    stopped = _play(scheduler, RESULTS)
    # Within each eps, the first trial at a rung always goes on; later, worse ones may stop.
    assert "small0" not in stopped and "big0" not in stopped
    assert {"small2", "big2"} <= set(stopped)
    assert set(scheduler.groups) == {0.05, 0.2}
    # A trial at its max_t stops whatever its group.
    assert scheduler.on_trial_result(None, SMALL[0], {"epoch": 4, "objective": 0.6}) == TrialScheduler.STOP
    scheduler.on_trial_complete(None, SMALL[0], {"epoch": 4, "objective": 0.6})
    assert "eps=0.05" in scheduler.debug_string()


def test_grouped_asha_checks_its_settings_and_trials():
    with pytest.raises(AssertionError, match="grace_period"):
        GroupedASHA("eps", time_attr="epoch", max_t=2, grace_period=3)
    with pytest.raises(ValueError, match="config key"):
        GroupedASHA("", time_attr="epoch")
    scheduler = GroupedASHA("eps", **ASHA)
    scheduler.set_search_properties("objective", "min")
    with pytest.raises(ValueError, match="has no 'eps'"):
        scheduler.on_trial_add(None, SimpleNamespace(trial_id="x", config={"alpha_a": 1.0}))
