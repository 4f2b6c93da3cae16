"""Analyses over trained victims and generators: transfer matrices, norm curves, defenses (section 6).

``run_transfer``/``run_norm_curves`` fan out as Ray tasks; ``run_detection``, ``run_pca``
and ``run_retraining`` drive ``clusterattack.defenses``; ``run_baselines`` compares a
generator with per-image attacks at equal total queries (Appendix E). Run by hand, each
result logs to MLflow experiment ``analyses``; ``run_sweep_analyses`` runs them all on a
sweep's own generators, each as a child run of the sweep (``clusterattack.analyses.suite``),
under the contract of ``clusterattack.tracking.analyses``.
"""

from clusterattack.analyses.baselines import BaselinesConfig, run_baselines
from clusterattack.analyses.common import CHEAP_ATTACK, LoadedGenerator, resolve_generator
from clusterattack.analyses.defenses import (
    AnalysisResult,
    DetectionConfig,
    PCAConfig,
    RetrainingConfig,
    log_result,
    run_detection,
    run_pca,
    run_retraining,
)
from clusterattack.analyses.norm_curves import (
    NormCurvesConfig,
    NormCurvesResult,
    log_norm_curves,
    run_norm_curves,
)
from clusterattack.analyses.suite import (
    ANALYSES,
    AnalysisSizes,
    AnalysisStatus,
    SweepAnalysisRequest,
    parse_analyses,
    request_from_sweep,
    run_sweep_analyses,
)
from clusterattack.analyses.transfer import (
    TransferConfig,
    TransferResult,
    log_transfer,
    run_transfer,
)

__all__ = [
    "ANALYSES",
    "CHEAP_ATTACK",
    "AnalysisResult",
    "AnalysisSizes",
    "AnalysisStatus",
    "BaselinesConfig",
    "DetectionConfig",
    "LoadedGenerator",
    "NormCurvesConfig",
    "NormCurvesResult",
    "PCAConfig",
    "RetrainingConfig",
    "SweepAnalysisRequest",
    "TransferConfig",
    "TransferResult",
    "log_norm_curves",
    "log_result",
    "log_transfer",
    "parse_analyses",
    "request_from_sweep",
    "resolve_generator",
    "run_baselines",
    "run_detection",
    "run_norm_curves",
    "run_pca",
    "run_retraining",
    "run_sweep_analyses",
    "run_transfer",
]
