"""The white-box alignment diagnostic: cosine between a surrogate's and the victim's input gradient."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from clusterattack.attacks import CountingVictim, make_gradient_source
from clusterattack.attacks.alignment import gradient_alignment, victim_input_gradient
from tests.attacks.conftest import load_benchmark


class _Through:
    """A 'surrogate' whose input gradient is the victim's own (alignment must be 1)."""

    def __init__(self, model) -> None:
        self.model = model

    def input_gradient(self, x, weights):
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad((self.model.predict_proba(x) * weights).sum(), x)
        return grad


class _Noise:
    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(3)

    def input_gradient(self, x, weights):
        return torch.randn(x.shape, generator=self.generator)


def _points(blobs):
    images = blobs[0][:200]
    noise = (torch.rand(images.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.1
    return images, (images + noise).clamp(0, 1)


def test_the_victim_itself_aligns_perfectly_and_noise_does_not(victim, blobs, config):
    images, points = _points(blobs)
    clean = victim.predict_proba(images).detach()
    cfg = config()
    exact = gradient_alignment(victim, _Through(victim), clean, points, cfg, batch_size=64)
    assert exact.shape == (200,)
    assert torch.allclose(exact, torch.ones(200), atol=1e-5)
    noise = gradient_alignment(victim, _Noise(), clean, points, cfg, batch_size=64)
    assert abs(float(noise.mean())) < 0.05  # 64-dim random vectors: cos about +-0.125 each


def test_a_well_distilled_surrogate_aligns_better_than_a_barely_distilled_one(victim, blobs, config):
    images, points = _points(blobs)
    clean = victim.predict_proba(images).detach()
    means = {}
    for name, changes in {
        "barely": {},  # the tiny config: 2 epochs at width 4, with shift/flip augmentation
        # The linear victim is not shift invariant, so augmentation would teach a wrong slope.
        "well": {"surrogate.distill_epochs": 30, "surrogate.width": 16, "surrogate.augment": False},
    }.items():
        cfg = config(gradient_source="surrogate", **changes)
        source = make_gradient_source(CountingVictim(victim), cfg)
        source.prepare(blobs[0], victim.predict_proba(blobs[0]).detach())
        means[name] = float(gradient_alignment(victim, source, clean, points, cfg).mean())
    assert means["well"] > 0.3
    assert means["well"] > means["barely"] + 0.2


def test_the_victim_gradient_is_the_attack_terms_gradient(victim, blobs, config):
    images, points = _points(blobs)
    cfg = config()
    clean = victim.predict_proba(images[:32]).detach()
    grad, g = victim_input_gradient(victim, clean, points[:32], cfg)
    # A small step against the gradient lowers the attack term (which the generator minimises).
    from clusterattack.attacks.losses import attack_objective

    def term(x):
        return float(attack_objective(clean, victim.predict_proba(x), cfg.attack_loss).detach())

    step = 1e-2 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert term(points[:32] - step) < term(points[:32]) < term(points[:32] + step)
    assert g.shape == clean.shape


def test_alignment_refuses_what_it_cannot_measure(victim, blobs, config, scores_only):
    images, points = _points(blobs)
    clean = victim.predict_proba(images).detach()
    with pytest.raises(ValueError, match="200 points but 10 clean"):
        gradient_alignment(victim, _Noise(), clean[:10], points, config())
    with pytest.raises(TypeError, match="local victim module"):
        gradient_alignment(scores_only(victim), _Noise(), clean, points, config())


def test_the_alignment_benchmark_ranks_variants_against_its_reference(victim, blobs, config):
    bench = load_benchmark("gradient_alignment")
    images, points = _points(blobs)
    variants = dict(
        bench.parse_variant(text)
        for text in (
            "barely=surrogate.distill_epochs=2",
            "well=surrogate.distill_epochs=30,surrogate.width=16,surrogate.augment=false",
        )
    )
    assert variants["well"] == {"surrogate.distill_epochs": 30, "surrogate.width": 16, "surrogate.augment": False}
    configs = {name: config(**changes) for name, changes in variants.items()}
    pool = blobs[0]
    rows = bench.measure(
        victim, pool, victim.predict_proba(pool).detach(), victim.predict_proba(images).detach(), points, configs
    )
    assert [r["variant"] for r in rows] == ["barely", "well"]
    assert rows[0]["ratio"] == 1.0
    assert rows[1]["ratio"] == pytest.approx(rows[1]["mean_cos"] / rows[0]["mean_cos"])
    assert rows[1]["mean_cos"] > rows[0]["mean_cos"] + 0.2
    assert all(len(r["cosines"]) == points.shape[0] for r in rows)
    fig = bench.cosine_figure(rows, "linear toy victim")
    assert len(fig.axes[0].patches) == 2 * 40  # one 40-bin histogram per variant
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected NAME=KEY=VALUE\[,KEY=VALUE...\], got 'just-a-name'"):
        bench.parse_variant("just-a-name")


@pytest.mark.slow
def test_the_alignment_benchmark_runs_end_to_end_on_digits(tmp_path, mlflow_uri, capsys):
    from clusterattack.victims.backbones import BackboneConfig
    from clusterattack.victims.cc import CC, CCConfig
    from clusterattack.victims.io import save_victim

    torch.manual_seed(0)
    victim_file = save_victim(CC(CCConfig(10, (1, 8, 8), BackboneConfig("convnet", 1, 8, 4))).eval(), tmp_path / "cc.pt")
    bench = load_benchmark("gradient_alignment")
    out = tmp_path / "out"
    code = bench.main([
        "--victim", str(victim_file), "--dataset", "digits", "--points", "64", "--train-limit", "200",
        "--threads", "1", "--out", str(out),
        # A surrogate attack's pool is max(train_limit, distill_queries), as in training.
        "--variant", "one=surrogate.distill_epochs=1,surrogate.width=4,surrogate.distill_queries=200,batch_size=32",
        "--variant", "two=surrogate.distill_epochs=1,surrogate.width=4,surrogate.ensemble=2,batch_size=32",
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "uniform L-inf noise of radius 0.1" in printed and "200 queried memberships" in printed
    assert "MLflow run" in printed
    (record,) = [json.loads(p.read_text()) for p in out.glob("gradient_alignment-*.json")]
    assert [r["variant"] for r in record["rows"]] == ["one", "two"]
    assert record["n_points"] == 64 and all(len(r["cosines"]) == 64 for r in record["rows"])
    assert all(-1.0 <= c <= 1.0 for r in record["rows"] for c in r["cosines"])
    assert len(list(out.glob("gradient_alignment-*.png"))) == 1
    assert bench.main(["--victim", str(victim_file), "--variant", "bad=surrogate.arch=mlp", "--no-mlflow"]) == 2
