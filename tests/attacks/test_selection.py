"""Keeping the epoch whose generator breaks held-out clusterings most (``select_images``)."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from clusterattack.attacks import CountingVictim, train_generator
from clusterattack.attacks.gan import perturb_images


def _snapshots():
    states: dict[int, dict[str, torch.Tensor]] = {}

    def hook(result, state):
        states[int(state["epoch"])] = {k: v.clone() for k, v in state["generator"].items()}
        return False

    return states, hook


@pytest.mark.parametrize("source", ["estimate", "surrogate"])
def test_the_generator_kept_is_the_best_scored_epoch(victim, blobs, config, source):
    counted = CountingVictim(victim)
    states, hook = _snapshots()
    cfg = config(gradient_source=source, epochs=4, select_images=64)
    result = train_generator(counted, blobs[0], cfg, progress=False, on_epoch_end=hook)
    scores = [row["select_score"] for row in result.history]
    assert len(scores) == 4 and all(0.0 <= s <= 1.0 for s in scores)
    best = 1 + min(range(4), key=scores.__getitem__)
    assert result.selected_epoch == best and result.summary()["selected_epoch"] == best
    kept = result.generator.state_dict()
    assert all(torch.equal(kept[k], states[best][k]) for k in kept)
    # The score is what the victim says about the kept generator's held-out perturbations.
    held = blobs[0][torch.randperm(320, generator=torch.Generator().manual_seed(cfg.seed))[256:]]
    clean = victim.predict_proba(held).argmax(1)
    after = victim.predict_proba(perturb_images(result.generator, held, cfg)).argmax(1)
    assert normalized_mutual_info_score(clean.numpy(), after.numpy()) == pytest.approx(scores[best - 1], abs=1e-9)


def test_selection_queries_are_counted_and_held_out_of_training(victim, blobs, config):
    plain, selected = CountingVictim(victim), CountingVictim(victim)
    base = config(gradient_source="surrogate", epochs=2, **{"surrogate.online": False, "surrogate.refresh_rounds": 0})
    a = train_generator(plain, blobs[0], base, progress=False)
    b = train_generator(selected, blobs[0], base.override(select_images=64), progress=False)
    # Without selection: 320 distilled memberships. With it: 256 of them, the 64 held out
    # once clean and once per epoch perturbed.
    assert a.image_queries == 320
    assert b.image_queries == 256 + 64 + 2 * 64
    assert a.selected_epoch is None and "select_score" not in a.history[0]


def test_a_budget_exit_keeps_the_best_epoch_scored_so_far(victim, blobs, config):
    cfg = config(gradient_source="estimate", epochs=6, select_images=64)
    counted = CountingVictim(victim, budget=256 + 64 + 2600)
    result = train_generator(counted, blobs[0], cfg, progress=False)
    assert result.stopped == "budget_exhausted"
    scored = [row for row in result.history if "select_score" in row]
    assert scored, "the budget should last at least one epoch"
    best = min(scored, key=lambda row: row["select_score"])
    assert result.selected_epoch == int(best["epoch"])


def test_selection_needs_images_left_to_train_on(victim, blobs, config):
    with pytest.raises(ValueError, match="select_images=319 leaves fewer than 2"):
        train_generator(CountingVictim(victim), blobs[0], config(select_images=319), progress=False)
    with pytest.raises(ValueError, match="select_images must be an integer >= 0"):
        config(select_images=-1)
