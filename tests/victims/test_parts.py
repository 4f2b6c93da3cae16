"""Shared parts of the victims: backbones per input size, augmentations, losses, neighbour mining."""

from __future__ import annotations

import math

import pytest
import torch

from clusterattack.victims.augment import STRONG, STRONGER, WEAK, AugmentConfig, augment
from clusterattack.victims.backbones import Backbone, BackboneConfig, backbone_for
from clusterattack.victims.losses import (
    cluster_contrastive,
    confident_cross_entropy,
    nt_xent,
    scan_loss,
)
from clusterattack.victims.neighbors import batch_neighbors, mine_neighbors, neighbor_agreement
from clusterattack.victims.registry import VICTIMS


@pytest.mark.parametrize("preset", ["demo", "full"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 96, 96)])
def test_backbones_fit_each_input_size(preset, shape):
    cfg = backbone_for(preset, shape)
    net = Backbone(cfg).eval()
    with torch.no_grad():
        out = net(torch.rand(2, *shape))
    assert out.shape == (2, cfg.feature_dim)
    assert cfg.arch == ("convnet" if preset == "demo" else "resnet18")


@pytest.mark.parametrize("name", sorted(VICTIMS))
def test_every_victim_builds_for_rgb_32(name):
    spec = VICTIMS[name]
    model = spec.build(spec.config((3, 32, 32), 10, "demo")).eval()
    p = model.predict_proba(torch.rand(3, 3, 32, 32))
    assert p.shape == (3, 10)
    torch.testing.assert_close(p.sum(1), torch.ones(3))


def test_backbone_config_rejects_bad_values():
    with pytest.raises(ValueError, match="arch must be one of"):
        BackboneConfig(arch="vit")
    with pytest.raises(ValueError, match="mean needs 1 or 3 values"):
        BackboneConfig(in_channels=3, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        backbone_for("huge", (1, 28, 28))


@pytest.mark.parametrize("cfg", [WEAK, STRONG, STRONGER])
def test_augment_keeps_shape_and_range_and_varies(cfg):
    torch.manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    a, b = augment(x, cfg), augment(x, cfg)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, b)


def test_augment_config_rejects_bad_values():
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="erase_prob must be a probability"):
        AugmentConfig(erase_prob=1.5)


def test_nt_xent_prefers_matching_views():
    torch.manual_seed(0)
    z = torch.randn(32, 16)
    assert nt_xent(z, z + 0.01 * torch.randn_like(z), 0.5) < nt_xent(z, torch.randn_like(z), 0.5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        nt_xent(z, z, 0.0)


def test_cluster_contrastive_penalises_collapse():
    torch.manual_seed(0)
    spread = torch.softmax(torch.randn(64, 4) * 5, dim=1)
    collapsed = torch.zeros(64, 4)
    collapsed[:, 0] = 1
    assert cluster_contrastive(spread, spread, 1.0) < cluster_contrastive(collapsed, collapsed, 1.0)


def test_scan_loss_parts():
    agree = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])
    out = scan_loss(agree, agree, entropy_weight=2.0)
    assert out.consistency < 0.01 and out.entropy == pytest.approx(math.log(2), abs=1e-4)
    assert out.total == pytest.approx(float(out.consistency - 2.0 * out.entropy))


def test_scan_loss_of_stacked_heads_is_each_heads_loss():
    torch.manual_seed(0)
    anchors, neighbours = torch.randn(32, 3, 5), torch.randn(32, 3, 5)
    stacked = scan_loss(anchors, neighbours, entropy_weight=5.0)
    assert stacked.total.shape == (3,)
    for h in range(3):
        one = scan_loss(anchors[:, h], neighbours[:, h], entropy_weight=5.0)
        assert stacked.total[h] == pytest.approx(float(one.total), abs=1e-5)
        assert stacked.entropy[h] == pytest.approx(float(one.entropy), abs=1e-5)


def test_confident_cross_entropy_masks_and_balances():
    weak = torch.tensor([[9.0, 0.0], [0.0, 9.0], [0.1, 0.0]])
    loss, frac = confident_cross_entropy(weak, torch.zeros(3, 2), threshold=0.99)
    assert frac == pytest.approx(2 / 3) and loss == pytest.approx(math.log(2))
    none, frac = confident_cross_entropy(torch.zeros(3, 2), torch.zeros(3, 2), threshold=0.99)
    assert frac == 0 and none == 0


def test_neighbour_mining_matches_brute_force():
    torch.manual_seed(0)
    feats = torch.randn(50, 8)
    z = torch.nn.functional.normalize(feats, dim=1)
    sim = z @ z.t()
    sim.fill_diagonal_(-2)
    expected = sim.topk(4, dim=1).indices
    assert torch.equal(mine_neighbors(feats, 4, chunk_size=7), expected)
    assert torch.equal(batch_neighbors(feats, 4), expected)
    labels = torch.arange(50) % 2
    agreement = neighbor_agreement(labels, expected)
    assert agreement.shape == (50,) and ((agreement >= 0) & (agreement <= 1)).all()
    with pytest.raises(ValueError, match="k must lie in 1..49"):
        mine_neighbors(feats, 50)
