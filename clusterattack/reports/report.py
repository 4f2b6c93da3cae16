"""The HTML report of one sweep and its analyses: ``ReportData`` in, a self-contained folder out.

``write_report(data, folder)`` writes ``index.html``, its figures as PNG files under
``figures/`` (relative links, so the folder opens offline and can be copied or logged as
artifacts) and ``report.json`` with every number shown. Every table and figure names where
it came from: victim version, generator and its run, code commit, seeds and selection
objective. A section whose analysis failed says so and why; one the sweep did not request
says how to request it. Gathering the data from MLflow is ``clusterattack.tracking.reports``;
nothing here touches a store.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clusterattack.metrics import CLUSTERING_METRICS
from clusterattack.reports import figures as figs
from clusterattack.reports.analysis_sections import (
    absent_html,
    analysis_sections,
    code_text,
    failure_html,
)
from clusterattack.reports.data import (
    Breakdown,
    ReportData,
    SweepTables,
)
from clusterattack.reports.html import (
    Column,
    Section,
    esc,
    figure_html,
    fmt,
    missing_html,
    page_html,
    provenance_html,
    table_html,
)

__all__ = ["write_report"]

log = logging.getLogger(__name__)

INDEX = "index.html"
DATA_FILE = "report.json"


# ------------------------------------------------------------------ tables
_METRICS = CLUSTERING_METRICS

TABLE1_COLUMNS = (
    Column("victim", "victim", "text"),
    Column("victim_version", "version", "text"),
    Column("dataset", "dataset", "text"),
    Column("gradient_source", "gradient source", "text"),
    Column("norm", "norm", "text"),
    Column("eps", "eps"),
    Column("selection", "selection", "text", "label_free: chosen on the attacker's own hold-out; oracle: on test labels"),
    Column("seeds", "seeds", "text", "the seed runs averaged in this row"),
    Column("generator", "generator", "text", "the registered generator the attacker kept (analyses use it)"),
    Column("generator_run_id", "generator run", "text", "the seed run that trained and registered it"),
    Column("nmi", "NMI pre → post", "arrow"),
    Column("nmi_post_std", "± std", "num", "standard deviation of the post-attack NMI over seeds"),
    Column("nmi_drop", "NMI drop", "pct", "relative drop (pre - post) / pre"),
    Column("nmi_drop_std", "± std", "pct"),
    Column("ari", "ARI pre → post", "arrow"),
    Column("ari_drop", "ARI drop", "pct"),
    Column("acc", "ACC pre → post", "arrow"),
    Column("acc_drop", "ACC drop", "pct"),
    Column(
        "image_queries",
        "image-queries",
        "int",
        "images sent to the victim while training the best generator",
    ),
    Column("calls", "calls", "int", "victim calls (requests) while training the best generator"),
    Column("best_trial", "trial", "text"),
    Column("run_id", "MLflow run", "text"),
)

TABLE2_COLUMNS = (
    Column("victim", "victim", "text"),
    Column("victim_version", "version", "text"),
    Column("dataset", "dataset", "text"),
    Column("gradient_source", "gradient source", "text"),
    Column("norm", "norm", "text"),
    Column("eps", "eps"),
    Column("selection", "selection", "text"),
    Column("seeds", "seeds", "text"),
    Column("image_queries", "image-queries", "int", "mean over the seed runs, selection queries included"),
    Column("image_queries_std", "± std", "int"),
    Column("selection_image_queries", "of which selection", "int", "the attacker's hold-out: clean once, then per epoch"),
    Column("scoring_image_queries", "scoring (apart)", "int", "the experimenter's test-split queries, not the attack's"),
    Column("calls", "calls", "int"),
    Column(
        "calls_256",
        "calls of 256",
        "int",
        "image-queries / 256 rounded up: the paper's unit (Table 2)",
    ),
    Column("converged_epoch", "converged at epoch", "int"),
    Column("image_queries_at_convergence", "image-queries at convergence", "int"),
    Column("calls_256_at_convergence", "calls of 256 at convergence", "int"),
    Column("budget", "budget (image-queries)", "int"),
    Column("search_trials", "search trials", "int"),
    Column("search_image_queries", "image-queries of the search", "int"),
    Column("sweep_image_queries", "search + seed runs", "int", "everything the attacker asked for this row"),
    Column("run_id", "MLflow run", "text"),
)


TABLE3_COLUMNS = (
    Column("model", "victim", "text"),
    Column("dataset", "dataset", "text"),
    Column("eps", "eps"),
    Column("alpha_a", "alpha_a"),
    Column("alpha_c", "alpha_c"),
    Column("nmi", "NMI pre → post", "arrow"),
    Column("nmi_drop", "NMI drop", "pct"),
    Column("epochs_run", "epochs", "int", "generator epochs the trial ran (ASHA may stop it early)"),
    Column("image_queries", "image-queries", "int"),
    Column("trial", "trial", "text"),
    Column("run_id", "MLflow run", "text"),
)


def _row_id(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(k) for k in ("model", "dataset", "gradient_source", "eps", "selection"))


def _table1_rows(tables: SweepTables) -> list[dict[str, Any]]:
    """Table 1 rows with the query counts of the matching Table 2 row (same victim, source and eps)."""
    queries = {_row_id(r): r for r in tables.table2}
    rows = []
    for row in tables.table1:
        q = queries.get(_row_id(row), {})
        rows.append({**{k: q.get(k) for k in ("image_queries", "calls", "calls_256")}, **row})
    return rows


def _sweep_sections(data: ReportData) -> list[Section]:
    tables = data.sweep
    if tables is None:
        cmd = data.commands["sweep"]
        return [
            Section(
                "table1",
                "Table 1: attack effect (NMI, ARI, ACC before → after)",
                missing_html(cmd),
                False,
            ),
            Section("table2", "Table 2: query complexity", missing_html(cmd), False),
        ]
    source = provenance_html(
        {
            "sweep": tables.name,
            "experiment": "sweeps",
            "status": tables.tags.get("status", ""),
            "selection": tables.tags.get("selection", ""),
            "seeds": ", ".join(dict.fromkeys(str(r.get("seeds")) for r in tables.table1 if r.get("seeds"))),
            "code": code_text(tables.tags),
        },
        [tables.parent_run_id],
    )
    note1 = (
        "<p class=\"note\">One row per victim, gradient source and eps: the best search trial of that eps "
        "(by the row's selection objective), trained again with the seeds shown and scored on the sweep's "
        "fixed test subset; mean ± standard deviation over seeds. Drop = (pre - post) / pre. Each row's run "
        "id is its chosen search trial's child run; the tables are artifacts "
        "<code>tables/table1_attack.*</code> of the sweep's parent run.</p>"
    )
    note2 = (
        '<p class="note">Image-queries are images sent to the victim while training the best generator; calls '
        "are the requests that carried them; calls of 256 is the paper's unit. Convergence uses the attack's "
        "loss-plateau rule; a dash means the loss had not converged.</p>"
    )
    t1 = (
        table_html(_table1_rows(tables), TABLE1_COLUMNS, table_id="table1")
        if tables.table1
        else "<p>no rows</p>"
    )
    t2 = (
        table_html(tables.table2, TABLE2_COLUMNS, table_id="table2")
        if tables.table2
        else "<p>no rows</p>"
    )
    if tables.table3:
        t1 += (
            "<h3>eps trade-off</h3><p class=\"note\">The best trial takes the lowest NMI after the "
            "attack, which the largest eps nearly always wins; these are the trials that no trial with "
            "an eps as small beats (artifact <code>tables/table3_eps_tradeoff.*</code>).</p>"
            + table_html(tables.table3, TABLE3_COLUMNS, table_id="table3")
        )
    return [
        Section(
            "table1", "Table 1: attack effect (NMI, ARI, ACC before → after)", source + note1 + t1
        ),
        Section("table2", "Table 2: query complexity", source + note2 + t2),
    ]


# ------------------------------------------------------------------ breakdown and grid
def _breakdown_provenance(b: Breakdown) -> str:
    items = {
        "victim": b.victim,
        "dataset": b.dataset,
        "generator": f"{b.generator} (run {b.generator_run_id})",
        "gradient source": b.gradient_source,
        "eps": f"{b.norm} {b.eps:g}",
        "selection": b.selection,
        "seeds": b.seeds,
        "attack seed": b.seed,
        "code": b.code,
        "test images": f"{b.n_images} (seed {b.sample_seed})",
        "image-queries (local)": b.image_queries,
    }
    return provenance_html({k: v for k, v in items.items() if v not in ("", None)}, [b.run_id] if b.run_id else [])


def _local_note(b: Breakdown) -> str:
    where = (
        f"By the sweep's breakdown analysis (run {esc(b.run_id)})"
        if b.run_id
        else "Recomputed for this report (the sweep ran no breakdown analysis)"
    )
    return (
        f'<p class="note">{where}: the registered generator perturbs the sweep\'s test images and the victim '
        "is queried <em>locally</em> (not through the served, budgeted API), "
        f"{esc(fmt(b.image_queries, 'int'))} image-queries that no sweep budget counts.</p>"
    )


def _agreement(b: Breakdown, tables: SweepTables | None) -> str:
    """Whether the recomputed scores reproduce the sweep's Table 1 row of the same victim."""
    row = next(
        (
            r
            for r in (tables.table1 if tables else [])
            if (r.get("model"), r.get("dataset"), r.get("gradient_source")) == (b.model, b.dataset, b.gradient_source)
            and _num(r.get("eps")) is not None
            and abs(float(r["eps"]) - b.eps) < 1e-9
        ),
        None,
    )
    if row is None:
        return ""
    pre = [(f"{m}_pre", _num(row.get(f"{m}_pre")), _num(b.scores.get(f"{m}_pre"))) for m in _METRICS]
    diffs = [abs(a - c) for _, a, c in pre if a is not None and c is not None]
    if diffs and max(diffs) < 5e-4:
        text = "The clean scores reproduce Table 1's (every difference under 0.0005)"
    else:
        shown = ", ".join(f"{k} {fmt(a)} there" for k, a, _ in pre)
        text = f"The clean scores differ from Table 1's ({esc(shown)}): the test sample or the victim version differs"
    post = _num(row.get("nmi_post"))
    if post is not None:
        spread = _num(row.get("nmi_post_std"))
        text += (
            f"; Table 1's post-attack NMI {fmt(post)}"
            + (f" ± {fmt(spread)}" if spread is not None else "")
            + f" is the mean over its seed runs ({esc(row.get('seeds', ''))}), this one the generator the attacker "
            f"kept (seed {b.seed}): NMI {fmt(b.scores.get('nmi_post'))}"
        )
    return f'<p class="note">{text}.</p>'


