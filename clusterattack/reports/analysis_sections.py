"""The report's analysis sections: norm curves, transferability, detection, PCA, retraining, baselines, query detection.

Each section shows one analysis run of the sweep (an ``AnalysisResult``): one block per item
(a row, a group of rows) with the victim versions, generators and their runs, code commit,
seeds and selection objective that made it, figures redrawn from the payload where it holds
their data. A failed analysis shows what it computed and says what failed and why; one the
sweep did not request says how to request it; a malformed item says what is wrong.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clusterattack.metrics import CLUSTERING_METRICS as _METRICS
from clusterattack.reports import figures as figs
from clusterattack.reports.html import (
    Column,
    Section,
    esc,
    figure_html,
    missing_html,
    provenance_html,
    table_html,
)

if TYPE_CHECKING:
    from clusterattack.reports.data import AnalysisResult, ReportData

__all__ = ["ANALYSIS_KINDS", "PAPER_DETECTION", "absent_html", "analysis_sections", "code_text", "failure_html"]

log = logging.getLogger(__name__)

ANALYSIS_KINDS = ("norm_curves", "transfer", "detection", "pca", "retraining", "baselines", "query_detection")

#: The paper's SSD detection rates (Section 5), shown beside ours for comparison.
PAPER_DETECTION = "the paper's SSD flagged 11.69% / 19.41% / 11.71% (CIFAR-10 / CIFAR-100 / STL-10)"


def code_text(tags: Mapping[str, str]) -> str:
    """The code commit a run's tags name: ``<commit>``, with ``(dirty, diff <hash>)`` when the tree had changes."""
    commit = tags.get("clusterattack.git_commit")
    if not commit:
        return "unknown (the run has no clusterattack.git_commit tag)"
    if tags.get("clusterattack.git_dirty") == "true":
        return f"{commit[:12]} (dirty, diff {tags.get('clusterattack.git_diff', '?')})"
    return commit[:12]


def _ident(result: AnalysisResult, base: str) -> str:
    """A figure name or table id unique to one item."""
    return f"{base}-{result.label}" if result.label else base


def _item_header(item: AnalysisResult, run: AnalysisResult) -> str:
    """The item's heading and what made it: victims, generators and their runs, seeds, selection, code."""
    if not item.label:
        return ""
    p = item.provenance
    fields: dict[str, Any] = {}
    if "victim" in p:
        fields["victim"] = p["victim"]
        fields["generator"] = f"{p.get('generator')} (run {p.get('generator_run_id', '?')})"
        fields["gradient source"] = p.get("gradient_source")
        fields["eps"] = f"{p.get('norm', '')} {p.get('eps', '')}"
    else:
        fields["victims"] = ", ".join(p.get("victims", []))
        fields["generators"] = ", ".join(f"{g} (run {r})" for g, r in (p.get("generators") or {}).items())
    fields["selection"] = p.get("selection")
    fields["seeds"] = p.get("seeds")
    fields["code"] = code_text(run.tags)
    return f"<h3>{esc(item.label)}</h3>" + provenance_html(fields, [run.run_id])


def _payload_provenance(result: AnalysisResult, keys: Sequence[str]) -> str:
    p = result.payload
    items = {k.replace("_", " "): p.get(k) for k in keys if k in p}
    for k, v in list(items.items()):
        if isinstance(v, list | dict):
            items[k] = json.dumps(v, default=str)
    return provenance_html(items, [] if result.label else [result.run_id])


