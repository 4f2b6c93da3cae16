"""Summary tables from trial histories: first report per epoch kept, best trial per eps, means over seeds."""

from __future__ import annotations

import statistics

import pytest

from clusterattack.attacks.config import AttackConfig
from clusterattack.tuning.summary import (
    TrialSummary,
    best_per_eps,
    convergence,
    mean_std,
    search_totals,
    seed_rows,
)


def _row(epoch, loss, queries, objective=0.5):
    return {"epoch": epoch, "train.loss_g": loss, "image_queries": queries, "calls": epoch * 4, "objective": objective}


def _final(epoch, queries, nmi_post, seed_queries_selection=100):
    return {
        "epoch": epoch, "final": 1, "image_queries": queries, "calls": epoch * 4 + 1,
        "nmi_pre": 0.6, "nmi_post": nmi_post, "ari_pre": 0.5, "ari_post": 0.2, "acc_pre": 0.7, "acc_post": 0.3,
        "nmi_drop": (0.6 - nmi_post) / 0.6, "linf_max": 0.1, "changed_fraction": 0.4,
        "selection_image_queries": seed_queries_selection, "scoring_image_queries": 512, "select_score": 0.2,
        "mi_temperature_used": 0.3,
    }  # fmt: skip


def test_retried_epochs_keep_their_first_report_and_the_final_row_is_kept_apart():
    rows = [_row(1, 1.0, 100), _row(2, 0.5, 200), _row(2, 0.4, 260), _row(3, 0.45, 300), _final(3, 310, 0.2)]
    trial = TrialSummary("t1", {"eps": 0.1}, rows)
    assert [r["epoch"] for r in trial.history] == [1, 2, 3]
    assert trial.history[1]["image_queries"] == 200
    # The scored row shares epoch 3 with the last training report; it is the trial's last word.
    assert trial.final["nmi_post"] == 0.2 and trial.last is trial.final
    assert trial.epochs == 3 and trial.image_queries == 310


def test_convergence_uses_the_attack_rule_and_reports_calls_of_256():
    attack = AttackConfig(converge_tol=0.01, converge_patience=2)
    rows = [_row(1, 1.0, 256), _row(2, 0.2, 512), _row(3, 0.2, 768), _row(4, 0.2, 1024), _row(5, 0.2, 1280)]
    point = convergence(TrialSummary("t", {}, rows), attack)
    assert point == {"converged_epoch": 4, "image_queries_at_convergence": 1024, "calls_256_at_convergence": 4}
    falling = [_row(e, 1.0 / e, 100 * e) for e in range(1, 4)]
    assert convergence(TrialSummary("t", {}, falling), attack)["converged_epoch"] is None


def test_the_best_trial_is_chosen_within_each_eps_and_never_across():
    def trial(name, eps, objectives):
        return TrialSummary(name, {"eps": eps, "alpha_a": 3.0}, [_row(e + 1, 1.0, 100, o) for e, o in enumerate(objectives)])

    trials = [
        trial("big", 0.2, [0.3, 0.05]),  # the lowest objective of all, at the larger eps
        trial("small-a", 0.1, [0.7, 0.6]),
        trial("small-b", 0.1, [0.5, 0.55]),  # its best epoch (0.5) beats small-a's last
        trial("small-stopped", 0.1, [0.9]),  # stopped early by ASHA, worse
        trial("big-worse", 0.2, [0.2, 0.25]),
        TrialSummary("never-reported", {"eps": 0.1}, []),
    ]
    best = best_per_eps(trials)
    assert list(best) == [0.1, 0.2]
    assert best[0.1].trial_id == "small-b" and best[0.1].best_objective == 0.5
    assert best[0.2].trial_id == "big"
    # Ties go to the trial that ran more epochs.
    tie = best_per_eps([trial("short", 0.1, [0.4]), trial("long", 0.1, [0.6, 0.4])])
    assert tie[0.1].trial_id == "long"
    with pytest.raises(ValueError, match="no eps"):
        best_per_eps([TrialSummary("x", {"alpha_a": 1.0}, [_row(1, 1.0, 10)])])


def test_seed_rows_give_mean_and_spread_over_seeds_and_the_search_spend():
    attack = AttackConfig(gradient_source="surrogate", norm="linf", seed=0, select_images=50)
    chosen = TrialSummary("search-3", {"eps": 0.1, "alpha_a": 12.0, "alpha_c": 0.5}, [_row(1, 1.0, 400, 0.3)])
    finals = [
        TrialSummary("f1", {"eps": 0.1, "alpha_a": 12.0, "alpha_c": 0.5, "seed": 1}, [_row(1, 1.0, 500), _final(1, 600, 0.2)]),
        TrialSummary("f2", {"eps": 0.1, "alpha_a": 12.0, "alpha_c": 0.5, "seed": 2}, [_row(1, 1.0, 500), _final(1, 610, 0.3)]),
    ]
    search = search_totals([chosen, TrialSummary("other", {"eps": 0.1}, [_row(1, 1.0, 350)])])
    assert search == {"search_trials": 2, "search_generator_epochs": 2, "search_image_queries": 750}
    row1, row2 = seed_rows(
        model="cc", dataset="fashion_mnist", victim_version="3", attack=attack, chosen=chosen, finals=finals,
        objective="label_free", recipe="default", budget=10_000, search=search,
    )  # fmt: skip
    assert row1["eps"] == pytest.approx(0.1) and row1["alpha_a"] == 12.0 and row1["selection"] == "label_free"
    assert row1["seeds"] == "1,2" and row1["n_seeds"] == 2 and row1["best_trial"] == "search-3"
    assert row1["nmi_post"] == pytest.approx(0.25) and row1["nmi_post_std"] == pytest.approx(statistics.stdev([0.2, 0.3]))
    assert row1["nmi_pre"] == pytest.approx(0.6) and row1["nmi_pre_std"] == pytest.approx(0.0)
    assert row1["victim"] == "victim-cc-fashion_mnist" and row1["victim_version"] == "3"
    # The config said "auto"; the row gives the temperature the seed runs trained with.
    assert attack.mi_temperature == "auto" and row1["mi_temperature"] == pytest.approx(0.3)
    assert row2["image_queries"] == pytest.approx(605) and row2["calls_256"] == 3
    assert row2["selection_image_queries"] == 100 and row2["scoring_image_queries"] == 512
    assert row2["search_image_queries"] == 750 and row2["final_image_queries"] == 1210
    assert row2["sweep_image_queries"] == 750 + 1210 and row2["budget"] == 10_000


def test_mean_std_skips_missing_values_and_has_no_spread_for_one():
    assert mean_std([0.2, None, float("nan"), 0.4]) == (pytest.approx(0.3), pytest.approx(0.1414, abs=1e-4))
    assert mean_std([0.5]) == (0.5, None)
    assert mean_std([]) == (None, None)


def test_the_temperature_column_is_what_the_seeds_trained_with_or_nothing():
    from clusterattack.tuning.summary import _temperature_used

    def seed(used):
        final = {**_final(1, 600, 0.2), "mi_temperature_used": used}
        if used is None:
            del final["mi_temperature_used"]
        return TrialSummary("f", {"eps": 0.1}, [_row(1, 1.0, 500), final])

    assert _temperature_used([seed(1.0), seed(1.0)], "auto") == 1.0
    # Seeds that resolved "auto" differently, or reported nothing: no number stands for them.
    assert _temperature_used([seed(0.3), seed(1.0)], "auto") is None
    assert _temperature_used([seed(None)], "auto") is None
    assert _temperature_used([seed(None)], 0.5) == 0.5  # a number given is the one used
