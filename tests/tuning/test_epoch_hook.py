"""The epoch hook of train_generator that Tune trials use: report each epoch, stop on request, resume exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from clusterattack.attacks import AttackConfig, CountingVictim, SurrogateConfig, train_generator
from clusterattack.attacks.gan import training_split
from clusterattack.attacks.gradients import make_gradient_source


class Linear(nn.Module):
    """A seeded linear softmax clustering of 8x8 images into 3 clusters."""

    num_clusters = 3
    input_shape = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(64, 3)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(3 * self.linear(x.flatten(1) - 0.5), dim=1)


def _images(n: int = 192) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _config(**changes) -> AttackConfig:
    base = AttackConfig(
        epochs=3, batch_size=64, eps=0.2, generator_width=4, generator_blocks=1, discriminator_width=4,
        surrogate=SurrogateConfig(distill_queries=192, distill_epochs=1, refresh_rounds=0, width=4, batch_size=64),
    )  # fmt: skip
    return base.override(**changes)


def _weights(result) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in result.generator.parameters()])


def test_resuming_from_an_epoch_state_gives_the_uninterrupted_run():
    torch.set_num_threads(1)
    victim = Linear().eval()
    config = _config(gradient_source="whitebox")
    states = {}

    def keep(result, state):
        assert result.history[-1]["epoch"] == state["epoch"]
        states[state["epoch"]] = copy.deepcopy(state)  # live tensors: training goes on

    full = train_generator(CountingVictim(victim), _images(), config, progress=False, on_epoch_end=keep)
    assert sorted(states) == [1, 2, 3]
    resumed = train_generator(CountingVictim(victim), _images(), config, progress=False, resume=states[1])
    assert resumed.history == full.history
    assert torch.equal(_weights(resumed), _weights(full))
    assert resumed.image_queries == full.image_queries  # counts carried over from the state


def test_a_resumed_run_keeps_the_epoch_selection_it_had():
    torch.set_num_threads(1)
    victim = Linear().eval()
    config = _config(gradient_source="whitebox", epochs=4, select_images=48)
    states = {}

    def keep(result, state):
        states[state["epoch"]] = copy.deepcopy(state)

    full = train_generator(CountingVictim(victim), _images(), config, progress=False, on_epoch_end=keep)
    assert states[2]["selection"]["epoch"] in (1, 2) and states[2]["held_clean"].shape == (48,)
    resumed = train_generator(CountingVictim(victim), _images(), config, progress=False, resume=states[2])
    assert [r["select_score"] for r in resumed.history] == [r["select_score"] for r in full.history]
    assert resumed.selected_epoch == full.selected_epoch
    assert torch.equal(_weights(resumed), _weights(full))
    # The held-out clean assignments came with the state: not asked for again.
    assert resumed.image_queries == full.image_queries


def test_the_hook_stops_training_and_a_resumed_surrogate_does_not_query_again():
    victim = Linear().eval()
    config = _config(gradient_source="surrogate")
    states = {}

    def stop_after_first(result, state):
        states[state["epoch"]] = copy.deepcopy(state)
        return True

    assert config.surrogate.online  # each epoch also queries its 192 adversarial images
    counted = CountingVictim(victim)
    first = train_generator(counted, _images(), config, progress=False, on_epoch_end=stop_after_first)
    assert first.stopped == "stopped_by_caller" and first.epochs_run == 1
    assert counted.image_queries == 192 + 192  # the clean memberships of the pool once, epoch 1

    again = CountingVictim(victim)
    rest = train_generator(again, _images(), config, progress=False, resume=states[1])
    assert rest.epochs_run == 3 and rest.stopped == "completed"
    assert again.image_queries == 2 * 192  # epochs 2 and 3 only: the cached memberships came with the state
    assert rest.image_queries == 4 * 192  # ... and so did the count


def test_an_offline_surrogate_resumes_without_a_single_query():
    victim = Linear().eval()
    config = _config(gradient_source="surrogate", **{"surrogate.online": False})
    states = {}
    counted = CountingVictim(victim)
    train_generator(counted, _images(), config, progress=False, on_epoch_end=lambda r, s: states.setdefault(1, copy.deepcopy(s)) is not None)
    assert counted.image_queries == 192  # the clean memberships, once
    again = CountingVictim(victim)
    rest = train_generator(again, _images(), config, progress=False, resume=states[1])
    assert rest.epochs_run == 3 and again.image_queries == 0 and rest.image_queries == 192


def _stateful(**changes) -> AttackConfig:
    """Surrogate settings that give the source state worth keeping: online fine-tuning, refresh
    rounds after epochs 1 and 2, and queried noise points in the clean pool."""
    settings = {"surrogate.refresh_rounds": 2, "surrogate.refresh_queries": 64, "surrogate.refresh_epochs": 1,
                "surrogate.noise_queries": 32, "surrogate.ensemble": 2}  # fmt: skip
    return _config(**{**settings, **changes})


@pytest.mark.parametrize(
    "changes",
    [
        {"gradient_source": "surrogate"},
        {"gradient_source": "estimate", "estimator.prior": "surrogate", "estimator.samples": 1},
    ],
    ids=["surrogate", "estimate-with-surrogate-prior"],
)
def test_a_resumed_black_box_run_goes_on_exactly_as_the_uninterrupted_one(changes):
    torch.set_num_threads(1)
    victim = Linear().eval()
    config = _stateful(**changes)
    states = {}

    def keep(result, state):
        states[state["epoch"]] = copy.deepcopy(state)

    full_victim = CountingVictim(victim)
    full = train_generator(full_victim, _images(), config, progress=False, on_epoch_end=keep)
    saved = states[2]["source"]
    surrogate = changes["gradient_source"] == "surrogate"
    prior = saved if surrogate else saved["prior"]
    # Both refresh rounds' queried points (the estimate mode's prior learns from the
    # finite-difference answers at each step instead, and has no rounds).
    assert len(prior["models"]) == 2 and len(prior["refresh"]) == (2 if surrogate else 0)
    assert prior["noise"][0].shape == (32, 1, 8, 8)

    again = CountingVictim(victim)
    resumed = train_generator(again, _images(), config, progress=False, resume=states[2])
    # The fine-tuned ensemble, its optimisers, its RNG and its pool came back: epoch 3 is
    # the uninterrupted epoch 3, and nothing asked before epoch 3 is asked again.
    assert resumed.history == full.history
    assert torch.equal(_weights(resumed), _weights(full))
    assert resumed.image_queries == full.image_queries
    assert again.image_queries == full.image_queries - states[2]["counts"][0]


def test_a_state_without_the_source_falls_back_to_distilling_again(caplog):
    torch.set_num_threads(1)
    victim = Linear().eval()
    config = _stateful(gradient_source="surrogate")
    states = {}
    full = train_generator(
        CountingVictim(victim), _images(), config, progress=False,
        on_epoch_end=lambda r, s: states.__setitem__(s["epoch"], copy.deepcopy(s)),
    )  # fmt: skip
    old = {k: v for k, v in states[2].items() if k != "source"}  # a checkpoint from before
    with caplog.at_level("WARNING"):
        resumed = train_generator(CountingVictim(victim), _images(), config, progress=False, resume=old)
    assert "predates gradient-source states" in caplog.text
    assert resumed.epochs_run == 3 and resumed.history[:2] == full.history[:2]
    assert not torch.equal(_weights(resumed), _weights(full))  # a fresh surrogate: not the same run


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"surrogate.ensemble": 1}, "1 member"),
        ({"surrogate.arch": "convnet"}, "arch 'convnet'"),
        ({"surrogate.distill_queries": 100}, "on 100"),
    ],
)
def test_a_surrogate_state_from_another_config_is_refused(changes, match):
    victim = Linear().eval()
    states = {}
    train_generator(
        CountingVictim(victim), _images(), _stateful(gradient_source="surrogate", epochs=1), progress=False,
        on_epoch_end=lambda r, s: states.__setitem__(s["epoch"], copy.deepcopy(s)),
    )  # fmt: skip
    other = _stateful(gradient_source="surrogate", **changes)
    with pytest.raises(ValueError, match=match):
        train_generator(CountingVictim(victim), _images(), other, progress=False, resume=states[1])


def test_a_state_without_its_queried_points_resumes_the_fine_tuned_surrogate():
    """What a Tune trial checkpoints: the ensemble's weights, optimisers and RNG, not the
    points it queried (every refresh round's images would make each epoch's file that large)."""
    from clusterattack.attacks.gradients import without_queried_points

    torch.set_num_threads(1)
    victim = Linear().eval()
    states = {}
    full = train_generator(
        CountingVictim(victim), _images(), _stateful(gradient_source="surrogate"), progress=False,
        on_epoch_end=lambda r, s: states.__setitem__(s["epoch"], copy.deepcopy(s)),
    )  # fmt: skip
    whole = states[2]["source"]
    slim = without_queried_points(whole)
    assert "refresh" not in slim and "noise" not in slim and slim["models"] is whole["models"]
    assert without_queried_points(None) is None and without_queried_points({}) == {}
    nested = without_queried_points({"name": "estimate", "rng": whole["rng"], "prior": whole})
    assert "refresh" not in nested["prior"] and nested["rng"] is whole["rng"]

    # The ensemble comes back as fine-tuned (not distilled anew), its pool the clean points.
    config = _stateful(gradient_source="surrogate")
    source = make_gradient_source(CountingVictim(victim), config)
    pool = training_split(_images(), config)[0]
    source.resume(pool, states[2]["clean"], slim)
    for model, saved in zip(source.models, whole["models"], strict=True):
        assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)
    assert len(source._pool_x) == 1 and source._pool_x[0].shape[0] == whole["distilled"]

    again = CountingVictim(victim)
    resumed = train_generator(again, _images(), config, progress=False, resume={**states[2], "source": slim})
    assert resumed.epochs_run == 3 and resumed.image_queries == full.image_queries
    assert again.image_queries == full.image_queries - states[2]["counts"][0]  # nothing distilled anew


@pytest.mark.parametrize("noise", [0, 32])
def test_a_saved_surrogate_state_does_not_carry_the_clean_pool(noise):
    """The clean images are the run's own data, not the state's: saving the state must not
    write them (a slice of them is a view whose whole storage torch.save would write)."""
    import io

    victim = Linear().eval()
    states = {}
    config = _stateful(gradient_source="surrogate", epochs=1, **{"surrogate.noise_queries": noise})
    train_generator(
        CountingVictim(victim), _images(), config, progress=False,
        on_epoch_end=lambda r, s: states.__setitem__(s["epoch"], s),
    )  # fmt: skip
    noise_x, noise_y = states[1]["source"]["noise"]
    assert noise_x.shape[0] == noise_y.shape[0] == noise
    buffer = io.BytesIO()
    torch.save((noise_x, noise_y), buffer)
    payload = noise * (64 + Linear.num_clusters) * 4  # float32 pixels and memberships of the noise points
    clean_pool = _images().numel() * 4  # 49,152 bytes: what a view would drag along
    assert buffer.getbuffer().nbytes < payload + 4096 < clean_pool  # 4096: torch.save's own framing