def _norm_curves(result: AnalysisResult, folder: Path) -> str:
    p = result.payload
    rows = list(p.get("rows", []))
    if not rows:
        raise ValueError("norm_curves payload has no rows")
    parts = [_payload_provenance(result, ("dataset", "norm", "gradient_source", "reference_source", "seed", "test_images"))]
    fig = figs.norm_curves_figure(rows, norm=p.get("norm", ""))
    src = figs.save_figure(fig, folder, _ident(result, "norm_curves"))
    reference = p.get("reference_source")
    parts.append(
        figure_html(
            src,
            f"NMI, ARI and ACC after the attack against the perturbation bound eps ({p.get('norm', '')}); eps 0 is the "
            "clean score."
            + (f" Dashed: the {reference} reference (gradients through the victim), trained alike." if reference else ""),
        )
    )
    parts.append(
        table_html(
            sorted(rows, key=lambda r: (str(r.get("victim")), str(r.get("gradient_source", "")), float(r.get("eps", 0)))),
            (
                Column("victim", "victim", "text"),
                Column("gradient_source", "gradient source", "text"),
                Column("eps", "eps"),
                Column("nmi", "NMI pre → post", "arrow"),
                Column("ari", "ARI pre → post", "arrow"),
                Column("acc", "ACC pre → post", "arrow"),
                Column("linf_mean", "mean L∞"),
                Column("l2_mean", "mean L2"),
                Column("image_queries", "image-queries", "int"),
            ),
            table_id=_ident(result, "norm-curves"),
        )
    )
    return "\n".join(parts)


def _transfer(result: AnalysisResult, folder: Path) -> str:
    p = result.payload
    sources, targets = list(p["sources"]), list(p["targets"])
    parts = [
        _payload_provenance(
            result,
            ("dataset", "norm", "eps", "image_queries", "image_queries_applying", "test_images", "seed"),
        ),
        _transfer_generators(p, sources, _ident(result, "transfer-generators")),
    ]
    for metric in _METRICS:
        post = np.asarray(p["post"][metric], dtype=np.float64)
        pre = [float(p["pre"][t][metric]) for t in targets]
        fig = figs.transfer_figure(post, sources, targets, pre, metric=metric)
        src = figs.save_figure(fig, folder, _ident(result, f"transfer_{metric}"))
        parts.append(
            figure_html(
                src,
                f"{metric.upper()} of each target victim (columns) on images perturbed by the generator trained "
                "against each source (rows); the diagonal is the attack on its own victim. Bottom row: before the attack.",
            )
        )
        rows = [
            {"source": s, **{t: post[i, j] for j, t in enumerate(targets)}}
            for i, s in enumerate(sources)
        ]
        rows.append({"source": "(pre-attack)", **{t: v for t, v in zip(targets, pre, strict=True)}})
        columns = (Column("source", "source \\ target", "text"), *(Column(t, t) for t in targets))
        parts.append(
            table_html(
                rows,
                columns,
                caption=f"{metric.upper()} after transfer",
                table_id=_ident(result, f"transfer-{metric}"),
            )
        )
    return "\n".join(parts)


def _transfer_generators(p: dict[str, Any], sources: Sequence[str], table_id: str) -> str:
    """One row per source: which generator, how it was trained, what its training queried."""

    def by_source(key: str) -> dict[str, Any]:
        value = p.get(key)
        return value if isinstance(value, dict) else {}

    generators, grads = by_source("generators"), by_source("gradient_sources")
    train_eps, queries = by_source("train_eps"), by_source("image_queries_by_source")
    versions = by_source("victim_versions")
    rows = [
        {
            "source": s,
            "victim": versions.get(s, ""),
            "generator": str(generators.get(s, "")),
            "gradient_source": grads.get(s, ""),
            "train_eps": train_eps.get(s),
            "image_queries": queries.get(s),
        }
        for s in sources
    ]
    return table_html(
        rows,
        (
            Column("source", "source victim", "text"),
            Column("victim", "victim version", "text"),
            Column("generator", "generator", "text"),
            Column("gradient_source", "gradient source", "text"),
            Column("train_eps", "eps trained at"),
            Column("image_queries", "image-queries (training)", "int"),
        ),
        caption="generators applied (applying one to a target costs no query)",
        table_id=table_id,
    )


