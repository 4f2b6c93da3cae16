"""The paper's evaluation from one sweep's own generators and victims: every analysis a child run of the sweep.

``run_sweep_analyses(request)`` runs, after a sweep's seed runs, the analyses
``request.analyses`` names over the sweep's Table 1 rows (each row: a victim version, a
gradient source, an eps, the registered generator the attacker kept) and returns what each
did. Each analysis is one Ray task (``baselines``: one per victim, their shares merged by
the driver) and one MLflow child run of the sweep's parent run
(tags ``mlflow.parentRunId``, ``analysis``, ``phase`` = "analysis", the victim versions,
generators, seeds, selection objective and code commit). An analysis that raises, or one of
whose items (rows, groups of rows) raises, ends FAILED with its error in tag ``error``; what
its other items computed is still logged, and the other analyses go on. ``request.state``
(persisted by the sweep) records each analysis's run and status, so a resumed sweep does not
redo finished ones.

The analyses, and their items:

===============  =============================================================================
breakdown        every row: confusion matrices before/after and the cluster sizes on the sweep's
                 test subset (Fig. 2), with the Fig. 1 image grid
norm_curves      every (data set, gradient source): NMI/ARI/ACC against an eps list, a generator
                 trained per (victim, eps) with the sweep's chosen configuration of the nearest
                 eps, black-box and white-box (the reference) side by side (Fig. 3)
transfer         every (data set, gradient source, eps): the matrix of the sweep's generators
                 applied to each of the data set's victims (Fig. 4)
detection        every row: SSD detection, each test image perturbed with probability 1/2, over
                 trials (section 6.2)
pca              every row: the first three principal components of clean and perturbed test
                 images and their overlap (Fig. 5b)
retraining       every victim: retrained on images of all its generators, then scored clean,
                 under those generators and under a fresh attack (footnote 12)
baselines        every (victim, gradient source) at its headline eps (nearest 0.1): the generator
                 against NES, SPSA and Square at equal total image-queries over the whole test
                 split (Appendix E; :mod:`clusterattack.analyses.baselines`)
query_detection  every (model, data set, gradient source), and the evaluator key: what the
                 stateful query detector (Blacklight-style, ``serving.detector``) saw of each
                 search trial's and seed run's key: flagged or not, queries to the flag, matched
                 fraction, images screened and charged. Asking for it turns detection on in
                 ``flag`` mode on the sweep's own deployments (answers unchanged); not in the
                 demo's list (:mod:`~clusterattack.analyses.suite.query_detection`)
===============  =============================================================================

Sizes (:class:`AnalysisSizes`, chosen by the sweep's preset; the test subset is always the
sweep's own, ``eval_limit`` images seeded by ``seed``):

================  ====================  ==========================  =========================
                  tiny (8x8 digits)     demo (Fashion-MNIST)        paper
================  ====================  ==========================  =========================
norm_curves eps   the sweep's grid      0.05, 0.1, 0.2              0.05, 0.1, 0.15, 0.2 + grid
detection         200 images x 20       the 1,000 test images x     8,000 images x 100 trials,
                  trials, fit 800,      100 trials, fit 10,000,     fit 10,000, hold-out 2,000
                  hold-out 300          hold-out 2,000              (the paper's protocol)
pca               256 images            1,000 images                2,000 images
retraining        1 epoch, 512 images   1 epoch, 10,000 images      2 epochs, 20,000 images
baselines         64 images; 25, 100    1,000 images; 25, 100, 400  1,000 images; 25 .. 1,600
================  ====================  ==========================  =========================

Baselines also run at the equal-total budget (the generator's queries / test split size)
wherever one iteration fits in it. The demo preset takes subsets: detection on the sweep's
1,000 test images instead of the paper's 8,000, three eps values on the norm curves, one
retraining epoch on 10,000 images, and baselines on the 1,000 test images (their cost per
image extrapolated over the 10,000 of the split). Fit/hold-out images of the detector are
cut to what the training split holds (STL-10's 5,000).

``query_detection`` has no sizes: it reads what the sweep's own queries left. Cost: the
other seven take about 35 s for the tiny sweep (2 busy cores). In the demo each norm-curve
point trains a generator with the sweep's settings (measured on one busy core against CC on
Fashion-MNIST: 56 s white-box, 84 s surrogate), so norm curves take about 14 minutes for CC
and SCAN in one task and bound the wall time; retraining takes about 7 (two fresh attacks per
victim); the baselines 3.5-4 minutes per victim on one core (NES, SPSA and Square at 25 to 400
queries on 1,000 images; one task per victim, so the demo's two take 231 s side by side, 444 s
when they were one task); the rest seconds.

Modules, by role: ``request`` (the names, :class:`SweepAnalysisRequest`,
:class:`AnalysisStatus`, :func:`request_from_sweep`), ``sizes`` (:class:`AnalysisSizes` and
the presets above), ``rows`` (Table 1 rows: grouping, tags, provenance), ``task`` (what one
task loads and what it logs), one module per analysis runner (``breakdown``,
``norm_curves``, ``transfer``, ``defenses`` for detection, PCA and retraining,
``baselines``, ``query_detection``), and ``driver`` (:func:`run_analysis`, the body of a task, and
:func:`run_sweep_analyses`).
"""

from clusterattack.analyses.suite.driver import run_analysis, run_sweep_analyses
from clusterattack.analyses.suite.query_detection import read_detector_state
from clusterattack.analyses.suite.request import (
    ANALYSES,
    ROW_KEYS,
    AnalysisStatus,
    SweepAnalysisRequest,
    parse_analyses,
    request_from_sweep,
)
from clusterattack.analyses.suite.rows import HEADLINE_EPS
from clusterattack.analyses.suite.sizes import AnalysisSizes

__all__ = [
    "ANALYSES",
    "HEADLINE_EPS",
    "ROW_KEYS",
    "AnalysisSizes",
    "AnalysisStatus",
    "SweepAnalysisRequest",
    "parse_analyses",
    "read_detector_state",
    "request_from_sweep",
    "run_analysis",
    "run_sweep_analyses",
]
