"""The report's analysis sections: norm curves, transferability, detection, PCA and retraining.

Each builder turns the newest analysis run of its kind (an ``AnalysisResult``) into HTML,
redrawing figures from the run's payload where it holds their data; a missing or
malformed run becomes a section that says so and names the command to rerun.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
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
    from clusterattack.reports.report import AnalysisResult, ReportData

__all__ = ["ANALYSIS_KINDS", "PAPER_DETECTION", "analysis_sections"]

log = logging.getLogger(__name__)

ANALYSIS_KINDS = ("norm_curves", "transfer", "detection", "pca", "retraining")

#: The paper's SSD detection rates (Section 5), shown beside ours for comparison.
PAPER_DETECTION = "the paper's SSD flagged 11.69% / 19.41% / 11.71% (CIFAR-10 / CIFAR-100 / STL-10)"


def _payload_provenance(result: AnalysisResult, keys: Sequence[str]) -> str:
    p = result.payload
    items = {k.replace("_", " "): p.get(k) for k in keys if k in p}
    for k, v in list(items.items()):
        if isinstance(v, list | dict):
            items[k] = json.dumps(v, default=str)
    return provenance_html(items, [result.run_id])


def _norm_curves(result: AnalysisResult, folder: Path) -> str:
    p = result.payload
    rows = list(p.get("rows", []))
    if not rows:
        raise ValueError("norm_curves payload has no rows")
    parts = [_payload_provenance(result, ("dataset", "norm", "gradient_source", "seed"))]
    fig = figs.norm_curves_figure(rows, norm=p.get("norm", ""))
    src = figs.save_figure(fig, folder, "norm_curves")
    parts.append(
        figure_html(
            src,
            f"NMI, ARI and ACC after the attack against the perturbation bound eps ({p.get('norm', '')}); eps 0 is the clean score.",
        )
    )
    parts.append(
        table_html(
            sorted(rows, key=lambda r: (str(r.get("victim")), float(r.get("eps", 0)))),
            (
                Column("victim", "victim", "text"),
                Column("eps", "eps"),
                Column("nmi", "NMI pre → post", "arrow"),
                Column("ari", "ARI pre → post", "arrow"),
                Column("acc", "ACC pre → post", "arrow"),
                Column("linf_mean", "mean L∞"),
                Column("l2_mean", "mean L2"),
                Column("image_queries", "image-queries", "int"),
            ),
            table_id="norm-curves",
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
        _transfer_generators(p, sources),
    ]
    for metric in _METRICS:
        post = np.asarray(p["post"][metric], dtype=np.float64)
        pre = [float(p["pre"][t][metric]) for t in targets]
        fig = figs.transfer_figure(post, sources, targets, pre, metric=metric)
        src = figs.save_figure(fig, folder, f"transfer_{metric}")
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
                table_id=f"transfer-{metric}",
            )
        )
    return "\n".join(parts)


def _transfer_generators(p: dict[str, Any], sources: Sequence[str]) -> str:
    """One row per source: which generator, how it was trained, what its training queried."""

    def by_source(key: str) -> dict[str, Any]:
        value = p.get(key)
        return value if isinstance(value, dict) else {}

    generators, grads = by_source("generators"), by_source("gradient_sources")
    train_eps, queries = by_source("train_eps"), by_source("image_queries_by_source")
    rows = [
        {
            "source": s,
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
            Column("generator", "generator", "text"),
            Column("gradient_source", "gradient source", "text"),
            Column("train_eps", "eps trained at"),
            Column("image_queries", "image-queries (training)", "int"),
        ),
        caption="generators applied (applying one to a target costs no query)",
        table_id="transfer-generators",
    )


def _detection(result: AnalysisResult, folder: Path) -> str:
    p = result.payload
    row = dict(p)
    table = table_html(
        [row],
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
        ),
        table_id="detection",
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
    src = figs.save_figure(fig, folder, "pca")
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
        table_id="pca",
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
        keys += [k for k in row if k != "model" and k not in keys]
    columns = (Column("model", "model", "text"), *(Column(k, k.replace("_", " ")) for k in keys))
    fresh = p.get("fresh_attack") or {}
    return (
        _payload_provenance(result, ("dataset", "victim", "generators", "seed"))
        + '<p class="note">Footnote 12 of the paper: the victim retrained on adversarial images of the sweep\'s '
        "generators, scored on clean images, on images of those (old) generators and under a fresh attack "
        "trained against the retrained model.</p>"
        + table_html(rows, columns, table_id="retraining")
        + (provenance_html({f"fresh attack {k}": v for k, v in fresh.items()}) if fresh else "")
    )


#: Kinds whose figures are not redrawn from the payload (it lacks their data): the run's own PNGs are shown.
_LOGGED_FIGURES = ("detection", "retraining")


def _logged_figures(result: AnalysisResult, folder: Path) -> str:
    parts = []
    for name, path in sorted(result.figure_files.items()):
        src = figs.copy_figure(path, folder, f"{result.kind}_{name}")
        parts.append(figure_html(src, f"{name}: figure logged by analysis run {result.run_id}"))
    return "\n".join(parts)


_ANALYSIS = {
    "norm_curves": ("Performance against perturbation norm (Fig. 3)", _norm_curves),
    "transfer": ("Transferability (Fig. 4)", _transfer),
    "detection": ("Defense: anomaly detection (SSD)", _detection),
    "pca": ("Clean and adversarial images in PCA space (Fig. 5b)", _pca),
    "retraining": ("Defense: adversarial retraining (footnote 12)", _retraining),
}


def analysis_sections(data: ReportData, folder: Path) -> list[Section]:
    """One section per analysis kind, in ``ANALYSIS_KINDS`` order."""
    out = []
    for kind in ANALYSIS_KINDS:
        title, render = _ANALYSIS[kind]
        result = data.analyses.get(kind)
        if result is None:
            out.append(Section(kind, title, missing_html(data.commands[kind]), False))
            continue
        try:
            body = render(result, folder)
            if kind in _LOGGED_FIGURES:
                body += _logged_figures(result, folder)
            out.append(Section(kind, title, body))
        except (KeyError, ValueError, TypeError, IndexError) as err:
            # A malformed payload must not hide the rest of the report: say what is wrong instead.
            log.warning("cannot render the %s analysis of run %s: %r", kind, result.run_id, err)
            body = (
                f'<p class="missing">analysis run <code class="run-id">{esc(result.run_id)}</code> could not be shown: '
                f"{esc(repr(err))}. Rerun: <code>{esc(data.commands[kind])}</code></p>"
            )
            out.append(Section(kind, title, body, False))
    return out
