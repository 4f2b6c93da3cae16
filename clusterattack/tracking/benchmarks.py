"""Benchmark runs in MLflow: settings as params, one metric per (victim, method, budget) row, table and figure."""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import mlflow
from matplotlib.figure import Figure

from clusterattack.tracking.store import log_metrics, log_params, start_run

__all__ = ["BENCHMARK_EXPERIMENT", "log_benchmark"]

log = logging.getLogger(__name__)

BENCHMARK_EXPERIMENT = "benchmarks"
_UNSAFE = re.compile(r"[^A-Za-z0-9_./ -]")


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def log_benchmark(
    name: str,
    settings: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    *,
    figures: Mapping[str, Figure] | None = None,
    table_markdown: str | None = None,
    summary: Mapping[str, Any] | None = None,
    row_key: Sequence[str] = ("victim", "method", "budget"),
    row_metrics: Sequence[str] = ("nmi_drop", "image_queries"),
    experiment: str = BENCHMARK_EXPERIMENT,
) -> str:
    """Log one benchmark run; returns its run id.

    Params: ``settings``. Metrics: ``summary`` (e.g. ratios) and, per row, each of
    ``row_metrics`` under ``<row_key joined by '.'>.<metric>`` (MLflow metric names allow
    letters, digits, ``_ - . /`` and spaces; anything else becomes ``_``). Artifacts: the
    rows as ``rows.csv`` and ``rows.json``, the markdown table, and each figure as
    ``figures/<key>.png``.
    """
    with start_run(experiment, run_name=name, tags={"benchmark": name.split("-")[0]}) as run:
        log_params(settings)
        if summary:
            log_metrics({_UNSAFE.sub("_", k): v for k, v in summary.items()})
        per_row: dict[str, Any] = {}
        for row in rows:
            prefix = ".".join(str(row.get(k, "")) for k in row_key)
            for metric in row_metrics:
                per_row[_UNSAFE.sub("_", f"{prefix}.{metric}")] = row.get(metric)
        log_metrics(per_row)
        mlflow.log_text(_csv(rows), "rows.csv")
        mlflow.log_dict({"rows": [dict(r) for r in rows]}, "rows.json")
        if table_markdown:
            mlflow.log_text(table_markdown, "table.md")
        for key, fig in (figures or {}).items():
            mlflow.log_figure(fig, f"figures/{key}.png")
        log.info("logged benchmark run %s (%s)", run.info.run_id, name)
        return run.info.run_id