def _detection(result: AnalysisResult, folder: Path) -> str:
    p = result.payload
    table = table_html(
        [dict(p)],
        (
            Column("victim", "victim", "text"),
            Column("generator", "generator", "text"),
            Column("eps", "eps"),
            Column("norm", "norm", "text"),
            Column(
                "detection_rate_mean",
                "detection rate",
                "pct",
                "fraction of injected adversarial images flagged",
            ),
            Column("detection_rate_std", "± std", "pct"),
            Column("fpr_mean", "false-positive rate", "pct"),
            Column("fpr_std", "± std", "pct"),
            Column("target_fpr", "target FPR", "pct"),
            Column("images", "images", "int"),
            Column("trials", "trials", "int"),
            Column("fit_images", "fit images", "int"),
            Column("heldout_images", "hold-out images", "int"),
        ),
        table_id=_ident(result, "detection"),
    )
    note = (
        '<p class="note">Anomaly detection (SSD-style: contrastive features, Mahalanobis distance) on test images '
        f"of which each is perturbed with probability 1/2; {esc(PAPER_DETECTION)}.</p>"
    )
    return (
        _payload_provenance(result, ("dataset", "victim", "generator", "eps", "norm", "seed"))
        + note
        + table
    )


def _pca(result: AnalysisResult, folder: Path) -> str:
    p = result.payload
    clean, adv = result.arrays.get("clean"), result.arrays.get("adv")
    if clean is None or adv is None:
        raise ValueError(
            f"PCA points file {p.get('points')!r} was not found or lacks arrays 'clean' and 'adv'"
        )
    explained = p.get("explained_variance")
    fig = figs.pca_figure(clean, adv, explained)
    src = figs.save_figure(fig, folder, _ident(result, "pca"))
    summary = table_html(
        [
            {
                "explained": sum(float(v) for v in explained or []) or None,
                "overlap": p.get("overlap"),
                "overlap_method": p.get("overlap_method"),
                "points": len(clean),
            }
        ],  # fmt: skip
        (
            Column("explained", "variance explained by PC1-3", "pct"),
            Column("overlap", "overlap"),
            Column("overlap_method", "overlap measure", "text"),
            Column("points", "points per set", "int"),
        ),
        table_id=_ident(result, "pca"),
    )
    return (
        _payload_provenance(result, ("dataset", "victim", "generator", "eps", "norm"))
        + summary
        + figure_html(
            src,
            "First three principal components of clean and adversarial test images (Fig. 5b): they overlap.",
        )
    )


def _retraining(result: AnalysisResult, folder: Path) -> str:
    p = result.payload
    rows = list(p.get("rows", []))
    if not rows:
        raise ValueError("retraining payload has no rows")
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if k != "model" and k not in keys and not isinstance(v, dict)]
    columns = (Column("model", "model", "text"), *(Column(k, k.replace("_", " ")) for k in keys))
    fresh = p.get("fresh_attack") or {}
    return (
        _payload_provenance(result, ("dataset", "victim", "generators", "seed"))
        + '<p class="note">Footnote 12 of the paper: the victim retrained on adversarial images of the sweep\'s '
        "generators, scored on clean images, on images of those (old) generators and under a fresh attack "
        "trained against each model.</p>"
        + table_html(rows, columns, table_id=_ident(result, "retraining"))
        + (provenance_html({f"fresh attack {k}": v for k, v in fresh.items()}) if fresh else "")
    )


