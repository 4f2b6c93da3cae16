"""Budget exhaustion ends a run cleanly, with its partial results kept."""

from __future__ import annotations

import pytest

from clusterattack.attacks import CountingVictim, run_attack, train_generator
from clusterattack.serving.errors import BudgetExceeded


def test_counting_victim_refuses_a_call_over_budget_without_charging_it(victim, blobs):
    counted = CountingVictim(victim, budget=100)
    counted.predict_proba(blobs[0][:60])
    with pytest.raises(BudgetExceeded) as info:
        counted.predict_proba(blobs[0][:60])
    assert info.value.remaining == 40 and info.value.requested == 60
    assert (counted.image_queries, counted.calls) == (60, 1)


@pytest.mark.parametrize("source", ["estimate", "surrogate"])
def test_budget_exhaustion_ends_training_with_partial_results(victim, blobs, source, config):
    # Enough for the clean memberships and part of training, not for all of it.
    budget = 320 + 1500 if source == "estimate" else 320 + 30
    counted = CountingVictim(victim, budget=budget)
    cfg = config(gradient_source=source, epochs=6)
    result = train_generator(counted, blobs[0], cfg, progress=False)
    assert result.stopped == "budget_exhausted"
    assert "budget" in result.error
    assert 0 < result.image_queries <= budget
    assert result.image_queries == counted.image_queries and result.calls == counted.calls
    assert result.epochs_run < cfg.epochs
    summary = result.summary()
    assert summary["stopped"] == "budget_exhausted" and summary["calls_256"] >= 1


def test_a_run_cut_short_is_still_evaluated_with_another_handle(victim, blobs, config, mlflow_uri):
    train, test, labels, _ = blobs
    counted = CountingVictim(victim, budget=320 + 2 * 1600 + 500)  # runs out in the third epoch
    report = run_attack(
        counted, train, test, labels, config(gradient_source="estimate", epochs=6),
        victim_name="linear", dataset="blobs", eval_victim=CountingVictim(victim), progress=False,
    )
    assert report.result.stopped == "budget_exhausted"
    assert report.evaluation is not None and report.evaluation["n_images"] == test.shape[0]
    assert "budget_exhausted" in report.table_row()

    # ... and recorded as such: the partial epochs, the queries spent, why it stopped.
    from clusterattack.tracking import client
    from clusterattack.tracking.attacks import log_attack_report

    run = client().get_run(log_attack_report(report))
    assert run.data.tags["stopped"] == "budget_exhausted" and run.info.status == "FINISHED"
    assert run.data.metrics["image_queries"] == report.result.image_queries
    steps = [m.step for m in client().get_metric_history(run.info.run_id, "train.loss_g")]
    assert report.result.epochs_run >= 1 and steps == list(range(1, report.result.epochs_run + 1))


def test_budget_spent_before_evaluation_is_reported_not_raised(victim, blobs, config):
    train, test, labels, _ = blobs
    counted = CountingVictim(victim, budget=320 + 200)
    report = run_attack(
        counted, train, test, labels, config(gradient_source="surrogate", epochs=1),
        victim_name="linear", dataset="blobs", progress=False,
    )
    assert report.evaluation is None
    assert "budget exhausted during evaluation" in report.evaluation_error
    assert report.record()["stopped"] in ("completed", "budget_exhausted")
