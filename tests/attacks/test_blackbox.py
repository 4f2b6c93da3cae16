"""Black-box gradient sources reach the victim only through predict_proba, and still hurt it."""

from __future__ import annotations

import pytest
import torch

from clusterattack.attacks import CountingVictim, run_attack, train_generator
from clusterattack.attacks.gradients import WhiteBoxSource


@pytest.mark.parametrize(
    ("source", "changes"),
    [
        ("estimate", {}),
        ("surrogate", {}),
        ("surrogate", {"surrogate.online": False}),
        ("surrogate", {"surrogate.arch": "pretext", "surrogate.pretext_epochs": 1}),
        ("surrogate", {"surrogate.ensemble": 2}),
        ("estimate", {"estimator.prior": "surrogate"}),
    ],
)
def test_black_box_never_touches_the_victims_parameters(victim, blobs, source, changes, config, scores_only):
    before = {k: v.clone() for k, v in victim.state_dict().items()}
    for p in victim.parameters():
        p.requires_grad_(True)  # any gradient that reached them would land in .grad
    victim.eval()
    cfg = config(gradient_source=source, **changes)
    result = train_generator(scores_only(victim), blobs[0], cfg, progress=False)
    assert result.stopped == "completed" and result.epochs_run == 3
    assert all(p.grad is None for p in victim.parameters())
    assert all(torch.equal(before[k], v) for k, v in victim.state_dict().items())
    assert victim.training is False


def test_whitebox_refuses_a_victim_without_gradients(victim, blobs):
    class Opaque:
        num_clusters, input_shape = victim.num_clusters, victim.input_shape

        def predict_proba(self, x):
            with torch.no_grad():
                return victim.predict_proba(x)

    source = WhiteBoxSource(Opaque())
    with pytest.raises(TypeError, match="'whitebox' needs a local victim"):
        source.memberships(blobs[0][:4].clone().requires_grad_())


def test_whitebox_restores_the_victims_requires_grad_flags(victim, blobs, config):
    train_generator(victim, blobs[0], config(gradient_source="whitebox", epochs=1), progress=False)
    assert all(p.requires_grad for p in victim.parameters())
    assert all(p.grad is None for p in victim.parameters())


@pytest.mark.parametrize(
    ("source", "changes"),
    [
        ("whitebox", {}),
        ("estimate", {"estimator.samples": 4}),
        (
            "surrogate",
            {
                "surrogate.distill_epochs": 40,
                "surrogate.width": 8,
                "surrogate.lr": 1e-2,
                # Shifts and flips are no invariance of a linear victim.
                "surrogate.augment": False,
            },
        ),
    ],
)
def test_every_source_breaks_the_synthetic_clustering(victim, blobs, source, changes, config):
    train, test, labels, _ = blobs
    cfg = config(
        gradient_source=source, epochs=20, mi_temperature=0.3, generator_width=8, generator_blocks=2, **changes
    )
    report = run_attack(
        CountingVictim(victim), train, test, labels, cfg, victim_name="linear", dataset="blobs", progress=False
    )
    ev = report.evaluation
    assert ev["nmi_pre"] > 0.7
    assert ev["nmi_drop"] > 0.4, report.table_row()
    assert ev["linf_max"] <= cfg.eps + 1e-6
    record = report.record()
    for key in ("victim", "dataset", "gradient_source", "eps", "norm", "attack_loss", "image_queries", "calls", "seed"):
        assert record[key] is not None, key
    assert record["gradient_source"] == source
    assert record["image_queries"] > 0 and record["calls"] > 0


@pytest.mark.parametrize("source", ["whitebox", "estimate", "surrogate"])
def test_bf16_autocast_keeps_queries_fp32_and_the_bound(victim, blobs, source, config):
    # Mixed precision is for the generator's own networks: what reaches the victim (and
    # so the query count and the norm bound) must be what fp32 training would send.
    sent: list[torch.dtype] = []

    class Recording:
        num_clusters, input_shape = victim.num_clusters, victim.input_shape

        def predict_proba(self, x):
            sent.append(x.dtype)
            return victim.predict_proba(x)

    target = victim if source == "whitebox" else Recording()
    cfg = config(gradient_source=source, precision="bf16")
    result = train_generator(target, blobs[0], cfg, progress=False)
    assert result.stopped == "completed" and result.epochs_run == 3
    assert all(torch.isfinite(torch.tensor(row["loss_g"])) for row in result.history)
    if source != "whitebox":
        assert sent and set(sent) == {torch.float32}
    from clusterattack.attacks import perturb_images

    adv = perturb_images(result.generator, blobs[1], cfg)
    assert adv.dtype == torch.float32
    assert (adv - blobs[1]).abs().max() <= cfg.eps + 1e-6


def test_an_unknown_attack_precision_is_refused(config):
    with pytest.raises(ValueError, match="precision must be one of"):
        config(precision="fp16")