def _baselines(result: AnalysisResult, folder: Path) -> str:
    p = result.payload
    rows = list(p.get("rows", []))
    if not rows:
        raise ValueError("baselines payload has no rows")
    split = int(p["split_images"])
    summary = table_html(
        [dict(p)],
        (
            Column("generator_nmi_drop", "generator NMI drop", "pct"),
            Column("generator_image_queries", "generator image-queries (one-off)", "int"),
            Column("split_images", "test split images", "int"),
            Column("equal_total_queries_per_image", "equal total: image-queries per image"),
            Column("best_baseline_equal_total", "best baseline at equal total", "text"),
            Column("baseline_nmi_drop_equal_total", "its NMI drop", "pct"),
            Column("ratio_equal_total", "ratio of NMI drops", "num", "generator / best baseline at equal total queries"),
            Column("payback_images", "paid back after (images)", "int",
                   "test images after which the generator's one-off queries cost less than the per-image attack"),
            Column("payback_images_with_search", "with the sweep's search", "int"),
        ),  # fmt: skip
        table_id=_ident(result, "baselines-summary"),
    )
    fig = figs.equal_queries_figure(rows, float(p["generator_image_queries"]), split)
    src = figs.save_figure(fig, folder, _ident(result, "baselines"))
    skipped = p.get("skipped") or []
    note = (
        '<p class="note">Appendix E at equal <em>total</em> image-queries over the whole test split: the generator '
        "pays its training queries once for every image, a per-image attack (NES, SPSA, Square) pays its budget per "
        f"image. {esc(p.get('ratio_note', ''))}. Payback against {esc(p.get('payback_against', ''))}. NMI measured on "
        f"{esc(p.get('sample_images'))} test images, the per-image cost extrapolated over {split:,}.</p>"
    )
    if skipped:
        note += '<p class="note">Not run (budget below one iteration): ' + esc(
            ", ".join(f"{s['method']}@{s['budget']} (needs {s.get('min_queries', '?')})" for s in skipped)
        ) + ".</p>"
    return (
        _payload_provenance(result, ("dataset", "victim", "generator", "eps", "norm", "seed"))
        + note
        + summary
        + figure_html(src, "Relative NMI drop against the image-queries spent over the whole test split (log scale).")
        + table_html(
            rows,
            (
                Column("method", "attack", "text"),
                Column("budget", "per-image budget", "int"),
                Column("queries_per_image", "image-queries per image"),
                Column("total_image_queries", "total over the split", "int"),
                Column("nmi_post", "NMI after"),
                Column("nmi_drop", "NMI drop", "pct"),
                Column("changed_fraction", "changed cluster", "pct"),
                Column("linf_max", "max L∞"),
            ),
            table_id=_ident(result, "baselines"),
        )
    )


def _query_detection(result: AnalysisResult, folder: Path) -> str:
    from clusterattack.analyses.suite.query_detection import keys_figure

    p = result.payload
    rows = list(p.get("rows", []))
    if not rows:
        raise ValueError("query_detection payload has no rows")
    detector = p.get("detector") or {}
    flag_after, flag_window = int(detector["flag_after"]), int(detector["flag_window"])
    fig = keys_figure(rows, flag_after, flag_window)
    src = figs.save_figure(fig, folder, _ident(result, "query_detection"))
    note = (
        '<p class="note">The sweep\'s own deployments screened every query in <em>flag</em> mode (the answers '
        "unchanged, so the attack is the one the sweep runs without it): a Blacklight-style fingerprint of each "
        f"image (quantised pixels, hashes of sliding windows) is matched against the key's earlier ones, and a key "
        f"is flagged once {flag_after} of its last {flag_window} queries matched. One row per API key: each search "
        "trial and seed run has its own.</p>"
    )
    summary = table_html(
        [dict(p)],
        (
            Column("keys", "keys", "int"),
            Column("flagged_keys", "flagged", "int"),
            Column("flagged_fraction", "flagged fraction", "pct"),
            Column("queries", "images screened", "int"),
            Column("queries_to_flag_median", "median queries to flag", "num",
                   "the query at which a flagged key crossed the threshold"),
            Column("matched_fraction_mean", "mean matched fraction", "pct"),
        ),  # fmt: skip
        table_id=_ident(result, "query-detection-summary"),
    )
    table = table_html(
        rows,
        (
            Column("phase", "phase", "text"),
            Column("eps", "eps"),
            Column("seed", "seed", "text"),
            Column("trial_id", "trial", "text"),
            Column("queries", "images screened", "int"),
            Column("ledger_image_queries", "images charged", "int"),
            Column("matched", "matched", "int"),
            Column("matched_fraction", "matched fraction", "pct"),
            Column("first_match_query", "first match at", "int"),
            Column("flagged", "flagged", "text"),
            Column("queries_to_flag", "flagged at query", "int"),
        ),
        table_id=_ident(result, "query-detection"),
    )
    return (
        _payload_provenance(result, ("detector",))
        + note
        + summary
        + figure_html(src, "Each key's matched fraction against the images it sent; flagged keys in red.")
        + table
    )


#: Kinds whose figures are not redrawn from the payload (it lacks their data): the run's own PNGs are shown.
_LOGGED_FIGURES = ("detection",)


def _logged_figures(result: AnalysisResult, folder: Path) -> str:
    parts = []
    for name, path in sorted(result.figure_files.items()):
        src = figs.copy_figure(path, folder, _ident(result, f"{result.kind}_{name}"))
        parts.append(figure_html(src, f"{name}: figure logged by analysis run {result.run_id}"))
    return "\n".join(parts)


