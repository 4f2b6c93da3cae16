"""The sweep's presets: ``tiny`` (tests), ``demo`` (``make demo`` on a laptop), ``paper`` (a GPU cluster)."""

from __future__ import annotations

from clusterattack.attacks.config import AttackConfig, SurrogateConfig
from clusterattack.attacks.recipes import apply_recipe
from clusterattack.tuning.config import PAPER_DATASETS, SweepConfig
from clusterattack.tuning.space import DEFAULT_SPACE, ParamSpec

__all__ = ["PRESET_BUILDERS"]


def _tiny() -> SweepConfig:
    """Tests: one CC victim on 8x8 digits trained for 1 epoch; 2 eps x 2 trials of up to 3 epochs,
    then 2 seeds of each eps's best."""
    attack = AttackConfig(
        gradient_source="surrogate",
        epochs=3,
        batch_size=64,
        train_limit=384,
        select_images=64,
        surrogate=SurrogateConfig(distill_queries=384, distill_epochs=3, refresh_rounds=0, width=8, batch_size=128),
        query_batch=256,
    )
    return SweepConfig(
        preset_name="tiny",
        targets=(("cc", "digits"),),
        space=(
            ParamSpec("alpha_a", "loguniform", 1.0, 50.0),
            ParamSpec("alpha_c", "loguniform", 0.1, 10.0),
        ),
        eps_grid=(0.1, 0.2),
        attack=attack,
        seeds=2,
        budget=20_000,
        num_samples=2,
        grace_period=1,
        reduction_factor=2.0,
        eval_limit=256,
        victim_epochs=1,
        object_store_mb=128,
    )


def _demo() -> SweepConfig:
    """Fashion-MNIST, CC and SCAN, the ``fast`` recipe sized down, eps 0.1, label-free selection, 2 seeds.

    The ``fast`` recipe's surrogate (two members on attacker SimCLR backbones of 4 epochs, trained
    on the pool and cached per seed) on 10,000 training images for 3 epochs, asking the victim
    online about every image (the demo is short of time, not of queries). Per victim, 2 search
    trials side by side on the 2 cores (ASHA may stop the weaker after 1 of 3 epochs), then the
    best run again with 2 fresh seeds.

    The search draws alpha_a and alpha_c only. ``mi_temperature`` 0.3 helps victims with soft
    memberships, and CC and SCAN are not soft: with 2 trials a draw of it could cost a victim
    its attack (SCAN, seeds 1 and 2, the search's alpha_a and alpha_c: 39.6% and 5.3% NMI drop at
    0.3, 56.1% and 47.9% at 1.0; ``docs/experiments/demo-history.md``).
    """
    attack = AttackConfig(gradient_source="surrogate").override(
        **apply_recipe("fast", {
            "epochs": 3, "train_limit": 10_000, "select_images": 1_000, "surrogate.online_fraction": 1.0,
            "surrogate.pretext_epochs": 4, "surrogate.distill_queries": 10_000, "surrogate.refresh_rounds": 1,
            "surrogate.refresh_queries": 2_000,
        })
    )  # fmt: skip
    return SweepConfig(
        preset_name="demo",
        targets=(("cc", "fashion_mnist"), ("scan", "fashion_mnist")),
        space=tuple(spec for spec in DEFAULT_SPACE if spec.name != "mi_temperature"),
        attack=attack,
        recipe="fast",
        eps_grid=(0.1,),
        seeds=2,
        budget=100_000,
        num_samples=2,
        grace_period=1,
        reduction_factor=3.0,
        eval_limit=1_000,
        # What fits the demo's time: norm curves and retraining train more generators.
        analyses=("breakdown", "transfer", "detection", "pca", "baselines"),
    )


def _paper() -> SweepConfig:
    """All six victims on every data set present, GPU trials, the authors' epochs and batch,
    eps 0.05 to 0.2, 3 seeds."""
    from clusterattack.victims.registry import VICTIMS

    attack = AttackConfig(
        gradient_source="surrogate",
        epochs=120,
        batch_size=128,
        lr_milestones=(50, 80),
        select_images=2_000,
        device="cuda",
        surrogate=SurrogateConfig(ensemble=2),
    )
    return SweepConfig(
        preset_name="paper",
        targets=tuple((m, d) for d in PAPER_DATASETS for m in VICTIMS),
        attack=attack,
        eps_grid=(0.05, 0.1, 0.15, 0.2),
        seeds=3,
        budget=5_000_000,
        num_samples=8,
        grace_period=10,
        reduction_factor=3.0,
        cpus_per_trial=4.0,
        gpus_per_trial=1.0,
        eval_limit=10_000,
        victim_preset="full",
        replica_cpus=1.0,
        replica_gpus=0.25,
        object_store_mb=4096,
        skip_missing_datasets=True,
        analyses=(
            "breakdown", "norm_curves", "transfer", "detection", "pca", "retraining", "baselines", "query_detection",
        ),  # fmt: skip
    )


#: preset name -> the SweepConfig it starts from (``SweepConfig.preset`` applies overrides).
PRESET_BUILDERS = {"tiny": _tiny, "demo": _demo, "paper": _paper}
