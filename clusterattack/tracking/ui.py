"""Links into the MLflow UI (3.17) that open a sweep's runs ready to compare: model-training view, charts set.

Two things of the MLflow 3 UI decide what a link shows, and neither is a run's data:

* the *workflow type* (the "GenAI | Model training" switch, top left): a fresh browser starts
  on GenAI and sends every experiment to its GenAI overview, whatever the experiment's
  ``mlflow.experimentKind`` tag says; ``?workflowType=machine_learning`` in the URL selects
  model training (and the switch remembers it);
* the runs view's state (filter, grouping, charts), which the UI keeps per browser; its
  *Share* button stores one as the experiment tag ``mlflow.sharedViewState.<key>`` and
  links it as ``?viewStateShareKey=<key>``. :func:`write_sweep_views` writes such states for a
  sweep: its seed runs grouped by victim with parallel-coordinates and scatter charts, and its
  Table 1 rows (seed runs grouped by row, averaged).

A sweep's child runs nest under its parent run, which the runs table shows collapsed (and its
charts then show the parent alone); grouping by a tag lists the child runs themselves.
The state layout is the UI's own (``mlflow/server/js``: ``runsHiddenMode``, ``groupBy``,
``compareRunCharts`` card fields), checked against MLflow 3.17 by ``tests/core/test_mlflow_ui.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from mlflow.tracking import MlflowClient

__all__ = [
    "SHARED_VIEW_TAG",
    "SweepView",
    "experiment_url",
    "models_url",
    "run_url",
    "sweep_views",
    "views_markdown",
    "write_sweep_views",
]

log = logging.getLogger(__name__)

SHARED_VIEW_TAG = "mlflow.sharedViewState."
WORKFLOW = {"workflowType": "machine_learning"}
#: Params the parallel-coordinates chart spreads runs over (AttackConfig keys, the same in every run).
PARALLEL_PARAMS = ("eps", "alpha_a", "alpha_c", "gradient_source", "victim")
#: Metrics of a scored seed run that compare across victims and gradient sources.
SCORE_METRICS = ("nmi_post", "nmi_drop", "acc_post", "ari_post", "changed_fraction", "image_queries")
#: Columns of the runs table (the UI's keys: ``<kind>.`<name>```).
COLUMNS = (
    "attributes.`Dataset`", "attributes.`Models`", "tags.`gradient_source`", "params.`eps`", "params.`alpha_a`",
    "params.`alpha_c`", "metrics.`nmi_pre`", "metrics.`nmi_post`", "metrics.`nmi_drop`", "metrics.`image_queries`",
)  # fmt: skip


@dataclass(frozen=True)
class SweepView:
    """One shared runs view of a sweep: its key (``?viewStateShareKey=``), title and UI state."""

    key: str
    title: str
    state: dict[str, Any]


def _root(base: str) -> str:
    # "" -> a link relative to the page it sits on (a run description inside the UI).
    return f"{base.rstrip('/')}/#" if base else "#"


def experiment_url(base: str, experiment_id: str, view: str | None = None, charts: bool = False) -> str:
    """The runs page of experiment ``experiment_id`` in the model-training view, optionally a shared view.

    ``base`` is the UI's address (``http://127.0.0.1:5000``); "" gives a link relative to a UI page.
    """
    query = dict(WORKFLOW)
    if charts:
        query["compareRunsMode"] = "CHART"
    if view:
        query["viewStateShareKey"] = view
    return f"{_root(base)}/experiments/{quote(str(experiment_id))}/runs?{urlencode(query)}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """The page of run ``run_id`` (its data sets, logged models, params and metrics)."""
    return f"{_root(base)}/experiments/{quote(str(experiment_id))}/runs/{quote(run_id)}?{urlencode(WORKFLOW)}"


def models_url(base: str, experiment_id: str) -> str:
    """The experiment's Models tab: every logged model of its runs with their params, tags and metrics."""
    return f"{_root(base)}/experiments/{quote(str(experiment_id))}/models?{urlencode(WORKFLOW)}"


