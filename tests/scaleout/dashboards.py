"""Reading the Grafana dashboards as Prometheus sees them: panels, queries, metric names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = ROOT / "dashboards"
PROMETHEUS_YML = DASHBOARD_DIR / "prometheus.yml"

#: What Grafana puts in place of its built-in interval variables when the test asks
#: Prometheus directly: windows wide enough for two scrapes of a one-second interval.
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__range": "10m"}


def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard JSON of ``dashboards/``, by file name."""
    found = {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))}
    if not found:
        raise FileNotFoundError(f"no dashboard JSON in {DASHBOARD_DIR}")
    return found


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Panels at the top level and inside collapsed rows, rows included."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p.get("type") != "row"]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def to_promql(expr: str) -> str:
    """A panel's expression as Prometheus runs it with every template variable on "All".

    Multi-value variables select with ``=~`` and an ``allValue`` of ``.*``, so "All" is
    ``.*``; Grafana's interval variables become fixed windows.
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return GRAFANA_INTERVALS.get(name, ".*")

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)


def used_variables(expr: str) -> set[str]:
    return {a or b for a, b in re.findall(r"\$\{(\w+)\}|\$(\w+)", expr)} - set(GRAFANA_INTERVALS)


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bray_[a-z0-9_]+\b", expr))


def label_names(expr: str) -> set[str]:
    """Labels an expression selects on (matchers) or aggregates by (``by (...)``)."""
    labels = set(re.findall(r"\b([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"", expr))
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        labels.update(name.strip() for name in group.split(",") if name.strip())
    return labels


def legend_labels(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))


def variable_query(variable: dict[str, Any]) -> tuple[str, str]:
    """(metric, label) of a ``label_values(metric, label)`` variable."""
    query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
    match = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*", query)
    if match is None:
        raise ValueError(f"variable {variable['name']!r}: expected label_values(metric, label), got {query!r}")
    return match.group(1), match.group(2)


def exported_metrics() -> dict[str, set[str]]:
    """Prometheus series names of the project's Ray metrics -> their label names.

    Built from the metric objects themselves, so a renamed metric or tag in
    ``serving/metrics.py`` or ``tuning/metrics.py`` shows up here. Ray prefixes ``ray_``;
    its exporter adds ``_total`` to counters and ``_bucket``/``_sum``/``_count`` to histograms.
    """
    from ray.util.metrics import Counter, Gauge, Histogram, Metric

    from clusterattack.serving import metrics as serving_metrics
    from clusterattack.tuning import metrics as tuning_metrics

    replica = serving_metrics.ServingMetrics("app", "scores")
    screened = serving_metrics.DetectionMetrics("app", "scores")
    objects = [m for m in (*vars(replica).values(), *vars(screened).values()) if isinstance(m, Metric)]
    objects += [*serving_metrics._budget_gauges(), *serving_metrics._detection_metrics(), *tuning_metrics._gauges()]
    out: dict[str, set[str]] = {}
    for metric in objects:
        base = f"ray_{metric.info['name']}"
        tags = set(metric.info["tag_keys"])
        if isinstance(metric, Counter):
            out[base + "_total"] = tags
        elif isinstance(metric, Histogram):
            out[base + "_bucket"] = tags | {"le"}
            out[base + "_sum"] = out[base + "_count"] = tags
        elif isinstance(metric, Gauge):
            out[base] = tags
        else:
            raise TypeError(f"unexpected metric type {type(metric).__name__} of {base}")
    return out
