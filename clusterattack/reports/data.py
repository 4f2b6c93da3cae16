"""What a report shows, as data: a sweep's tables, its analyses' results, the breakdowns.

``clusterattack.tracking.reports`` fills a :class:`ReportData` from MLflow (or the tests
build one by hand); ``clusterattack.reports.report.write_report`` turns it into the HTML
folder. Nothing here renders or touches a store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clusterattack.reports.analysis_sections import ANALYSIS_KINDS

__all__ = [
    "SWEEP_START_ONLY",
    "AnalysisResult",
    "Breakdown",
    "ReportData",
    "SweepTables",
    "default_commands",
]


#: Analyses a finished sweep cannot run afterwards: query detection reads what the sweep's own
#: deployments screened, so it must be asked for when the sweep starts.
SWEEP_START_ONLY = ("query_detection",)


def default_commands(sweep: str | None = None, preset: str = "demo") -> dict[str, str]:
    """How to produce each section's inputs (shown in place of a section the sweep lacks).

    With a sweep: its analyses run on its own generators (``jobs/report.py --run-analyses``);
    without one: a new sweep that runs them all.
    """
    new_sweep = f"python jobs/sweep.py --preset {preset} --analyses all"
    out = {"sweep": new_sweep}
    for kind in ("breakdown", *ANALYSIS_KINDS):
        out[kind] = (
            f"python jobs/report.py --sweep {sweep} --run-analyses {kind}  (or a new sweep: "
            f"python jobs/sweep.py --preset {preset} --analyses {kind})"
            if sweep and kind not in SWEEP_START_ONLY
            else f"python jobs/sweep.py --preset {preset} --analyses {kind}"
        )
    return out


@dataclass
class SweepTables:
    """One sweep's summary: Table 1 and Table 2 rows, each carrying ``run_id`` (the best trial's run)."""

    name: str
    parent_run_id: str
    table1: list[dict[str, Any]]
    table2: list[dict[str, Any]]
    generators: dict[str, str] = field(
        default_factory=dict
    )  # "<model>-<dataset>" -> "<name>/<version>"
    tags: dict[str, str] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)
    # The eps trade-off (``table3_eps_tradeoff``; absent from sweeps made before it existed).
    table3: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class AnalysisResult:
    """One analysis run of the sweep (or one item of it: a row, a group of rows).

    ``payload`` is the run's JSON payload (an item's own payload for an item); ``items``
    the run's items, each an ``AnalysisResult`` with its ``label`` (the item key, e.g.
    ``cc-digits-surrogate-eps0.1``), ``provenance`` (victim versions, generators and their
    runs, seeds, selection), arrays (PCA points, breakdown arrays) and logged PNG figures
    (name -> local file). ``status`` is the run's (FINISHED, FAILED, RUNNING, KILLED) and
    ``error`` why it failed; ``tags`` the run's tags (its code commit among them). A result
    without ``items`` whose payload holds none is shown as a single item.
    """

    kind: str
    run_id: str
    payload: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    figure_files: dict[str, Path] = field(default_factory=dict)
    status: str = "FINISHED"
    error: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    items: list[AnalysisResult] = field(default_factory=list)
    label: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def parts(self) -> list[AnalysisResult]:
        """What to show: the items, or the result itself when it is a single payload."""
        if self.items or "items" in self.payload:
            return list(self.items)
        return [self]


@dataclass
class Breakdown:
    """Clustering before/after one generator, recomputed for the report on a seeded test sample.

    ``confusion_pre``/``confusion_post`` are Hungarian-aligned classes x clusters counts;
    ``grid_*`` hold the few images of the Fig. 1 grid (floats in [0, 1]) and their clusters;
    ``scores`` is ``attacks.evaluate_attack``'s dict on the whole sample; ``image_queries``
    counts the victim queries the report itself made (locally, outside any budget).
    """

    model: str
    dataset: str
    victim: str
    generator: str
    generator_run_id: str
    gradient_source: str
    norm: str
    eps: float
    seed: int
    sample_seed: int
    n_images: int
    image_queries: int
    scores: dict[str, Any]
    confusion_pre: np.ndarray
    confusion_post: np.ndarray
    grid_clean: np.ndarray
    grid_adv: np.ndarray
    grid_labels: np.ndarray
    grid_pre: np.ndarray
    grid_post: np.ndarray
    class_names: tuple[str, ...] = ()
    cluster_names: dict[int, str] = field(default_factory=dict)
    cluster_order: np.ndarray | None = None  # cluster id of each confusion column (None: 0..K-1)
    selection: str = ""  # selection objective of the sweep row the generator came from
    seeds: str = ""  # that row's seed runs
    code: str = ""  # the code commit that computed this breakdown ("<commit>" or "<commit> (dirty)")
    run_id: str = ""  # the analysis run that holds it ("" when the report recomputed it)


@dataclass
class ReportData:
    """Everything the report shows; any part may be missing (None or empty)."""

    title: str
    tracking_uri: str
    generated_at: str
    dataset: str | None = None
    sweep: SweepTables | None = None
    analyses: dict[str, AnalysisResult] = field(default_factory=dict)
    breakdowns: list[Breakdown] = field(default_factory=list)
    breakdown_error: str = ""
    commands: dict[str, str] = field(default_factory=default_commands)
    notes: list[str] = field(default_factory=list)
    #: The analyses the sweep asked for (its parent run's ``analyses.requested`` tag).
    requested: tuple[str, ...] = ()
