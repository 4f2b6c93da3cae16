"""The epoch hook of train_generator that Tune trials use: report each epoch, stop on request, resume exactly."""

from __future__ import annotations

import copy

import torch
from torch import nn

from clusterattack.attacks import AttackConfig, CountingVictim, SurrogateConfig, train_generator


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
