"""Summary tables from trial histories: first report per epoch kept, convergence point, totals."""

from __future__ import annotations

import pytest

from clusterattack.attacks.config import AttackConfig
from clusterattack.tuning.summary import (
    TrialSummary,
    convergence,
    eps_tradeoff_rows,
    query_row,
    result_row,
    sweep_totals,
)


def _row(epoch, loss, queries, nmi_post=0.3):
    return {
        "epoch": epoch, "train.loss_g": loss, "image_queries": queries, "calls": epoch * 4,
        "nmi_pre": 0.6, "nmi_post": nmi_post, "ari_pre": 0.5, "ari_post": 0.2, "acc_pre": 0.7, "acc_post": 0.3,
        "nmi_drop": 0.5, "linf_mean": 0.1, "l2_mean": 1.2,
    }  # fmt: skip


def test_retried_epochs_keep_their_first_report_and_order():
    rows = [_row(1, 1.0, 100), _row(2, 0.5, 200), _row(2, 0.4, 260), _row(3, 0.45, 300)]
    trial = TrialSummary("t1", {"eps": 0.1}, rows)
    assert [r["epoch"] for r in trial.history] == [1, 2, 3]
    assert trial.history[1]["image_queries"] == 200
    assert trial.epochs == 3 and trial.image_queries == 300


def test_convergence_uses_the_attack_rule_and_reports_calls_of_256():
    attack = AttackConfig(converge_tol=0.01, converge_patience=2)
    rows = [_row(1, 1.0, 256), _row(2, 0.2, 512), _row(3, 0.2, 768), _row(4, 0.2, 1024), _row(5, 0.2, 1280)]
    point = convergence(TrialSummary("t", {}, rows), attack)
    assert point == {"converged_epoch": 4, "image_queries_at_convergence": 1024, "calls_256_at_convergence": 4}
    falling = [_row(e, 1.0 / e, 100 * e) for e in range(1, 4)]
    assert convergence(TrialSummary("t", {}, falling), attack)["converged_epoch"] is None


def test_rows_record_the_attack_its_scores_and_the_sweep_spend():
    attack = AttackConfig(gradient_source="surrogate", norm="linf", eps=0.1, seed=3)
    best = TrialSummary("best", {"alpha_a": 12.0, "eps": 0.15}, [_row(1, 1.0, 400), _row(2, 0.9, 500, 0.1)])
    other = TrialSummary("other", {"alpha_a": 2.0}, [_row(1, 1.0, 400, 0.5)])
    row1 = result_row("cc", "fashion_mnist", "3", best, attack, trials=2)
    assert row1["eps"] == pytest.approx(0.15) and row1["alpha_a"] == 12.0 and row1["seed"] == 3
    assert (row1["nmi_pre"], row1["nmi_post"]) == (0.6, 0.1)
    assert row1["victim"] == "victim-cc-fashion_mnist" and row1["victim_version"] == "3"
    row2 = query_row("cc", "fashion_mnist", best, attack, budget=10_000, all_trials=[best, other])
    assert row2["image_queries"] == 500 and row2["calls_256"] == 2 and row2["calls"] == 8
    assert row2["sweep_generator_epochs"] == 3 and row2["sweep_image_queries"] == 900
    assert sweep_totals([]) == {"sweep_trials": 0, "sweep_generator_epochs": 0, "sweep_image_queries": 0}


def test_eps_tradeoff_keeps_the_trials_no_smaller_eps_beats():
    attack = AttackConfig(eps=0.1, seed=1)

    def trial(name, eps, nmi_post, epochs=2):
        return TrialSummary(name, {"eps": eps, "alpha_a": 3.0}, [_row(e, 1.0, 100 * e, nmi_post) for e in range(1, epochs + 1)])

    trials = [
        trial("big", 0.2, 0.05),
        trial("small", 0.05, 0.50),
        trial("mid-worse", 0.12, 0.55),  # a larger eps that did worse than "small": dominated
        trial("mid", 0.1, 0.30, epochs=1),  # stopped early by ASHA, still on the front
        trial("tie", 0.1, 0.35),  # same eps as "mid", higher NMI: dominated
        TrialSummary("never-reported", {"eps": 0.01}, []),
    ]
    rows = eps_tradeoff_rows("cc", "fashion_mnist", trials, attack)
    assert [(r["trial"], r["eps"], r["nmi_post"]) for r in rows] == [
        ("small", 0.05, 0.50), ("mid", 0.1, 0.30), ("big", 0.2, 0.05),
    ]
    assert rows[1]["epochs_run"] == 1 and rows[1]["image_queries"] == 100
    assert all(r["seed"] == 1 and r["alpha_a"] == 3.0 and r["model"] == "cc" for r in rows)
    assert eps_tradeoff_rows("cc", "fashion_mnist", [], attack) == []
