"""Rows of the sweep's summary tables from Tune results: Table 1 (attack effect) and Table 2 (query complexity).

Pure functions over the trials' reported histories (``pandas`` frames as
``Result.metrics_dataframe`` gives them), so they are tested without Ray or MLflow.

The search picks, per eps value, the trial whose ``objective`` reached the lowest value
(:func:`best_per_eps`); its configuration is trained again with fresh seeds, and Table 1 and
Table 2 hold one row per (victim, gradient source, eps) with the mean and the spread
(sample standard deviation, ``<key>_std``) over those seed runs (:func:`seed_rows`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from clusterattack.attacks.config import AttackConfig
from clusterattack.attacks.counting import calls_of
from clusterattack.attacks.gan import ConvergenceTracker

__all__ = [
    "SCORE_KEYS",
    "TABLE1",
    "TABLE2",
    "TrialSummary",
    "best_per_eps",
    "convergence",
    "mean_std",
    "search_totals",
    "seed_rows",
]

TABLE1 = "table1_attack"
TABLE2 = "table2_queries"
#: Test-split scores of a final run, averaged over seeds in Table 1.
SCORE_KEYS = (
    "nmi_pre", "nmi_post", "ari_pre", "ari_post", "acc_pre", "acc_post",
    "nmi_drop", "ari_drop", "acc_drop", "changed_fraction", "linf_max", "l2_max",
    "largest_cluster_fraction_post",
)  # fmt: skip


class TrialSummary:
    """One trial's history (rows by epoch, first report of each epoch kept) and its config.

    ``final`` is the row a final run reported once its generator was chosen and scored
    (``final`` = 1), kept apart: it may share its epoch with the last training report.
    """

    def __init__(self, trial_id: str, config: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
        seen: dict[int, dict[str, Any]] = {}
        self.final: dict[str, Any] = {}
        for row in history:
            if _flag(row.get("final")):
                self.final = dict(row)
                continue
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
        if self.final:
            return self.final
        return self.history[-1] if self.history else {}

    @property
    def epochs(self) -> int:
        value = self.last.get("epoch", 0)
        return 0 if value is None or not math.isfinite(float(value)) else int(value)

    @property
    def image_queries(self) -> int:
        value = self.last.get("image_queries")
        return 0 if value is None or not math.isfinite(float(value)) else int(value)

    @property
    def best_objective(self) -> float | None:
        """The lowest ``objective`` any epoch reported (the epoch a trial keeps), None if none did."""
        values = [float(v) for r in self.history if (v := _value(r, "objective")) is not None]
        return min(values) if values else None


def _flag(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        return False


def best_per_eps(trials: Sequence[TrialSummary]) -> dict[float, TrialSummary]:
    """The best trial of each eps value: the lowest ``objective`` reached, never across eps.

    A trial that reported no objective (it failed before its first epoch) takes no part.
    Ties go to the trial that ran more epochs, then to the smaller trial id (stable).
    """
    groups: dict[float, list[TrialSummary]] = {}
    for trial in trials:
        if trial.best_objective is None:
            continue
        if "eps" not in trial.config:
            raise ValueError(f"trial {trial.trial_id} has no eps in its config {sorted(trial.config)}")
        groups.setdefault(float(trial.config["eps"]), []).append(trial)
    return {
        eps: min(group, key=lambda t: (t.best_objective, -t.epochs, t.trial_id))
        for eps, group in sorted(groups.items())
    }


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


def _temperature_used(scored: Sequence[TrialSummary], setting: float | str) -> float | None:
    """The MI term's temperature the seed runs trained with ("auto" resolved from the victim's
    clean memberships): one number, or None where none was reported or the seeds differ."""
    used = {_value(f.final, "mi_temperature_used") for f in scored} - {None}
    if setting != "auto" and not used:
        return float(setting)
    return used.pop() if len(used) == 1 else None


def _value(row: Mapping[str, Any], key: str) -> Any:
    value = row.get(key)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def mean_std(values: Sequence[Any]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of the finite values; std is None below two values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return None, None
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else None)


def search_totals(trials: Sequence[TrialSummary]) -> dict[str, int]:
    """What the search at one eps spent: trials, generator epochs and image-queries."""
    return {
        "search_trials": len(trials),
        "search_generator_epochs": sum(t.epochs for t in trials),
        "search_image_queries": sum(t.image_queries for t in trials),
    }


def seed_rows(
    *,
    model: str,
    dataset: str,
    victim_version: str | None,
    attack: AttackConfig,
    chosen: TrialSummary,
    victim: str | None = None,
    finals: Sequence[TrialSummary],
    objective: str,
    recipe: str,
    budget: int,
    search: Mapping[str, int],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Table 1 and Table 2 rows of one (victim, gradient source, eps): the mean over ``finals``.

    ``chosen`` is the search trial whose configuration the seed runs repeat; ``search`` its
    eps's :func:`search_totals`. Every row says how it was selected (``selection``).
    """
    cfg = attack.override(**chosen.config)
    scored = [f for f in finals if f.final]
    ident = {
        "model": model,
        "dataset": dataset,
        "victim": victim or f"victim-{model}-{dataset}",
        "victim_version": victim_version,
        "gradient_source": cfg.gradient_source,
        "norm": cfg.norm,
        "eps": cfg.eps,
        "selection": objective,
        "recipe": recipe,
    }
    seeds = sorted(int(attack.override(**f.config).seed) for f in scored)
    row1: dict[str, Any] = {
        **ident,
        "alpha_a": cfg.alpha_a,
        "alpha_c": cfg.alpha_c,
        "mi_temperature": _temperature_used(scored, cfg.mi_temperature),
        "attack_loss": cfg.attack_loss,
        "seeds": ",".join(map(str, seeds)),
        "n_seeds": len(scored),
    }
    for key in SCORE_KEYS:
        row1[key], row1[f"{key}_std"] = mean_std([_value(f.final, key) for f in scored])
    row1.update(
        best_trial=chosen.trial_id,
        search_objective=chosen.best_objective,
        final_trials=",".join(f.trial_id for f in scored),
    )
    queries = [f.image_queries for f in scored]
    row2: dict[str, Any] = {**ident, "seeds": row1["seeds"], "n_seeds": len(scored)}
    row2["image_queries"], row2["image_queries_std"] = mean_std(queries)
    row2["calls"], row2["calls_std"] = mean_std([_value(f.final, "calls") for f in scored])
    row2["calls_256"] = calls_of(None if row2["image_queries"] is None else math.ceil(row2["image_queries"]), 256)
    for key in ("selection_image_queries", "scoring_image_queries"):
        row2[key] = mean_std([_value(f.final, key) for f in scored])[0]
    row2["epochs_run"] = mean_std([f.epochs for f in scored])[0]
    points = [convergence(f, attack.override(**f.config)) for f in scored]
    converged = [p for p in points if p["converged_epoch"] is not None]
    row2["converged_seeds"] = len(converged)
    row2["image_queries_at_convergence"] = mean_std([p["image_queries_at_convergence"] for p in converged])[0]
    row2["calls_256_at_convergence"] = calls_of(
        None if row2["image_queries_at_convergence"] is None else math.ceil(row2["image_queries_at_convergence"]),
        256,
    )
    row2["budget"] = budget
    row2.update(search)
    row2["final_image_queries"] = sum(queries)
    # Everything the attacker asked to reach this row: its eps's search and its seed runs.
    row2["sweep_image_queries"] = int(search.get("search_image_queries", 0)) + sum(queries)
    return row1, row2
