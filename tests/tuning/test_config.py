"""SweepConfig and search spaces: presets build, bad values are rejected by name, defaults near the authors'."""

from __future__ import annotations

import math

import pytest

from clusterattack.attacks.config import AttackConfig
from clusterattack.tuning.config import SweepConfig
from clusterattack.tuning.space import (
    DEFAULT_SPACE,
    ParamSpec,
    grid_configs,
    parse_space,
    tune_space,
)


@pytest.mark.parametrize("name", ["tiny", "demo", "paper"])
def test_presets_build_and_round_trip_through_the_state_file_form(name):
    config = SweepConfig.preset(name, experiment="x")
    assert config.preset_name == name
    assert SweepConfig.from_dict(config.to_dict()) == config
    assert set(config.gradient_sources) <= {"estimate", "surrogate"}
    # Label-free by default: the attacker holds images out of its own pool to choose on.
    assert config.objective == "label_free" and config.attack.select_images >= 2
    assert 0.1 in config.eps_grid and config.seeds >= 2


def test_presets_cover_what_each_is_for():
    from clusterattack.victims.registry import VICTIMS

    tiny, demo, paper = (SweepConfig.preset(n) for n in ("tiny", "demo", "paper"))
    assert tiny.targets == (("cc", "digits"),) and tiny.victim_epochs == 1 and tiny.attack.epochs <= 3
    assert {d for _, d in demo.targets} == {"fashion_mnist"} and 2 <= len(demo.targets) <= 3
    assert {m for m, _ in paper.targets} == set(VICTIMS)
    assert paper.gpus_per_trial > 0 and paper.attack.device == "cuda" and paper.skip_missing_datasets
    assert tiny.experiment.startswith("tiny-")
    assert paper.seeds == 3 and demo.seeds == 2 and paper.eps_grid == (0.05, 0.1, 0.15, 0.2)
    assert demo.eps_grid == (0.1,)


def test_overrides_reach_the_attack_config():
    config = SweepConfig.preset("tiny", gradient_source="estimate", norm="l2", epochs=2, **{"estimator.samples": 2})
    assert config.attack.gradient_source == "estimate" and config.gradient_sources == ("estimate",)
    assert config.attack.norm == "l2" and config.attack.epochs == 2
    assert config.attack.estimator.samples == 2
    assert config.asha_max_t == 2


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"targets": ()}, "targets"),
        ({"targets": (("nope", "digits"),)}, "nope"),
        ({"targets": (("cc", "digits"), ("cc", "digits"))}, "repeat"),
        ({"gradient_source": "whitebox"}, "whitebox"),
        ({"budget": 0}, "budget"),
        ({"num_samples": 0}, "num_samples"),
        ({"time_attr": "seconds"}, "seconds"),
        ({"max_t": 10}, "max_t"),
        ({"grace_period": 7}, "grace_period"),
        ({"reduction_factor": 1.0}, "reduction_factor"),
        ({"cpus_per_trial": 0}, "cpus_per_trial"),
        ({"gpus_per_trial": -1}, "gpus_per_trial"),
        ({"gpus_per_trial": 1.0}, "gpus_per_trial"),
        ({"device": "cuda"}, "gpus_per_trial"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"max_failures": -1}, "max_failures"),
        ({"eval_limit": 1}, "eval_limit"),
        ({"victim_preset": "huge"}, "huge"),
        ({"experiment": "a b/c"}, "a b/c"),
        ({"serve_port": 70000}, "70000"),
        ({"storage": ""}, "storage"),
        ({"no_such_setting": 1}, "no_such_setting"),
        ({"space": (ParamSpec("not_a_field", "uniform", 0.0, 1.0),)}, "not_a_field"),
        ({"space": (ParamSpec("seed", "choice", values=(0, 1)),)}, "seed"),
        ({"space": (ParamSpec("eps", "uniform", 0.1, 1.5),)}, "eps"),
        ({"space": (ParamSpec("select_images", "choice", values=(8, 16)),)}, "select_images"),
        ({"space": ()}, "space"),
        ({"eps": 0.1}, "eps_grid"),
        ({"eps_grid": ()}, "eps_grid"),
        ({"eps_grid": (0.1, 0.1)}, "repeat"),
        ({"eps_grid": (0.1, 1.5)}, "1.5"),
        ({"gradient_sources": ("surrogate", "whitebox")}, "whitebox"),
        ({"gradient_sources": ("surrogate", "surrogate")}, "repeats"),
        ({"objective": "labels"}, "labels"),
        ({"select_images": 0}, "select_images"),
        ({"seeds": 0}, "seeds"),
        ({"recipe": "huge"}, "huge"),
    ],
)
def test_bad_values_are_rejected_naming_them(changes, named):
    with pytest.raises(ValueError, match=named):
        SweepConfig.preset("tiny", **changes)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"name": "eps", "kind": "normal", "low": 0.0, "high": 1.0}, "normal"),
        ({"name": "eps", "kind": "uniform", "low": 0.2, "high": 0.1}, "low < high"),
        ({"name": "alpha_a", "kind": "loguniform", "low": 0.0, "high": 1.0}, "low > 0"),
        ({"name": "eps", "kind": "uniform", "low": float("nan"), "high": 1.0}, "low"),
        ({"name": "eps", "kind": "choice", "values": ()}, "non-empty"),
        ({"name": "", "kind": "uniform", "low": 0.0, "high": 1.0}, "field name"),
    ],
)
def test_bad_search_dimensions_are_rejected(kwargs, named):
    with pytest.raises(ValueError, match=named):
        ParamSpec(**kwargs)


