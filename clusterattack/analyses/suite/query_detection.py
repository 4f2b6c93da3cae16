"""The sweep's ``query_detection`` analysis: what the stateful query detector saw of each of the sweep's keys.

When ``query_detection`` is among a sweep's analyses, its own deployments screen every query
in ``flag`` mode (:func:`clusterattack.tuning.targets.sweep_detection`): the Blacklight-style
detector of :mod:`clusterattack.serving.detector` fingerprints and records each image and
flags a key once ``flag_after`` of its last ``flag_window`` queries matched earlier ones,
while the answers stay unchanged, so the attack is the one the sweep would run without it.
After the seed runs the driver reads the detector's persisted state back
(:func:`read_detector_state`: its sqlite file beside the sweep's ledger, with the ledger's
charges) into the request; this analysis matches each search trial's and seed run's key
(``trial-<trial id>``) to its MLflow run and reports, per key: flagged or not, the query
that crossed the threshold (``queries_to_flag``), the first matching query, the matched
fraction, the images screened and those the ledger charged. Items: one per (model, data set,
gradient source), plus ``evaluator`` (the experimenter's scoring key, which re-asks the test
subset for every seed run) when the ledger has it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterattack.analyses.suite.rows import _group_provenance, _groups
from clusterattack.analyses.suite.task import _Loader, _Outcome

if TYPE_CHECKING:
    from clusterattack.analyses.suite.request import SweepAnalysisRequest

__all__ = ["TABLE", "keys_figure", "read_detector_state"]

#: Name of the per-key table (MLflow table, CSV and markdown files).
TABLE = "query_detection"
COLUMNS = (
    "item", "phase", "table_row", "eps", "seed", "trial_id", "run_id", "key_id", "queries", "ledger_image_queries",
    "matched", "matched_fraction", "first_match_query", "flagged", "queries_to_flag",
)  # fmt: skip
_PHASES = ("search", "final", "evaluator")


def read_detector_state(ledger_db_path: str | Path, config: Any) -> dict[str, Any] | None:
    """What the detector recorded of every attacker key of the ledger at ``ledger_db_path``, with the
    ledger's charges; None when the sweep's deployments ran without query detection (no file).

    ``config`` is the deployments' ``DetectionConfig``. Read in-process from the two sqlite
    files (the actors are gone by then): ``{"detector": its parameters, "keys": [...]}``, each
    key with ``name``, ``key_id``, ``queries`` (images screened), ``matched``,
    ``first_match_query``, ``flagged``, ``flag_query``, ``recent_matched``, ``reason``,
    ``ledger_image_queries`` and ``budget``.
    """
    from clusterattack.serving.detector_state import QueryDetector, detector_db_path
    from clusterattack.serving.ledger import BudgetLedger

    ledger_path = str(ledger_db_path)
    path = Path(detector_db_path(ledger_path))
    if not path.exists() or not Path(ledger_path).exists():
        return None
    detector = QueryDetector(str(path), ledger_path, config)
    try:
        seen = detector.list_keys()
    finally:
        detector.close()
    ledger = BudgetLedger(ledger_path)
    try:
        charged = {s.key_id: s for s in ledger.list_keys()}
    finally:
        ledger.close()
    keys = []
    for s in seen:
        status = charged.get(s.key_id)
        keys.append({
            "name": s.name, "key_id": s.key_id, "queries": int(s.queries), "matched": int(s.matched),
            "first_match_query": s.first_match_query, "flagged": bool(s.flagged), "flag_query": s.flag_query,
            "recent_matched": int(s.recent_matched), "reason": s.reason,
            "ledger_image_queries": None if status is None else int(status.used),
            "budget": None if status is None else int(status.budget_total),
        })  # fmt: skip
    parameters = {
        "policy": config.policy, "match_fraction": config.match_fraction, "min_shared": config.min_shared,
        "flag_after": config.flag_after, "flag_window": config.flag_window, "history": config.history,
        **config.spec().public(),
    }  # fmt: skip
    return {"detector": parameters, "keys": keys}


def _record(item: str, phase: str, key: Mapping[str, Any], run: Mapping[str, Any] | None) -> dict[str, Any]:
    tags = (run or {}).get("tags", {})
    queries = int(key["queries"])
    flagged = bool(key["flagged"])
    return {
        "item": item, "phase": phase, "table_row": tags.get("table_row"),
        "eps": float(tags["eps"]) if tags.get("eps") else None, "seed": tags.get("seed"),
        "trial_id": (run or {}).get("trial_id"), "run_id": (run or {}).get("run_id"), "key_id": key["key_id"],
        "queries": queries, "ledger_image_queries": key.get("ledger_image_queries"), "matched": int(key["matched"]),
        "matched_fraction": int(key["matched"]) / queries if queries else None,
        "first_match_query": key.get("first_match_query"), "flagged": flagged,
        "queries_to_flag": key.get("flag_query") if flagged else None,
    }  # fmt: skip


def _order(record: Mapping[str, Any]) -> tuple:
    """Search trials, then seed runs, each by eps, seed and trial id."""
    phase = _PHASES.index(record["phase"]) if record["phase"] in _PHASES else len(_PHASES)
    return phase, record["eps"] or 0.0, str(record["seed"]), str(record["trial_id"])


def _summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts over keys: how many were flagged (per phase too), after how many queries, matching how much."""
    flagged = [r for r in records if r["flagged"]]
    fractions = [r["matched_fraction"] for r in records if r["matched_fraction"] is not None]
    out: dict[str, Any] = {
        "keys": len(records),
        "flagged_keys": len(flagged),
        "flagged_fraction": len(flagged) / len(records) if records else None,
        "queries": sum(int(r["queries"]) for r in records),
        "queries_to_flag_median": statistics.median(r["queries_to_flag"] for r in flagged) if flagged else None,
        "queries_to_flag_min": min(r["queries_to_flag"] for r in flagged) if flagged else None,
        "matched_fraction_mean": statistics.fmean(fractions) if fractions else None,
    }
    for phase in _PHASES:
        mine = [r for r in records if r["phase"] == phase]
        if mine:
            out[f"{phase}.keys"] = len(mine)
            out[f"{phase}.flagged_keys"] = sum(bool(r["flagged"]) for r in mine)
    return out


