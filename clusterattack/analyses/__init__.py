"""Analyses over trained victims and generators: transfer matrices, norm curves, defenses (section 6).

``run_transfer``/``run_norm_curves`` fan out as Ray tasks; ``run_detection``, ``run_pca``
and ``run_retraining`` drive ``clusterattack.defenses``. Each result logs to MLflow
experiment ``analyses`` under the contract of ``clusterattack.tracking.analyses``.
"""

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
from clusterattack.analyses.transfer import (
    TransferConfig,
    TransferResult,
    log_transfer,
    run_transfer,
)

__all__ = [
    "CHEAP_ATTACK",
    "AnalysisResult",
    "DetectionConfig",
    "LoadedGenerator",
    "NormCurvesConfig",
    "NormCurvesResult",
    "PCAConfig",
    "RetrainingConfig",
    "TransferConfig",
    "TransferResult",
    "log_norm_curves",
    "log_result",
    "log_transfer",
    "resolve_generator",
    "run_detection",
    "run_norm_curves",
    "run_pca",
    "run_retraining",
    "run_transfer",
]