def test_default_space_sits_around_the_authors_values():
    space = {spec.name: spec for spec in DEFAULT_SPACE}
    # eps is a grid of the sweep, never sampled; mi_temperature is "auto" (the attack's choice
    # from the clean memberships it queried), not searched.
    assert set(space) == {"alpha_a", "alpha_c"}
    # The authors used alpha_a 5..30, alpha_c (pert weight) 1.
    assert space["alpha_a"].kind == "loguniform" and space["alpha_a"].low <= 5 and space["alpha_a"].high >= 30
    assert space["alpha_c"].kind == "loguniform" and space["alpha_c"].low < 1 < space["alpha_c"].high
    domains = tune_space(DEFAULT_SPACE)
    samples = [domains["alpha_a"].sample() for _ in range(200)]
    assert all(1.0 <= s <= 50.0 for s in samples)
    # Log-uniform: about half the draws below the geometric midpoint (~7.1).
    below = sum(s < math.sqrt(50.0) for s in samples) / len(samples)
    assert 0.35 < below < 0.65


def test_space_text_form_parses_and_overrides():
    space = parse_space(["eps=choice:0.05,0.1", "alpha_c=uniform:0.5:2"])
    by_name = {s.name: s for s in space}
    assert by_name["eps"] == ParamSpec("eps", "choice", values=(0.05, 0.1))
    assert by_name["alpha_c"] == ParamSpec("alpha_c", "uniform", 0.5, 2.0)
    assert by_name["alpha_a"] == DEFAULT_SPACE[0]
    for spec in space:
        assert ParamSpec.parse(spec.describe()) == spec
    with pytest.raises(ValueError, match="NAME=loguniform"):
        ParamSpec.parse("eps")
    with pytest.raises(ValueError, match="numbers"):
        ParamSpec.parse("eps=uniform:a:b")


def test_grid_is_geometric_for_log_dimensions_and_covers_every_combination():
    grid = grid_configs(DEFAULT_SPACE, {"alpha_a": 3, "alpha_c": 2})
    assert len(grid) == 6  # 3 x 2
    alphas = sorted({g["alpha_a"] for g in grid})
    assert alphas[0] == pytest.approx(1.0) and alphas[-1] == pytest.approx(50.0)
    assert alphas[1] == pytest.approx(math.sqrt(50.0))
    for point in grid:
        AttackConfig().override(**point)  # every grid point is a valid attack