def keys_figure(records: Sequence[Mapping[str, Any]], flag_after: int, flag_window: int) -> Any:
    """Each key's matched fraction against the images it sent (log scale); flagged keys in red."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.4), layout="constrained")
    ax = fig.add_subplot()
    markers = {"search": "o", "final": "s", "evaluator": "D"}
    for phase in _PHASES:
        for flagged, colour in ((False, "tab:blue"), (True, "tab:red")):
            mine = [r for r in records if r["phase"] == phase and bool(r["flagged"]) == flagged and r["queries"]]
            if mine:
                ax.scatter(
                    [r["queries"] for r in mine], [r["matched_fraction"] for r in mine], c=colour,
                    marker=markers[phase], s=28, label=f"{phase}, {'flagged' if flagged else 'not flagged'}",
                )  # fmt: skip
    ax.axhline(flag_after / flag_window, color="grey", ls="--", lw=1)
    ax.annotate(
        f"flag rate: {flag_after} of the last {flag_window}", (0.01, flag_after / flag_window), xycoords=("axes fraction", "data"),
        fontsize=7, color="grey", va="bottom",
    )  # fmt: skip
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("image-queries screened (per key)")
    ax.set_ylabel("matched fraction")
    ax.set_title("Query detection (flag mode) on the sweep's keys", fontsize=9)
    if ax.collections:
        ax.legend(fontsize=7, loc="best")
    return fig


def _write_tables(records: Sequence[Mapping[str, Any]], work: Path, out: _Outcome) -> None:
    """The per-key table as CSV and markdown artifacts (the MLflow table comes from ``out.tables``)."""
    import csv

    folder = work / TABLE
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / "keys.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: r.get(c) for c in COLUMNS} for r in records)

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3f}" if math.isfinite(value) else ""
        return str(value)

    shown = [c for c in COLUMNS if c not in ("run_id", "key_id")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in shown) + " |" for r in records]
    md_path = folder / "keys.md"
    md_path.write_text("\n".join(lines) + "\n")
    out.files[f"{TABLE}/keys.csv"] = str(csv_path)
    out.files[f"{TABLE}/keys.md"] = str(md_path)


def _query_detection(request: SweepAnalysisRequest, loader: _Loader, work: Path, out: _Outcome) -> None:
    from clusterattack.tracking.analyses import registered_generator_info, sweep_trial_runs
    from clusterattack.tuning.sweep import EVALUATOR_KEY_NAME
    from clusterattack.tuning.trainable import trial_key_name

    state = request.detector
    if not state:
        raise ValueError(
            "no query-detector state: the sweep's deployments screened nothing. Ask for query_detection when "
            "the sweep starts (jobs/sweep.py --analyses ...,query_detection): its deployments then run the "
            "detector in flag mode; a finished sweep that ran without it has nothing to read back"
        )
    parameters = dict(state["detector"])
    keys = {str(k["name"]): dict(k) for k in state["keys"]}
    trial_runs = sweep_trial_runs(request.parent_run_id)
    records: list[dict[str, Any]] = []
    used: set[str] = set()

    for (model, dataset, source), rows in _groups(request.rows, "model", "dataset", "gradient_source").items():
        key = f"{model}-{dataset}-{source}"

        def item(rows: list = rows, key: str = key, target: tuple = (model, dataset, source)) -> None:
            runs = [
                r for r in trial_runs
                if (r["tags"].get("model"), r["tags"].get("dataset"), r["tags"].get("gradient_source")) == target
            ]  # fmt: skip
            if not runs:
                raise ValueError(f"no search trial or seed run of {key} under sweep run {request.parent_run_id}")
            missing = [r["trial_id"] for r in runs if trial_key_name(r["trial_id"]) not in keys]
            if missing:
                raise ValueError(
                    f"the ledger has no key of trial(s) {missing} of {key}: the detector state read back is not "
                    "this sweep's (another sweep folder?)"
                )
            mine = [_record(key, str(r["tags"].get("phase")), keys[trial_key_name(r["trial_id"])], r) for r in runs]
            mine.sort(key=_order)
            used.update(trial_key_name(r["trial_id"]) for r in runs)
            summary = _summary(mine)
            generators = {}
            for row in rows:
                name, _, version = str(row["generator"]).partition("/")
                generators[str(row["generator"])] = registered_generator_info(name, version or None)["run_id"]
            out.add(key, {**summary, "detector": parameters, "rows": mine}, _group_provenance(rows, generators))
            records.extend(mine)
            out.tables.setdefault(TABLE, []).extend(mine)
            for name in ("flagged_fraction", "queries_to_flag_median", "matched_fraction_mean", "keys", "flagged_keys",
                         "search.flagged_keys", "final.flagged_keys"):  # fmt: skip
                if summary.get(name) is not None:
                    out.metrics[f"{key}.{name}"] = float(summary[name])

        out.attempt(key, item)

    if EVALUATOR_KEY_NAME in keys:

        def evaluator() -> None:
            mine = [_record("evaluator", "evaluator", keys[EVALUATOR_KEY_NAME], None)]
            out.add("evaluator", {**_summary(mine), "detector": parameters, "rows": mine}, {"key": EVALUATOR_KEY_NAME})
            records.extend(mine)
            out.tables.setdefault(TABLE, []).extend(mine)
            out.metrics["evaluator.flagged"] = float(mine[0]["flagged"])

        out.attempt("evaluator", evaluator)
    used.add(EVALUATOR_KEY_NAME)

    if records:
        attack = [r for r in records if r["phase"] != "evaluator"]
        for name, value in _summary(attack).items():
            if value is not None and "." not in name:
                out.metrics[name] = float(value)
        out.metrics["unmatched_keys"] = float(len(set(keys) - used))
        out.figures["keys"] = keys_figure(records, int(parameters["flag_after"]), int(parameters["flag_window"]))
        _write_tables(records, work, out)
