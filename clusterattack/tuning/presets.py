"""The sweep's presets: ``tiny`` (tests), ``demo`` (``make demo`` on a laptop), ``paper`` (a GPU cluster).

A preset's attack is a named recipe (:mod:`clusterattack.attacks.recipes`) and the preset's own
settings on top: its *sizes* (machine and data: device, the attacker's hold-out, the tiny
test sizes), kept whatever the recipe, and its *tuning* of its own recipe (the demo's ``fast``
sized down to its time), dropped when ``--recipe`` names one, so that a sweep recorded as
``strong`` (or ``--recipe fast``) runs that recipe whole and not a mixture of it and the
preset's own. The ``tiny`` preset's sizes are the tests' schedule too (3 epochs, no refresh):
under it a named recipe is sized down as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from clusterattack.attacks.config import AttackConfig
from clusterattack.attacks.recipes import get_recipe, recipe_attack
from clusterattack.tuning.config import PAPER_DATASETS, SweepConfig
from clusterattack.tuning.space import DEFAULT_SPACE, ParamSpec

__all__ = ["PRESET_BUILDERS", "PRESET_RECIPES", "preset_attack"]

#: preset name -> the recipe its black-box trials run unless ``--recipe`` names another.
PRESET_RECIPES = {"tiny": "default", "demo": "fast", "paper": "fast"}


def preset_attack(
    preset: str, recipe: str | None, sizes: Mapping[str, Any], tuning: Mapping[str, Any] | None = None
) -> tuple[AttackConfig, str]:
    """(the attack, its recipe's name): ``recipe`` (default: the preset's own), the preset's
    ``tuning`` of its own recipe where no recipe was named (a named one, the preset's own
    included, runs whole), then the preset's ``sizes``."""
    name = get_recipe(recipe or PRESET_RECIPES[preset]).name
    changes = {**(dict(tuning or {}) if recipe is None else {}), **sizes}
    return recipe_attack(name, changes), name


def _tiny(recipe: str | None = None) -> SweepConfig:
    """Tests: one CC victim on 8x8 digits trained for 1 epoch; 2 eps x 2 trials of up to 3 epochs,
    then 2 seeds of each eps's best. Its sizes hold whatever the recipe (the tests' time)."""
    attack, recipe = preset_attack("tiny", recipe, {
        "gradient_source": "surrogate", "epochs": 3, "batch_size": 64, "train_limit": 384, "select_images": 64,
        "surrogate.distill_queries": 384, "surrogate.distill_epochs": 3, "surrogate.refresh_rounds": 0,
        "surrogate.width": 8, "surrogate.batch_size": 128, "query_batch": 256,
    })  # fmt: skip
    return SweepConfig(
        preset_name="tiny",
        targets=(("cc", "digits"),),
        space=(
            ParamSpec("alpha_a", "loguniform", 1.0, 50.0),
            ParamSpec("alpha_c", "loguniform", 0.1, 10.0),
        ),
        eps_grid=(0.1, 0.2),
        attack=attack,
        recipe=recipe,
        seeds=2,
        budget=20_000,
        num_samples=2,
        grace_period=1,
        reduction_factor=2.0,
        eval_limit=256,
        victim_epochs=1,
        object_store_mb=128,
    )


def _demo(recipe: str | None = None) -> SweepConfig:
    """Fashion-MNIST, CC and SCAN, the ``fast`` recipe sized down, eps 0.1, label-free selection, 2 seeds.

    The ``fast`` recipe's surrogate (two members on attacker SimCLR backbones of 4 epochs, trained
    on the pool and cached per seed) on 10,000 training images for 3 epochs of generator batches
    of 64, asking the victim online about the least sure half of each batch as ``fast`` does:
    on SCAN, against batches of 128 all asked, 32.8% NMI drop against 28.1% over two seeds for
    13% less generator time and 31,000 image-queries instead of 46,000 (the seeds' spread as
    large as the gain; ``docs/results/attack-demo-scan-batch.json``). Per victim, 2 search
    trials side by side on the 2 cores (ASHA may stop the weaker after 1 of 3 epochs), then the
    best run again with 2 fresh seeds.

    The search draws alpha_a and alpha_c (the default space); ``mi_temperature`` is "auto",
    1 for CC and SCAN, whose memberships are sharp (a draw of 0.3 once cost SCAN its attack: 39.6%
    and 5.3% NMI drop at seeds 1 and 2, against 56.1% and 47.9% at 1;
    ``docs/experiments/demo-history.md``).
    """
    attack, recipe = preset_attack("demo", recipe, {"gradient_source": "surrogate", "select_images": 1_000}, {
        "epochs": 3, "train_limit": 10_000, "batch_size": 64, "surrogate.pretext_epochs": 4,
        "surrogate.distill_queries": 10_000, "surrogate.refresh_rounds": 1, "surrogate.refresh_queries": 2_000,
    })  # fmt: skip
    return SweepConfig(
        preset_name="demo",
        targets=(("cc", "fashion_mnist"), ("scan", "fashion_mnist")),
        space=DEFAULT_SPACE,
        attack=attack,
        recipe=recipe,
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


def _paper(recipe: str | None = None) -> SweepConfig:
    """All six victims on every data set present, GPU trials of the ``fast`` recipe (125,000
    image-queries per attack; ``docs/experiments/attack-cost.md``), eps 0.05 to 0.2, 3 seeds.

    The authors' schedule (120 epochs of batch 128, the learning rate cut at 50 and 80) was this
    preset's attack before ``fast`` was measured; it is ``--epochs 120 --set batch_size=128
    --set 'lr_milestones=[50,80]'`` on top of any recipe.
    """
    from clusterattack.victims.registry import VICTIMS

    attack, recipe = preset_attack("paper", recipe, {
        "gradient_source": "surrogate", "select_images": 2_000, "device": "cuda",
    })  # fmt: skip
    return SweepConfig(
        preset_name="paper",
        targets=tuple((m, d) for d in PAPER_DATASETS for m in VICTIMS),
        attack=attack,
        recipe=recipe,
        eps_grid=(0.05, 0.1, 0.15, 0.2),
        seeds=3,
        # A cap per trial's key, above any recipe's surrogate mode (the estimate mode asks more).
        budget=5_000_000,
        num_samples=8,
        grace_period=2,
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
