"""Training recipes on tiny synthetic data: losses fall, checkpoints resume exactly, caches are reused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clusterattack.victims import VICTIMS
from clusterattack.victims.training import CHECKPOINT_NAME, cache_key, fingerprint_of

pytestmark = pytest.mark.slow

# The stage whose epochs a recipe's ``epochs`` field sets.
MAIN_STAGE = {
    "cc": "cc",
    "scan": "scan",
    "nnm": "nnm",
    "spice": "spice_self",
    "mice": "mice",
    "ruc": "ruc",
}


@pytest.mark.parametrize("name", sorted(VICTIMS))
def test_a_few_training_steps_lower_the_loss(name, tiny, tiny_data, tiny_ctx):
    # Five epochs of the main stage on the same 48 images: its loss must fall.
    recipe = tiny.recipe(name, epochs=5)
    model = tiny.model(name)
    outcome = VICTIMS[name].train(model, tiny_data, recipe, tiny_ctx)
    losses = [h["loss"] for h in outcome.history if h["stage"] == MAIN_STAGE[name]]
    assert len(losses) == 5
    assert losses[-1] < losses[0], f"{name}: loss went {losses}"
    assert not model.training
    scored = [h for h in outcome.history if "nmi" in h]
    assert scored[-1]["epoch"] == len(outcome.history)
    for h in scored:
        assert 0 <= h["nmi"] <= 1 and -1 <= h["ari"] <= 1 and 0 <= h["acc"] <= 1


class Stop(Exception):
    """Raised from the epoch callback to simulate a run killed after a checkpoint."""


def _stop_after(epochs: int):
    def on_epoch(record):
        if record["epoch"] == epochs:
            raise Stop

    return on_epoch


@pytest.mark.parametrize("name", sorted(VICTIMS))
def test_resume_continues_exactly_where_the_run_stopped(name, tiny, tiny_data, tiny_ctx, tmp_path):
    # Every registered family: the run is stopped after the first epoch of its main stage
    # (after its earlier stages: pretext, warm-ups, SCAN for RUC), then resumed into a model
    # of another initialisation; history and memberships must be the uninterrupted run's.
    spec = VICTIMS[name]
    recipe = tiny.recipe(name, epochs=2)
    full = tiny.model(name)
    torch.manual_seed(0)
    straight = spec.train(full, tiny_data, recipe, tiny_ctx).history
    main = [h["epoch"] for h in straight if h["stage"] == MAIN_STAGE[name]]
    assert len(main) == 2, f"{name}: main-stage epochs {main}"
    stop_at = main[0]

    ckpt = tmp_path / "ckpt"
    stopped = tiny.model(name)
    torch.manual_seed(0)
    ctx = dataclasses.replace(tiny_ctx, checkpoint_dir=ckpt, on_epoch=_stop_after(stop_at))
    with pytest.raises(Stop):
        spec.train(stopped, tiny_data, recipe, ctx)
    assert (ckpt / CHECKPOINT_NAME).exists()

    resumed = tiny.model(name, seed=123)  # different init: everything must come from the checkpoint
    x = tiny_data.batch(torch.arange(8), torch.device("cpu"), test=True)
    assert not torch.allclose(resumed.predict_proba(x), full.predict_proba(x), rtol=1e-4, atol=1e-5)
    torch.manual_seed(99)  # another global RNG state too: the checkpoint must carry its own
    ctx = dataclasses.replace(tiny_ctx, checkpoint_dir=ckpt, resume=True)
    history = spec.train(resumed, tiny_data, recipe, ctx).history
    assert [h["epoch"] for h in history] == [h["epoch"] for h in straight]
    assert [h["stage"] for h in history] == [h["stage"] for h in straight]
    for a, b in zip(history, straight, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), (name, a, b)
    torch.testing.assert_close(
        resumed.predict_proba(x), full.predict_proba(x), rtol=1e-4, atol=1e-5
    )


def test_resume_refuses_a_checkpoint_of_another_run(tiny, tiny_data, tiny_ctx, tmp_path):
    ckpt = tmp_path / "ckpt"
    ctx = dataclasses.replace(tiny_ctx, checkpoint_dir=ckpt)
    VICTIMS["cc"].train(tiny.model("cc"), tiny_data, tiny.recipe("cc", epochs=1), ctx)
    ctx = dataclasses.replace(ctx, resume=True)
    with pytest.raises(ValueError, match="written by another run"):
        VICTIMS["cc"].train(tiny.model("cc"), tiny_data, tiny.recipe("cc", epochs=1, lr=5e-4), ctx)


def test_pretext_is_trained_once_and_shared(tiny, tiny_data, tiny_ctx):
    scan = VICTIMS["scan"].train(
        tiny.model("scan"), tiny_data, tiny.recipe("scan", epochs=1), tiny_ctx
    )
    nnm = VICTIMS["nnm"].train(tiny.model("nnm"), tiny_data, tiny.recipe("nnm", epochs=1), tiny_ctx)
    assert scan.info["pretext_cached"] is False
    assert nnm.info["pretext_cached"] is True
    assert nnm.info["pretext_wall_s"] == scan.info["pretext_wall_s"] > 0
    assert len(list(tiny_ctx.cache_dir.glob("pretext-*.pt"))) == 1


def test_ruc_reuses_the_cached_scan_model(tiny, tiny_data, tiny_ctx):
    ruc_recipe = tiny.recipe("ruc", epochs=1)
    VICTIMS["scan"].train(tiny.model("scan"), tiny_data, ruc_recipe.scan, tiny_ctx)
    outcome = VICTIMS["ruc"].train(tiny.model("ruc"), tiny_data, ruc_recipe, tiny_ctx)
    assert outcome.info["scan_cached"] is True and outcome.info["scan_wall_s"] > 0


def test_cache_key_depends_on_every_field():
    a = fingerprint_of(recipe=VICTIMS["scan"].recipe("demo"), seed=0)
    b = fingerprint_of(recipe=VICTIMS["scan"].recipe("demo", num_neighbors=5), seed=0)
    c = fingerprint_of(recipe=VICTIMS["scan"].recipe("demo"), seed=1)
    assert len({cache_key(a), cache_key(b), cache_key(c)}) == 3
    assert cache_key(a) == cache_key(fingerprint_of(recipe=VICTIMS["scan"].recipe("demo"), seed=0))


@pytest.mark.parametrize("name", sorted(VICTIMS))
def test_every_recipe_trains_under_bf16_autocast(name, tiny, tiny_data, tiny_ctx):
    # The GPU path's mixed precision, run here on the CPU (autocast supports bf16 there):
    # every stage's losses stay finite, weights stay fp32, and the fp32 evaluation works.
    recipe = tiny.recipe(name, epochs=2)
    model = tiny.model(name)
    ctx = dataclasses.replace(tiny_ctx, precision="bf16")
    outcome = VICTIMS[name].train(model, tiny_data, recipe, ctx)
    for record in outcome.history:
        losses = {k: v for k, v in record.items() if "loss" in k}
        assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), record
    assert all(p.dtype == torch.float32 for p in model.parameters())
    proba = model.predict_proba(tiny_data.test_images[:8].float() / 255)
    assert proba.dtype == torch.float32
    assert torch.allclose(proba.sum(1), torch.ones(8), atol=1e-5)


def test_an_unknown_precision_is_refused(tiny_ctx):
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16'\), got 'fp16'"):
        dataclasses.replace(tiny_ctx, precision="fp16")


def test_mice_anchored_e_step_uses_the_given_assignment():
    from clusterattack.victims.mice import mice_elbo

    g = torch.Generator().manual_seed(0)
    n, k, d, q = 6, 3, 4, 5
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    logits, f, v, mu, queue = torch.randn(n, k, generator=g), unit(n, k, d), unit(n, k, d), unit(k, d), unit(q, k, d)
    free_loss, free_q = mice_elbo(logits, f, v, mu, queue, 0.2)
    anchor = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), k).float()
    loss, posterior = mice_elbo(logits, f, v, mu, queue, 0.2, anchor)
    assert torch.equal(posterior, anchor)
    assert torch.allclose(free_q.sum(1), torch.ones(n)) and not torch.equal(free_q, anchor)
    # The exact posterior maximises the ELBO: any other assignment gives a larger negative ELBO.
    assert torch.isfinite(loss) and loss > free_loss
    # beta = 0: the gate alone decides; beta between: between the gate and the full posterior.
    _, gate_only = mice_elbo(logits, f, v, mu, queue, 0.2, beta=0.0)
    torch.testing.assert_close(gate_only, torch.softmax(logits, 1))
    _, half = mice_elbo(logits, f, v, mu, queue, 0.2, beta=0.5)
    # q_beta ~ pi * phi^beta and q_1 ~ pi * phi, so q_1/2 ~ sqrt(pi * q_1).
    geometric = (gate_only * free_q).sqrt()
    torch.testing.assert_close(half, geometric / geometric.sum(1, keepdim=True))
    assert not torch.allclose(half, free_q) and not torch.allclose(half, gate_only)


def test_mice_annealing_schedule_follows_the_anchored_epochs(tiny):
    from clusterattack.victims.mice import MiCEStage

    recipe = tiny.recipe("mice", anchored_epochs=1, anneal_epochs=2, epochs=5)
    anchored = MiCEStage(recipe, {"labels": torch.zeros(3, dtype=torch.long)})
    assert [anchored.beta(e) for e in range(5)] == [1.0, 1 / 3, 2 / 3, 1.0, 1.0]
    # Without a warm-up assignment there is nothing to anchor to: annealing starts at once.
    assert [MiCEStage(recipe, {}).beta(e) for e in range(4)] == [1 / 3, 2 / 3, 1.0, 1.0]


def test_scan_head_warmup_keeps_the_lowest_loss_head(tiny, tiny_data, tiny_ctx):
    from clusterattack.victims.scan import HeadWarmupStage

    recipe = tiny.recipe("scan", num_heads=4, head_epochs=3)
    model = tiny.model("scan")
    own = model.head.weight.detach().clone()
    stage = HeadWarmupStage(recipe, {})
    stage.start(model, tiny_data, tiny_ctx, None)
    k = model.head.out_features
    assert torch.equal(stage.heads.weight[:k], own)  # head 0 starts as the model's head
    for epoch in range(3):
        record = stage.run_epoch(model, tiny_data, tiny_ctx, epoch)
    losses = stage.head_losses()
    best = int(losses.argmin())
    assert record["selected_head"] == best and losses.unique().numel() == 4
    assert record["selected_head_loss"] == pytest.approx(float(losses.min()), abs=1e-5)
    assert torch.equal(model.head.weight, stage.heads.weight[best * k : (best + 1) * k])
    assert torch.equal(model.head.bias, stage.heads.bias[best * k : (best + 1) * k])


def test_mice_trains_through_anchored_annealed_and_free_epochs(tiny, tiny_data, tiny_ctx):
    recipe = tiny.recipe("mice", anchored_epochs=1, anneal_epochs=1, epochs=3)
    outcome = VICTIMS["mice"].train(tiny.model("mice"), tiny_data, recipe, tiny_ctx)
    em = [h for h in outcome.history if h["stage"] == "mice"]
    # The anchored epoch logs no beta (its E-step is the warm-up's assignment).
    assert [h.get("beta") for h in em] == [None, 0.5, 1.0]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in em)
