"""Attack, constraint and GAN losses: values on cases whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from clusterattack.attacks import attack_objective, constraint_penalty, soft_mutual_information
from clusterattack.attacks.losses import discriminator_loss, generator_gan_loss, membership_distance


def onehot(labels, k):
    return torch.nn.functional.one_hot(torch.as_tensor(labels), k).float()


def test_mutual_information_of_a_clustering_with_itself_is_its_entropy():
    p = onehot([0, 1, 2, 0, 1, 2], 3)
    assert soft_mutual_information(p, p).item() == pytest.approx(math.log(3), abs=1e-4)


def test_mutual_information_is_zero_when_the_perturbed_clustering_is_independent():
    clean = onehot([0, 0, 1, 1], 2)
    perturbed = onehot([0, 1, 0, 1], 2)
    assert soft_mutual_information(clean, perturbed).item() == pytest.approx(0.0, abs=1e-5)
    collapsed = onehot([1, 1, 1, 1], 2)
    assert soft_mutual_information(clean, collapsed).item() == pytest.approx(0.0, abs=1e-5)


def test_paper_objective_is_minus_the_membership_distance():
    clean = onehot([0, 1], 2)
    moved = onehot([1, 0], 2)
    assert membership_distance(clean, moved).item() == pytest.approx(2.0)
    assert attack_objective(clean, moved, "paper").item() == pytest.approx(-2.0)
    assert attack_objective(clean, clean, "paper").item() == pytest.approx(0.0)


def test_sharpening_keeps_flat_memberships_from_hiding_an_unchanged_argmax():
    clean = onehot([0, 1, 0, 1], 2)
    flat = torch.tensor([[0.55, 0.45], [0.45, 0.55]] * 2)
    soft = attack_objective(clean, flat, "mutual_info", mi_temperature=1.0)
    sharp = attack_objective(clean, flat, "mutual_info", mi_temperature=0.1)
    assert soft.item() < 0.01 < sharp.item()


def test_targeted_objective_pulls_towards_the_target_cluster():
    clean = onehot([0, 1, 2], 3)
    at_target = onehot([2, 2, 2], 3)
    elsewhere = onehot([0, 1, 0], 3)
    assert attack_objective(clean, at_target, "paper", target_cluster=2).item() == pytest.approx(0.0)
    assert attack_objective(clean, elsewhere, "paper", target_cluster=2).item() == pytest.approx(2.0)
    soft = torch.tensor([[0.5, 0.25, 0.25]])
    assert attack_objective(soft, soft, "mutual_info", target_cluster=0).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="target_cluster must lie in 0..2, got 3"):
        attack_objective(clean, elsewhere, "paper", target_cluster=3)


def test_attack_objective_rejects_mismatched_shapes_and_unknown_losses():
    with pytest.raises(ValueError, match="N x K"):
        attack_objective(torch.zeros(3, 2), torch.zeros(3, 3), "paper")
    with pytest.raises(ValueError, match="'kl'"):
        attack_objective(torch.zeros(3, 2), torch.zeros(3, 2), "kl")


def test_constraint_penalises_only_the_excess_over_eps():
    raw = torch.zeros(2, 1, 2, 2)
    raw[0, 0, 0, 0] = 0.3  # L-inf 0.3, L2 0.3
    assert constraint_penalty(raw, "linf", 0.1).item() == pytest.approx(0.1)  # (0.2 + 0) / 2
    assert constraint_penalty(raw, "l2", 0.5).item() == pytest.approx(0.0)


@pytest.mark.parametrize("kind", ["lsgan", "log"])
def test_gan_losses_reward_the_right_side(kind):
    confident_real, confident_fake = torch.full((4,), 8.0), torch.full((4,), -8.0)
    good_d = discriminator_loss(confident_real, confident_fake, kind)
    bad_d = discriminator_loss(confident_fake, confident_real, kind)
    assert good_d.item() < bad_d.item()
    assert generator_gan_loss(confident_real, kind).item() < generator_gan_loss(confident_fake, kind).item()
    with pytest.raises(ValueError, match="'wgan'"):
        generator_gan_loss(confident_real, "wgan")


def test_auto_temperature_sharpens_the_term_for_soft_memberships_only():
    from clusterattack.attacks.config import AttackConfig
    from clusterattack.attacks.losses import (
        SOFT_MI_TEMPERATURE,
        config_objective,
        resolve_mi_temperature,
    )

    soft = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])  # mean largest 0.5 < 0.6
    sharp = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])  # 0.85
    assert resolve_mi_temperature("auto", soft) == SOFT_MI_TEMPERATURE == 0.3
    assert resolve_mi_temperature("auto", sharp) == 1.0
    assert resolve_mi_temperature(0.5, soft) == resolve_mi_temperature(0.5, sharp) == 0.5
    assert AttackConfig().mi_temperature == "auto"
    # The config's "auto" reaches the term as the number the clean memberships call for.
    perturbed = torch.tensor([[0.4, 0.35, 0.25], [0.3, 0.4, 0.3]])
    for clean, number in ((soft, 0.3), (sharp, 1.0)):
        auto = config_objective(clean, perturbed, AttackConfig())
        assert auto.item() == pytest.approx(attack_objective(clean, perturbed, "mutual_info", mi_temperature=number).item())
    with pytest.raises(ValueError, match="'auto' or a number > 0"):
        AttackConfig(mi_temperature="sharp")
    with pytest.raises(ValueError, match="'auto' or a number > 0"):
        AttackConfig(mi_temperature=0.0)


@pytest.mark.parametrize(
    ("scale", "temperature", "warned", "used"),
    [(0.2, 1.0, True, 1.0), (0.2, 0.3, False, 0.3), (3.0, 1.0, False, 1.0), (0.2, "auto", False, 0.3),
     (3.0, "auto", False, 1.0)],
)
def test_soft_memberships_under_an_unsharpened_mi_term_are_pointed_out(
    blobs, config, caplog, scale, temperature, warned, used
):
    from clusterattack.attacks import train_generator
    from tests.attacks.conftest import LinearSoftmaxVictim

    soft = LinearSoftmaxVictim(blobs[3], scale=scale).eval()
    with torch.no_grad():
        confidence = float(soft.predict_proba(blobs[0]).max(1).values.mean())
    assert (confidence < 0.6) == (scale < 1), confidence
    cfg = config(gradient_source="whitebox", epochs=1, mi_temperature=temperature)
    with caplog.at_level("INFO", logger="clusterattack.attacks"):
        result = train_generator(soft, blobs[0], cfg, progress=False)
    assert any("memberships are soft" in r.getMessage() for r in caplog.records) is warned
    # What the run trained with, "auto" resolved from the clean memberships it queried.
    assert result.mi_temperature == used and result.summary()["mi_temperature"] == used
    assert result.config.mi_temperature == temperature  # the config as given is what is recorded
    assert any(f"mi_temperature auto: {used:g}" in r.getMessage() for r in caplog.records) is (temperature == "auto")