def _uuid(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def _card(kind: str, section: str, seed: str, **fields: Any) -> dict[str, Any]:
    """A chart card as the UI serialises it (RunsChartsCardConfig: uuid, type, section, flags)."""
    return {
        "uuid": _uuid(seed, kind, json.dumps(fields, sort_keys=True)),
        "type": kind,
        "runsCountToCompare": 100,
        "metricSectionId": section,
        "deleted": False,
        "isGenerated": False,
        **fields,
    }


def _charts(seed: str, section: str, parallel_metric: str) -> list[dict[str, Any]]:
    metric = {"type": "METRIC"}
    return [
        _card(
            "PARALLEL", section, seed,
            selectedParams=list(PARALLEL_PARAMS), selectedMetrics=[parallel_metric], showAllRuns=True,
            displayName=f"{parallel_metric} over eps, alpha_a, alpha_c, gradient source, victim",
        ),  # fmt: skip
        _card(
            "SCATTER", section, seed,
            xaxis={"key": "image_queries", **metric}, yaxis={"key": "nmi_drop", **metric},
            displayName="NMI drop against image-queries",
        ),  # fmt: skip
        _card(
            "SCATTER", section, seed,
            xaxis={"key": "eps", "type": "PARAM"}, yaxis={"key": "nmi_post", **metric},
            displayName="NMI after the attack against eps",
        ),  # fmt: skip
        *(_card("BAR", section, seed, metricKey=key, displayName=key) for key in SCORE_METRICS),
    ]


def _state(
    search: str, group_tag: str, grouped_charts: bool, charts: list[dict[str, Any]], section: tuple[str, str]
) -> dict[str, Any]:
    return {
        "searchFilter": search,
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": list(COLUMNS),
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": group_tag}]},
        "groupsExpanded": {},
        "useGroupedValuesInCharts": grouped_charts,
        "hideEmptyCharts": True,
        "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": charts,
        "compareRunSections": [
            {"uuid": section[0], "name": section[1], "display": True, "isReordered": False, "deleted": False,
             "isGenerated": False},
        ],  # fmt: skip
        "isAccordionReordered": False,
        "viewMaximized": False,
        "runListHidden": False,
    }


def sweep_views(sweep: str, parent_run_id: str) -> list[SweepView]:
    """The shared views of sweep ``sweep`` (parent run ``parent_run_id``): seed runs by victim, Table 1 rows."""
    # By parent run, not by sweep name: a name may come back in another sweep of the store.
    finals = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.phase = 'final'"
    views = []
    for what, title, group, grouped, metric in (
        ("seeds", f"{sweep}: seed runs by victim", "victim", False, "nmi_drop"),
        ("rows", f"{sweep}: Table 1 rows (mean over seeds)", "table_row", True, "nmi_drop"),
    ):
        key = _uuid("clusterattack", parent_run_id, what)[:20]
        section = (_uuid(key, "section"), title)
        views.append(SweepView(key, title, _state(finals, group, grouped, _charts(key, section[0], metric), section)))
    return views


def write_sweep_views(
    client: MlflowClient, experiment_id: str, sweep: str, parent_run_id: str
) -> list[SweepView]:
    """Store :func:`sweep_views` as shared view states of the experiment (idempotent: same keys, same states)."""
    views = sweep_views(sweep, parent_run_id)
    for view in views:
        client.set_experiment_tag(experiment_id, f"{SHARED_VIEW_TAG}{view.key}", json.dumps(view.state))
    log.debug("experiment %s: shared views %s", experiment_id, [v.key for v in views])
    return views


def views_markdown(base: str, experiment_id: str, views: Sequence[SweepView]) -> str:
    """Markdown links to ``views`` and to the experiment's logged models (``base`` "" : relative to a UI page)."""
    lines = [f"- [{v.title}]({experiment_url(base, experiment_id, v.key, charts=True)})" for v in views]
    lines.append(f"- [generators and victims as logged models]({models_url(base, experiment_id)})")
    return "\n".join(lines)