_ANALYSIS = {
    "norm_curves": ("Performance against perturbation norm (Fig. 3)", _norm_curves),
    "transfer": ("Transferability (Fig. 4)", _transfer),
    "detection": ("Defense: anomaly detection (SSD)", _detection),
    "pca": ("Clean and adversarial images in PCA space (Fig. 5b)", _pca),
    "retraining": ("Defense: adversarial retraining (footnote 12)", _retraining),
    "baselines": ("Generator against per-image attacks at equal total queries (Appendix E)", _baselines),
    "query_detection": ("Defense at the door: stateful query detection", _query_detection),
}


def failure_html(result: AnalysisResult) -> str:
    """Empty for a finished analysis run; else what went wrong (FAILED: its error and failed items)."""
    if result.status == "FINISHED":
        return ""
    run = f'<code class="run-id">{esc(result.run_id)}</code>'
    if result.status == "FAILED":
        failed = result.payload.get("failed") or []
        listed = "".join(f"<li><b>{esc(f.get('key'))}</b>: {esc(f.get('error'))}</li>" for f in failed)
        return (
            f'<p class="failed">analysis <b>{esc(result.kind)}</b> failed (MLflow run {run}): '
            f"{esc(result.error or 'no error recorded')}</p>"
            + (f'<ul class="failed">{listed}</ul>' if listed else "")
        )
    return (
        f'<p class="failed">analysis <b>{esc(result.kind)}</b> did not finish (MLflow run {run}, status '
        f"{esc(result.status)}): the sweep was interrupted; resume it (python jobs/sweep.py --resume) to run it again.</p>"
    )


def absent_html(data: ReportData, kind: str) -> str:
    """Why a sweep has no run of analysis ``kind``, and the command that makes one."""
    if data.sweep is None:
        return missing_html(data.commands["sweep"])
    command = data.commands[kind]
    if kind in data.requested:
        return (
            f'<p class="missing">requested by this sweep but never started (was the sweep interrupted?): resume it '
            f"(python jobs/sweep.py --resume) or run <code>{esc(command)}</code></p>"
        )
    return f'<p class="missing">not requested by this sweep: <code>{esc(command)}</code></p>'


def _absent_state(data: ReportData, kind: str) -> str:
    return "not_requested" if data.sweep is not None and kind not in data.requested else "missing"


def analysis_section(data: ReportData, kind: str, folder: Path) -> Section:
    """The section of analysis ``kind`` (one of ``ANALYSIS_KINDS``)."""
    title, render = _ANALYSIS[kind]
    result = data.analyses.get(kind)
    if result is None:
        return Section(kind, title, absent_html(data, kind), False, _absent_state(data, kind))
    failure = failure_html(result)
    parts, broken = [failure], False
    for item in result.parts:
        try:
            body = render(item, folder)
            if kind in _LOGGED_FIGURES:
                body += _logged_figures(item, folder)
            parts.append(_item_header(item, result) + body)
        except (KeyError, ValueError, TypeError, IndexError) as err:
            # A malformed payload must not hide the rest of the report: say what is wrong instead.
            log.warning("cannot render the %s analysis of run %s (%s): %r", kind, result.run_id, item.label, err)
            broken = True
            parts.append(
                f'<p class="missing">{esc(item.label or "the payload")} of analysis run <code class="run-id">'
                f"{esc(result.run_id)}</code> could not be shown: {esc(repr(err))}. Rerun: "
                f"<code>{esc(data.commands[kind])}</code></p>"
            )
    if len(parts) == 1 and not failure:
        broken = True
        parts.append(f'<p class="missing">analysis run <code class="run-id">{esc(result.run_id)}</code> holds no item.</p>')
    if failure:
        return Section(kind, title, "\n".join(parts), False, "failed")
    return Section(kind, title, "\n".join(parts), not broken, "missing" if broken else "filled")


def analysis_sections(data: ReportData, folder: Path) -> list[Section]:
    """One section per analysis kind, in ``ANALYSIS_KINDS`` order."""
    return [analysis_section(data, kind, folder) for kind in ANALYSIS_KINDS]
