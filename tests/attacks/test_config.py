"""AttackConfig: bad values rejected with the value named, round trips, overrides."""

from __future__ import annotations

import pytest
import torch

from clusterattack.attacks import AttackConfig, EstimatorConfig, SurrogateConfig

BAD = [
    ({"norm": "l1"}, "norm"),
    ({"eps": 0.0}, "eps"),
    ({"eps": -0.1}, "eps"),
    ({"eps": float("nan")}, "eps"),
    ({"eps": 1.5}, "eps"),
    ({"attack_loss": "kl"}, "attack_loss"),
    ({"gan_loss": "wgan"}, "gan_loss"),
    ({"gradient_source": "oracle"}, "gradient_source"),
    ({"alpha_a": -1.0}, "alpha_a"),
    ({"alpha_c": -1.0}, "alpha_c"),
    ({"target_cluster": -1}, "target_cluster"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 1}, "batch_size"),
    ({"lr": 0.0}, "lr"),
    ({"lr_milestones": (0,)}, "lr_milestones"),
    ({"train_limit": 1}, "train_limit"),
    ({"seed": 1.5}, "seed"),
    ({"device": ""}, "device"),
    ({"mi_temperature": 0.0}, "mi_temperature"),
    ({"attack_loss": "hinge"}, "attack_loss"),
]


@pytest.mark.parametrize(("changes", "name"), BAD)
def test_bad_attack_config_is_rejected_naming_the_field(changes, name):
    with pytest.raises(ValueError, match=name):
        AttackConfig(**changes)


@pytest.mark.parametrize(
    ("cls", "changes", "name"),
    [
        (EstimatorConfig, {"method": "fd"}, "method"),
        (EstimatorConfig, {"samples": 0}, "samples"),
        (EstimatorConfig, {"sigma": 0.0}, "sigma"),
        (EstimatorConfig, {"resolution": 0.0}, "resolution"),
        (EstimatorConfig, {"resolution": 1.5}, "resolution"),
        (SurrogateConfig, {"distill_queries": 0}, "distill_queries"),
        (SurrogateConfig, {"refresh_rounds": -1}, "refresh_rounds"),
        (SurrogateConfig, {"ensemble": 0}, "ensemble"),
        (SurrogateConfig, {"loss": "mse"}, "loss"),
        (SurrogateConfig, {"arch": "resnet"}, "surrogate.arch"),
        (SurrogateConfig, {"pretext_epochs": 0}, "surrogate.pretext_epochs"),
    ],
)
def test_bad_nested_config_is_rejected(cls, changes, name):
    with pytest.raises(ValueError, match=name):
        cls(**changes)


def test_l2_eps_may_exceed_one():
    assert AttackConfig(norm="l2", eps=2.0).eps == 2.0


def test_config_round_trips_through_dict_and_flat_form():
    cfg = AttackConfig(eps=0.05, lr_milestones=(5, 8)).override(**{"estimator.samples": 7})
    assert AttackConfig.from_dict(cfg.to_dict()) == cfg
    assert AttackConfig.from_dict(cfg.flat()) == cfg
    assert cfg.flat()["estimator.samples"] == 7


def test_override_validates_and_rejects_unknown_keys():
    cfg = AttackConfig()
    assert cfg.override(eps=0.2, **{"surrogate.ensemble": 3}).surrogate.ensemble == 3
    with pytest.raises(ValueError, match="unknown attack config key 'epsilon'"):
        cfg.override(epsilon=0.2)
    with pytest.raises(ValueError, match="eps"):
        cfg.override(eps=-1.0)
    with pytest.raises(ValueError, match="unknown attack config key"):
        AttackConfig.from_dict({"bogus": 1})
    # A nested key this version does not know (a file from another version) is named, not a TypeError.
    saved = cfg.to_dict()
    saved["surrogate"]["feature_weight"] = 1.0
    with pytest.raises(ValueError, match=r"surrogate\.feature_weight; surrogate takes \["):
        AttackConfig.from_dict(saved)
    with pytest.raises(ValueError, match=r"estimator\.rounds"):
        AttackConfig.from_dict({"estimator.rounds": 3})


def test_a_generator_file_from_another_version_is_refused_by_name(tmp_path):
    from clusterattack.attacks.generator import Generator
    from clusterattack.attacks.io import load_generator, save_generator

    cfg = AttackConfig(generator_width=4)
    path = save_generator(Generator((1, 8, 8), 4, cfg.generator_blocks), cfg, tmp_path / "g.pt")
    assert load_generator(path)[1] == cfg
    blob = torch.load(path, weights_only=True)
    blob["config"]["surrogate"]["feature_weight"] = 1.0
    torch.save(blob, path)
    with pytest.raises(ValueError, match="g.pt: its attack config does not load.*surrogate.feature_weight"):
        load_generator(path)


def test_query_cost_helpers():
    assert EstimatorConfig(samples=4).queries_per_image() == 9
    sur = SurrogateConfig(distill_queries=1000, noise_queries=500, refresh_rounds=2, refresh_queries=100)
    assert sur.total_queries() == 1700
    assert AttackConfig(gradient_source="whitebox").black_box is False
    assert AttackConfig(gradient_source="estimate").black_box is True


