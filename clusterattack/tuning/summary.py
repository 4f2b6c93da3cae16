"""Rows of the sweep's summary tables from Tune results: Table 1 (attack effect) and Table 2 (query complexity).

Pure functions over the trials' reported histories (``pandas`` frames as
``Result.metrics_dataframe`` gives them), so they are tested without Ray or MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from clusterattack.attacks.config import AttackConfig
from clusterattack.attacks.counting import calls_of
from clusterattack.attacks.gan import ConvergenceTracker

__all__ = [
    "TABLE1",
    "TABLE2",
    "TABLE3",
    "TrialSummary",
    "convergence",
    "eps_tradeoff_rows",
    "query_row",
    "result_row",
    "sweep_totals",
]

TABLE1 = "table1_attack"
TABLE2 = "table2_queries"
TABLE3 = "table3_eps_tradeoff"


class TrialSummary:
    """One trial's history (rows by epoch, first report of each epoch kept) and its config."""

    def __init__(self, trial_id: str, config: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
        seen: dict[int, dict[str, Any]] = {}
        for row in history:
            epoch = row.get("epoch")
            if epoch is None or (isinstance(epoch, float) and math.isnan(epoch)):
                continue
            seen.setdefault(int(epoch), dict(row))
        self.trial_id = trial_id
        self.config = dict(config)
        self.history = [seen[e] for e in sorted(seen)]

    @classmethod
    def from_frame(cls, trial_id: str, config: Mapping[str, Any], frame: Any) -> TrialSummary:
        """From ``Result.metrics_dataframe`` (None or empty: no history)."""
        rows = [] if frame is None or len(frame) == 0 else frame.to_dict("records")
        return cls(trial_id, config, rows)

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    @property
    def epochs(self) -> int:
        return int(self.last.get("epoch", 0))

    @property
    def image_queries(self) -> int:
        value = self.last.get("image_queries")
        return 0 if value is None or not math.isfinite(float(value)) else int(value)


def convergence(trial: TrialSummary, attack: AttackConfig) -> dict[str, Any]:
    """When the generator loss converged (the paper's query-complexity point), by ``attack``'s rule.

    Returns ``converged_epoch``, ``image_queries_at_convergence`` and
    ``calls_256_at_convergence`` (None when the loss had not converged by the last epoch).
    """
    tracker = ConvergenceTracker(attack.converge_tol, attack.converge_patience)
    for row in trial.history:
        loss = row.get("train.loss_g")
        if loss is None:
            continue
        if tracker.update(int(row["epoch"]), float(loss)):
            used = int(row.get("image_queries", 0))
            return {
                "converged_epoch": int(row["epoch"]),
                "image_queries_at_convergence": used,
                "calls_256_at_convergence": calls_of(used, 256),
            }
    return {"converged_epoch": None, "image_queries_at_convergence": None, "calls_256_at_convergence": None}


def _value(row: Mapping[str, Any], key: str) -> Any:
    value = row.get(key)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def result_row(
    model: str,
    dataset: str,
    victim_version: str | None,
    best: TrialSummary,
    attack: AttackConfig,
    trials: int,
) -> dict[str, Any]:
    """Table 1 row: the best trial's pre/post NMI, ARI, ACC and what attack it was."""
    cfg = attack.override(**best.config)
    last = best.last
    row: dict[str, Any] = {
        "model": model,
        "dataset": dataset,
        "victim": f"victim-{model}-{dataset}",
        "victim_version": victim_version,
        "gradient_source": cfg.gradient_source,
        "norm": cfg.norm,
        "eps": cfg.eps,
        "alpha_a": cfg.alpha_a,
        "alpha_c": cfg.alpha_c,
        "attack_loss": cfg.attack_loss,
        "seed": cfg.seed,
    }
    for key in ("nmi", "ari", "acc"):
        row[f"{key}_pre"] = _value(last, f"{key}_pre")
        row[f"{key}_post"] = _value(last, f"{key}_post")
    for key in ("nmi_drop", "ari_drop", "acc_drop", "linf_mean", "l2_mean", "changed_fraction"):
        row[key] = _value(last, key)
    row.update(best_trial=best.trial_id, epochs_run=best.epochs, trials=trials)
    return row


def query_row(
    model: str,
    dataset: str,
    best: TrialSummary,
    attack: AttackConfig,
    budget: int,
    all_trials: Sequence[TrialSummary],
) -> dict[str, Any]:
    """Table 2 row: image-queries and calls of the best trial, at the end and at convergence."""
    cfg = attack.override(**best.config)
    last = best.last
    return {
        "model": model,
        "dataset": dataset,
        "victim": f"victim-{model}-{dataset}",
        "gradient_source": cfg.gradient_source,
        "norm": cfg.norm,
        "eps": cfg.eps,
        "seed": cfg.seed,
        "best_trial": best.trial_id,
        "image_queries": best.image_queries,
        "calls": int(last.get("calls", 0) or 0),
        "calls_256": calls_of(best.image_queries, 256),
        "epochs_run": best.epochs,
        **convergence(best, attack),
        "budget": budget,
        **sweep_totals(all_trials),
    }


def sweep_totals(trials: Sequence[TrialSummary]) -> dict[str, int]:
    """What a whole target's sweep spent: trials, generator epochs and image-queries."""
    return {
        "sweep_trials": len(trials),
        "sweep_generator_epochs": sum(t.epochs for t in trials),
        "sweep_image_queries": sum(t.image_queries for t in trials),
    }


def eps_tradeoff_rows(
    model: str, dataset: str, trials: Sequence[TrialSummary], attack: AttackConfig
) -> list[dict[str, Any]]:
    """The trials no other trial beats with a perturbation as small: post-attack NMI against eps.

    Table 1's best trial is the lowest post-attack NMI, which a larger eps nearly always
    wins; this front says what each smaller budget bought. Sorted by eps; a trial stays
    when its NMI after the attack is below that of every trial with an eps no larger
    (ties in eps keep the lower NMI). Trials ASHA stopped early count with the epochs they
    ran (``epochs_run`` says how many).
    """
    points = []
    for trial in trials:
        nmi_post = _value(trial.last, "nmi_post")
        if nmi_post is None:
            continue
        cfg = attack.override(**trial.config)
        points.append((cfg.eps, float(nmi_post), trial, cfg))
    points.sort(key=lambda p: (p[0], p[1]))
    rows: list[dict[str, Any]] = []
    best_so_far = math.inf
    for eps, nmi_post, trial, cfg in points:
        if nmi_post >= best_so_far:
            continue
        best_so_far = nmi_post
        last = trial.last
        rows.append(
            {
                "model": model,
                "dataset": dataset,
                "gradient_source": cfg.gradient_source,
                "norm": cfg.norm,
                "eps": eps,
                "alpha_a": cfg.alpha_a,
                "alpha_c": cfg.alpha_c,
                "seed": cfg.seed,
                "nmi_pre": _value(last, "nmi_pre"),
                "nmi_post": nmi_post,
                "nmi_drop": _value(last, "nmi_drop"),
                "epochs_run": trial.epochs,
                "image_queries": trial.image_queries,
                "trial": trial.trial_id,
            }
        )
    return rows
