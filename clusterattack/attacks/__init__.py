"""The generator attack of Chhabra et al. (NeurIPS 2022) with white-box, estimated and surrogate gradients.

``run_attack`` trains a generator against a victim (anything with ``predict_proba``) and
evaluates it on a test split; ``AttackConfig`` holds every setting, validated when built.
``make_baseline`` gives the per-image score-based baselines (NES, SPSA, Square).
"""

from clusterattack.attacks.baselines import BASELINES, make_baseline
from clusterattack.attacks.config import AttackConfig, EstimatorConfig, SurrogateConfig
from clusterattack.attacks.counting import CountingVictim, calls_of, read_counts
from clusterattack.attacks.discriminator import Discriminator
from clusterattack.attacks.evaluate import evaluate_attack
from clusterattack.attacks.gan import (
    AttackResult,
    ConvergenceTracker,
    perturb_images,
    train_generator,
)
from clusterattack.attacks.generator import Generator, perturbation_norms, project_perturbation
from clusterattack.attacks.gradients import (
    EstimateSource,
    GradientSource,
    SurrogateSource,
    WhiteBoxSource,
    make_gradient_source,
)
from clusterattack.attacks.losses import (
    attack_objective,
    constraint_penalty,
    soft_mutual_information,
)
from clusterattack.attacks.run import AttackReport, evaluate_generator, run_attack

__all__ = [
    "BASELINES",
    "AttackConfig",
    "AttackReport",
    "AttackResult",
    "ConvergenceTracker",
    "CountingVictim",
    "Discriminator",
    "EstimateSource",
    "EstimatorConfig",
    "Generator",
    "GradientSource",
    "SurrogateConfig",
    "SurrogateSource",
    "WhiteBoxSource",
    "attack_objective",
    "calls_of",
    "constraint_penalty",
    "evaluate_attack",
    "evaluate_generator",
    "make_baseline",
    "make_gradient_source",
    "perturb_images",
    "perturbation_norms",
    "project_perturbation",
    "read_counts",
    "run_attack",
    "soft_mutual_information",
    "train_generator",
]