def test_attack_run_names_tell_apart_what_changes_the_attack():
    from clusterattack.tracking.attacks import attack_run_name

    base = AttackConfig()
    assert attack_run_name("cc", base) == "cc-surrogate-linf-eps0.1-s0"
    # Two runs that differ only in the sharpening of the MI term no longer share a name.
    assert attack_run_name("mice", base.override(mi_temperature=0.3)) == "mice-surrogate-linf-eps0.1-T0.3-s0"
    # The surrogate is distilled on shifted and flipped images by default; a run without says so.
    assert base.surrogate.augment is True
    plain = base.override(**{"surrogate.augment": False})
    assert attack_run_name("ruc", plain) == "ruc-surrogate-linf-eps0.1-noaug-s0"
    assert attack_run_name("ruc", base.override(**{"surrogate.augment": True})) == "ruc-surrogate-linf-eps0.1-s0"
    black = base.override(
        gradient_source="estimate", eps=0.05, seed=3,
        **{"estimator.prior": "surrogate", "estimator.samples": 1, "surrogate.arch": "pretext"},
    )
    assert attack_run_name("scan", black) == "scan-estimate-linf-eps0.05-pretext-q1-prior-surrogate-s3"
    # A targeted run says so; its (unused) temperature and an unused surrogate arch do not show.
    targeted = base.override(
        gradient_source="whitebox", norm="l2", eps=2.0, target_cluster=4, mi_temperature=0.3,
        **{"surrogate.arch": "pretext"},
    )
    assert attack_run_name("ruc", targeted) == "ruc-whitebox-l2-eps2-target4-s0"
    assert attack_run_name("nnm", base.override(attack_loss="paper", **{"surrogate.ensemble": 3})) == (
        "nnm-surrogate-linf-eps0.1-paper-ens3-s0"
    )
    ensemble = base.override(**{"surrogate.arch": "pretext", "surrogate.ensemble": 2})
    assert attack_run_name("nnm", ensemble) == "nnm-surrogate-linf-eps0.1-pretext-ens2-s0"
    # Loss weights, the generator's images and its learning-rate steps each change a result.
    tuned = base.override(
        alpha_a=100.0, alpha_gan=0.0, train_limit=60000, lr_milestones=(4, 6), lr_gamma=0.3, select_images=2000
    )
    assert attack_run_name("spice", tuned) == "spice-surrogate-linf-eps0.1-aa100-ag0-n60000-lr4_6x0.3-sel2000-s0"


RETIRED = [
    ("surrogate.online_steps", 4, "one surrogate fine-tuning step"),
    ("surrogate.finetune_augment", True, "as they are"),
    ("surrogate.diversity", "shift_flip", "through the image itself"),
    ("surrogate.diversity_draws", 4, "views were retired"),
    ("surrogate.input_diversity", 1.0, "views were retired"),
    ("surrogate.backbones", "shared", "one attacker backbone per ensemble member"),
    ("margin_kappa", 2.0, "margin"),
]


@pytest.mark.parametrize(("key", "value", "replacement"), RETIRED)
def test_a_retired_key_is_refused_naming_what_replaced_it(key, value, replacement):
    from clusterattack.attacks.config import RETIRED_KEYS

    assert key in RETIRED_KEYS and key not in AttackConfig().flat()
    with pytest.raises(ValueError, match=rf"{key.replace('.', '[.]')}' was retired: .*{replacement}"):
        AttackConfig().override(**{key: value})
    with pytest.raises(ValueError, match="attack_loss='margin' was retired: use attack_loss 'mutual_info'"):
        AttackConfig().override(attack_loss="margin")


def test_records_of_retired_keys_still_load():
    """A checkpoint, generator file or MLflow record written before the retirement: keys whose
    value is what the code now does are dropped; others refuse to train and load to perturb."""
    old = AttackConfig(eps=0.05).to_dict()
    old["surrogate"].update(online_steps=1, finetune_augment=False, diversity="none", diversity_draws=1,
                            input_diversity=2.0, backbones="shared")  # fmt: skip
    old["margin_kappa"] = 1.0
    assert AttackConfig.from_dict(old) == AttackConfig(eps=0.05)
    flat = {**AttackConfig().flat(), "surrogate.backbones": "distinct", "surrogate.online_steps": 1}
    assert AttackConfig.from_dict(flat) == AttackConfig()
    # "shared" backbones under an ensemble of pretext members ran another attack.
    shared = {**flat, "surrogate.arch": "pretext", "surrogate.ensemble": 2, "surrogate.backbones": "shared"}
    with pytest.raises(ValueError, match="surrogate.backbones='shared' was retired"):
        AttackConfig.from_dict(shared)
    assert AttackConfig.from_dict(shared, retired="drop").surrogate.ensemble == 2
    views = {**AttackConfig().to_dict(), "attack_loss": "margin"}
    with pytest.raises(ValueError, match="attack_loss='margin' was retired"):
        AttackConfig.from_dict(views)
    assert AttackConfig.from_dict(views, retired="drop").attack_loss == "mutual_info"
    with pytest.raises(ValueError, match="retired must be 'error' or 'drop'"):
        AttackConfig.from_dict(flat, retired="ignore")


def test_attack_terms_and_gradient_sources_are_registries_the_config_follows():
    from clusterattack.attacks.config import ATTACK_LOSSES, GRADIENT_SOURCES
    from clusterattack.attacks.gradients import GRADIENT_SOURCE_FACTORIES
    from clusterattack.attacks.losses import ATTACK_TERMS

    assert ATTACK_LOSSES == tuple(ATTACK_TERMS) == ("paper", "mutual_info")
    assert set(GRADIENT_SOURCES) == set(GRADIENT_SOURCE_FACTORIES) == {"whitebox", "estimate", "surrogate"}
    assert len(AttackConfig().flat()) == 49  # 55 before the seven retired keys; online_fraction since
