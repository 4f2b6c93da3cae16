"""Figures and the static HTML report (pure: data in, files out; no store access here).

``ReportData`` (``clusterattack.reports.data``) is what a report shows;
``write_report(ReportData, folder)`` writes ``index.html`` with PNG figures beside it;
``clusterattack.tracking.reports`` gathers the ``ReportData`` of a sweep from MLflow, and
``clusterattack.reports.breakdown`` recomputes confusion matrices and the image grid.
"""

from clusterattack.reports.analysis_sections import ANALYSIS_KINDS
from clusterattack.reports.data import (
    AnalysisResult,
    Breakdown,
    ReportData,
    SweepTables,
    default_commands,
)
from clusterattack.reports.report import write_report

__all__ = [
    "ANALYSIS_KINDS",
    "AnalysisResult",
    "Breakdown",
    "ReportData",
    "SweepTables",
    "default_commands",
    "write_report",
]