def _num(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _breakdown_sections(data: ReportData, folder: Path) -> list[Section]:
    title_cm = "Clustering breakdown: confusion matrices before and after (Fig. 2)"
    title_grid = "Clean and perturbed images with their clusters (Fig. 1)"
    run = data.analyses.get("breakdown")
    failure = failure_html(run) if run is not None else ""
    if not data.breakdowns:
        if data.sweep is None:
            body = missing_html(data.commands["sweep"])
        elif run is None and data.breakdown_error and "breakdown" not in data.requested:
            body = absent_html(data, "breakdown") + (
                f'<p class="note">Recomputing it for this report did not work either: {esc(data.breakdown_error)}</p>'
            )
        else:
            body = failure or absent_html(data, "breakdown")
        not_asked = data.sweep is not None and run is None and "breakdown" not in data.requested
        state = "failed" if failure else ("not_requested" if not_asked else "missing")
        return [
            Section("confusion", title_cm, body, False, state),
            Section("grid", title_grid, body, False, state),
        ]
    cm_parts, grid_parts = [failure], [failure]
    for b in data.breakdowns:
        key = f"{b.model}-{b.dataset}-{b.gradient_source}-eps{b.eps:g}"
        s = b.scores
        heading = f"<h3>{esc(b.victim)} on {esc(b.dataset)}: {esc(b.gradient_source)}, {esc(b.norm)} eps {b.eps:g}</h3>"
        scores_table = table_html(
            [{"victim": b.victim, **{k: s.get(k) for k in s if isinstance(s.get(k), int | float)}}],
            (
                Column("victim", "victim", "text"),
                Column("nmi", "NMI pre → post", "arrow"),
                Column("ari", "ARI pre → post", "arrow"),
                Column("acc", "ACC pre → post", "arrow"),
                Column("changed_fraction", "images that changed cluster", "pct"),
                Column("largest_cluster_fraction_post", "largest cluster after", "pct"),
                Column("clusters_used_post", "clusters used after", "int"),
                Column("linf_mean", "mean L∞"),
                Column("l2_mean", "mean L2"),
            ),
            table_id=f"breakdown-{key}",
        )
        titles = (
            f"before attack (NMI {fmt(s.get('nmi_pre'))})",
            f"after attack (NMI {fmt(s.get('nmi_post'))})",
        )
        cm = figs.confusion_pair_figure(
            b.confusion_pre, b.confusion_post, titles, b.class_names, b.cluster_order
        )
        cm_src = figs.save_figure(cm, folder, f"confusion_{key}")
        cm_parts.append(
            heading
            + _breakdown_provenance(b)
            + _local_note(b)
            + scores_table
            + _agreement(b, data.sweep)
            + figure_html(
                cm_src,
                f"{b.victim}: true class (rows) x cluster id (columns, in both panels ordered by the class each "
                f"cluster matches on clean images) on {b.n_images} test images; after the attack most images "
                "fall into a few clusters.",
            )
        )
        grid = figs.image_grid_figure(
            b.grid_clean,
            b.grid_adv,
            b.grid_labels,
            b.grid_pre,
            b.grid_post,
            b.class_names,
            b.cluster_names,
        )
        grid_src = figs.save_figure(grid, folder, f"grid_{key}")
        moved = int(np.sum(np.asarray(b.grid_pre) != np.asarray(b.grid_post)))
        grid_parts.append(
            heading
            + _breakdown_provenance(b)
            + figure_html(
                grid_src,
                f"{len(b.grid_labels)} test images of {b.dataset} (top), perturbed by {b.generator} "
                f"({b.norm} eps {b.eps:g}, middle) and the perturbation scaled up (bottom). Titles: true class "
                f"and cluster before; cluster after (red when it changed: {moved} of {len(b.grid_labels)}). "
                "Names in brackets are the classes clusters match on clean images.",
            )
        )
    filled = not failure
    state = "filled" if filled else "failed"
    return [
        Section("confusion", title_cm, "\n".join(cm_parts), filled, state),
        Section("grid", title_grid, "\n".join(grid_parts), filled, state),
    ]


# ------------------------------------------------------------------ page
def _header(data: ReportData) -> str:
    items: dict[str, Any] = {"generated": data.generated_at, "MLflow store": data.tracking_uri}
    if data.dataset:
        items["dataset"] = data.dataset
    if data.sweep is not None:
        items["sweep"] = data.sweep.name
        for key in ("preset", "gradient_source", "norm"):
            if key in data.sweep.tags:
                items[key.replace("_", " ")] = data.sweep.tags[key]
    runs = [data.sweep.parent_run_id] if data.sweep is not None else []
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in data.notes)
    return provenance_html(items, runs) + notes


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _numbers(data: ReportData) -> dict[str, Any]:
    """Every number the page shows, by section (``report.json``)."""
    out: dict[str, Any] = {
        "title": data.title,
        "tracking_uri": data.tracking_uri,
        "generated_at": data.generated_at,
    }
    if data.sweep is not None:
        s = data.sweep
        out["sweep"] = {"name": s.name, "parent_run_id": s.parent_run_id, "table1": s.table1, "table2": s.table2,
                        "table3": s.table3,
                        "generators": s.generators}  # fmt: skip
    out["analyses"] = {
        k: {"run_id": a.run_id, "status": a.status, "error": a.error, "payload": a.payload}
        for k, a in data.analyses.items()
    }
    out["requested"] = list(data.requested)
    out["breakdowns"] = [
        {
            "victim": b.victim,
            "dataset": b.dataset,
            "generator": b.generator,
            "generator_run_id": b.generator_run_id,
            "n_images": b.n_images,
            "sample_seed": b.sample_seed,
            "image_queries": b.image_queries,
            "selection": b.selection,
            "seeds": b.seeds,
            "code": b.code,
            "run_id": b.run_id,
            "scores": b.scores,
            "confusion_pre": b.confusion_pre,
            "confusion_post": b.confusion_post,
        }  # fmt: skip
        for b in data.breakdowns
    ]
    return _jsonable(out)


def write_report(data: ReportData, folder: str | Path) -> Path:
    """Write the report of ``data`` into ``folder`` (created); returns the path of ``index.html``.

    Figures from an earlier report in the same folder are removed first, so every file
    the page links is one this call wrote.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fig_dir = folder / figs.FIGURE_DIR
    if fig_dir.is_dir():
        for old in fig_dir.glob("*.png"):
            old.unlink()
    sections = [
        *_sweep_sections(data),
        *_breakdown_sections(data, folder),
        *analysis_sections(data, folder),
    ]
    filled = sum(s.filled for s in sections)
    footer = (
        f"{filled} of {len(sections)} sections filled. Every number names its MLflow run; report.json in this "
        "folder holds them all. Open the runs with: mlflow ui --backend-store-uri "
        + data.tracking_uri
    )
    page = page_html(data.title, sections, header=_header(data), footer=footer)
    (folder / DATA_FILE).write_text(json.dumps(_numbers(data), indent=1, default=str))
    index = folder / INDEX
    tmp = folder / f".{INDEX}.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)
    log.info("report written: %s (%d of %d sections filled)", index, filled, len(sections))
    return index
