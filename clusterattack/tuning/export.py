"""A finished sweep's Tables 1 and 2 as a results record (``docs/results/<name>.json``).

One record row per Table 1 row (victim, gradient source, eps), with its Table 2 counts and the
provenance the evaluation protocol asks of a figure: the command, the code commit, the victim
version, the data set and split sizes, the recipe, the selection objective, eps and norm, the
seeds, image-queries and calls, the wall time, the machine and the date. Metrics are the mean,
standard deviation and count over the row's seed runs.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["SCORE_METRICS", "completed_outcome", "export_sweep_record", "sweep_record_rows"]

#: Table 1 scores kept in a record (mean and std over seeds).
SCORE_METRICS = (
    "nmi_pre", "nmi_post", "nmi_drop", "ari_pre", "ari_post", "acc_pre", "acc_post", "changed_fraction", "linf_max",
)  # fmt: skip


def _stat(row: dict[str, Any], key: str, n: int) -> dict[str, float | int] | None:
    mean = row.get(key)
    if mean is None or not math.isfinite(float(mean)):
        return None
    std = row.get(f"{key}_std")
    std = 0.0 if std is None or not math.isfinite(float(std)) else float(std)
    return {"mean": float(mean), "std": std, "n": n}


def sweep_record_rows(outcome: Any) -> list[dict[str, Any]]:
    """Record rows of a finished sweep (``SweepOutcome``): Table 1 joined with Table 2."""
    queries = {
        (r["model"], r["dataset"], r["gradient_source"], float(r["eps"])): r for r in outcome.table2
    }
    config = outcome.config
    rows = []
    for row in outcome.table1:
        counts = queries[(row["model"], row["dataset"], row["gradient_source"], float(row["eps"]))]
        n = int(row["n_seeds"])
        metrics = {k: v for k in SCORE_METRICS if (v := _stat(row, k, n)) is not None}
        for key in ("selection_image_queries", "scoring_image_queries"):
            if (value := _stat(counts, key, n)) is not None:
                metrics[key] = value
        for key in ("search_image_queries", "sweep_image_queries"):
            if counts.get(key) is not None:
                # One count over the whole search of this eps, not a spread over seeds.
                metrics[key] = {"mean": float(counts[key]), "std": 0.0, "n": 1, "over": "search"}
        image_queries = round(float(counts["image_queries"]))
        rows.append({
            "victim": row["victim"], "victim_version": str(row.get("victim_version")), "dataset": row["dataset"],
            "gradient_source": row["gradient_source"], "recipe": row.get("recipe", config.recipe),
            "selection": row["selection"], "eps": float(row["eps"]), "norm": row["norm"],
            "seeds": [int(s) for s in str(row["seeds"]).split(",") if s],
            "image_queries": image_queries, "calls": round(float(counts["calls"] or 0)),
            "calls_256": math.ceil(image_queries / 256), "alpha_a": row["alpha_a"], "alpha_c": row["alpha_c"],
            "mi_temperature": row.get("mi_temperature"), "generator": row.get("generator"), "metrics": metrics,
        })  # fmt: skip
    return rows


def completed_outcome(config: Any) -> Any:
    """A completed sweep read back from its folder (state file and saved tables), to export later.

    ``config`` locates the sweep (storage and experiment), as for ``--resume``. Raises
    ``FileNotFoundError`` without a state file and ``ValueError`` when it has not completed.
    """
    import json

    import pandas as pd

    from clusterattack import tracking
    from clusterattack.tuning.config import SweepConfig
    from clusterattack.tuning.state import load_state, sweep_dir
    from clusterattack.tuning.sweep import SweepOutcome

    folder = sweep_dir(config)
    state = load_state(folder)
    if state.get("status") != "completed":
        raise ValueError(f"sweep {config.experiment!r} at {folder} has not completed: resume it first (--resume)")

    def rows(table: str) -> list[dict[str, Any]]:
        frame = pd.read_parquet(folder / "tables" / f"{table}.parquet")
        # plain Python values, NaN as None; 15 digits (pandas' most) so the record's 10 are exact
        return json.loads(frame.to_json(orient="records", double_precision=15))

    return SweepOutcome(
        config=SweepConfig.from_dict(state["config"]), parent_run_id=state["parent_run_id"],
        tracking_uri=tracking.configure(), state_dir=folder, table1=rows("table1_attack"),
        table2=rows("table2_queries"), wall_s=float(state.get("wall_s") or 0.0), reread=True,
    )


def _run_tags(outcome: Any) -> dict[str, str]:
    """The sweep's parent-run tags (the code that made it), or this process's when it is the sweep."""
    from clusterattack.tracking.store import source_tags

    if getattr(outcome, "reread", False):
        import mlflow

        return dict(mlflow.MlflowClient(outcome.tracking_uri).get_run(outcome.parent_run_id).data.tags)
    return source_tags()


def export_sweep_record(
    outcome: Any, name: str, *, headline: bool = False, folder: str | Path | None = None
) -> Path:
    """Write the sweep's tables as record ``name`` (``docs/results/`` by default); returns its path.

    For a sweep read back by :func:`completed_outcome` the code commit is the one its parent
    run was tagged with, and the command names the sweep and this export.
    """
    from clusterattack.reports.records import code_provenance, machine_description, write_record

    config = outcome.config
    command = "python " + " ".join(sys.argv) if sys.argv and sys.argv[0] else "run_sweep(...)"
    if getattr(outcome, "reread", False):
        command = f"jobs/sweep.py --preset {config.preset_name} (sweep {config.experiment}); exported by: {command}"
    provenance = {
        "command": command,
        **code_provenance(_run_tags(outcome)),
        "machine": machine_description(max(1, int(config.cpus_per_trial))),
        "date": time.strftime("%Y-%m-%d"),
        "splits": {"train_pool": config.train_pool or "all", "test": config.eval_limit},
        "wall_s": round(outcome.wall_s, 1),
        "sweep": config.experiment,
    }
    kwargs: dict[str, Any] = {} if folder is None else {"folder": folder}
    return write_record(
        name, sweep_record_rows(outcome), provenance, kind="attack", headline=headline,
        title=f"Main job, preset {config.preset_name}: Table 1 and Table 2 (selection={config.objective})",
        description=(
            "One row per victim, gradient source and eps: the best search trial of that eps (chosen by the row's "
            "selection objective) trained again with the seeds shown and scored on the sweep's test subset; mean "
            "and standard deviation over seeds. Image-queries include the attacker's selection queries; the "
            "experimenter's scoring queries are counted apart."
        ),
        columns=[("victim", "victim"), ("gradient_source", "gradient source"), ("eps", "eps"),
                 ("selection", "selection"), ("nmi_pre", "NMI before"), ("nmi_post", "NMI after"),
                 ("nmi_drop", "NMI drop"), ("changed_fraction", "images moved"),
                 ("image_queries", "image-queries"), ("calls_256", "calls of 256")],
        **kwargs,
    )  # fmt: skip