def test_train_pool_covers_the_surrogate_distillation_and_the_hold_out():
    sizes = {"train_limit": 100, "surrogate.distill_queries": 300, "select_images": 50}
    # 300 distilled memberships (more than the generator's 100 images) and 50 held out.
    assert SweepConfig.preset("tiny", **sizes).train_pool == 350
    assert SweepConfig.preset("tiny", gradient_source="estimate", **sizes).train_pool == 150
    assert SweepConfig.preset("tiny", gradient_sources=("estimate", "surrogate"), **sizes).train_pool == 350


def test_the_l2_norm_gets_l2_radii_unless_some_are_given():
    from clusterattack.tuning.config import L2_EPS_GRID

    assert SweepConfig.preset("demo", norm="l2").eps_grid == L2_EPS_GRID == (0.5, 1.0, 2.0)
    assert SweepConfig.preset("demo", norm="l2", eps_grid=(1.5,)).eps_grid == (1.5,)


def test_a_recipe_applies_before_flags_and_is_recorded():
    config = SweepConfig.preset("tiny", recipe="strong", epochs=2, **{"surrogate.refresh_rounds": 0})
    assert config.recipe == "strong"
    # From the recipe: two surrogates on attacker backbones of their own.
    assert config.attack.surrogate.ensemble == 2 and config.attack.surrogate.arch == "pretext"
    # Flags win over it.
    assert config.attack.epochs == 2 and config.attack.surrogate.refresh_rounds == 0
    # Everything else of the preset stays (the recipe names only its own keys).
    assert config.attack.train_limit == SweepConfig.preset("tiny").attack.train_limit
    assert SweepConfig.from_dict(config.to_dict()) == config


def test_presets_run_the_fast_recipe_unless_told_and_another_recipe_whole():
    from clusterattack.attacks.recipes import RECIPES
    from clusterattack.tuning.presets import PRESET_RECIPES

    def differs(config, recipe):
        reference = AttackConfig().override(**RECIPES[recipe].overrides).flat()
        return {k for k, v in config.attack.flat().items() if v != reference[k]}

    # The measured winner of the attack-cost benchmark is the black-box trials' default.
    assert PRESET_RECIPES["demo"] == PRESET_RECIPES["paper"] == SweepConfig().recipe == "fast"
    assert differs(SweepConfig(), "fast") == {"select_images"}
    paper = SweepConfig.preset("paper")
    assert paper.recipe == "fast" and differs(paper, "fast") == {"select_images", "device"}
    # The demo tunes its own recipe down to its time ...
    demo = SweepConfig.preset("demo")
    assert demo.recipe == "fast" and {"epochs", "train_limit"} <= differs(demo, "fast")
    # ... and a named recipe, its own included, runs whole: the tuning goes, hold-out and device stay.
    for preset, sizes in (("demo", {"select_images"}), ("paper", {"select_images", "device"})):
        for recipe in ("strong", "default", "fast"):
            config = SweepConfig.preset(preset, recipe=recipe)
            assert config.recipe == recipe and differs(config, recipe) == sizes, (preset, recipe)
    # A recipe is chosen with the preset; relabelling a built sweep would record what did not run.
    with pytest.raises(ValueError, match="preset"):
        demo.replace(recipe="strong")
    assert demo.replace(recipe="fast", seeds=3).seeds == 3


def test_seed_runs_take_fresh_seeds_and_oracle_runs_hold_nothing_out():
    config = SweepConfig.preset("tiny", seeds=3, **{"seed": 5})
    assert config.final_seeds() == (6, 7, 8)  # none is the search trials' seed 5
    assert config.attack_for("estimate").gradient_source == "estimate"
    assert config.attack_for("estimate").select_images == config.attack.select_images
    oracle = SweepConfig.preset("tiny", objective="oracle")
    assert oracle.attack_for("surrogate").select_images == 0
