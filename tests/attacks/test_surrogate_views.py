"""The surrogate's training views: shift/flip augmentation of its distillation, none of what it is fine-tuned on."""

from __future__ import annotations

import pytest
import torch

from clusterattack.attacks import CountingVictim
from clusterattack.attacks.gradients import make_gradient_source
from clusterattack.attacks.gradients.surrogate import _shift_flip
from clusterattack.victims.augment import WEAK, crop_flip


@pytest.mark.parametrize("view", [lambda x, g: crop_flip(x, WEAK, g), lambda x, g: _shift_flip(x, g, 2.0)])
def test_a_view_keeps_shape_and_range_is_seeded_and_passes_gradients(view):
    x = torch.rand(16, 1, 12, 12, requires_grad=True)
    a = view(x, torch.Generator().manual_seed(3))
    b = view(x, torch.Generator().manual_seed(3))
    c = view(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape
    assert float(a.detach().min()) >= 0.0 and float(a.detach().max()) <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, x)
    a.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_crop_flip_flips_about_half_and_zooms_in():
    # A left-to-right ramp: a flip reverses its slope, a crop narrows its range.
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(400, 1, 16, 16).contiguous()
    out = crop_flip(ramp, WEAK, torch.Generator().manual_seed(0))
    slope = out[:, 0, 8, -2] - out[:, 0, 8, 1]
    flipped = float((slope < 0).float().mean())
    assert 0.4 < flipped < 0.6
    assert float(slope.abs().max()) < float(ramp[0, 0, 8, -2] - ramp[0, 0, 8, 1]) + 1e-6
    assert float(slope.abs().min()) > 0.3  # at least 70% of the area: never a sliver


def _seen_by_first_member(source):
    """Inputs the first ensemble member is trained on (fed in training mode), recorded by a hook."""
    seen: list[torch.Tensor] = []

    def record(module, args):
        if module.training:
            seen.append(args[0].detach().clone())

    source.models[0].register_forward_pre_hook(record)
    return seen


def test_fine_tuning_sees_queried_adversarial_images_as_they_are(victim, blobs, config):
    # The victim answered for x_adv itself: a shifted x_adv is another point, so neither an
    # online step nor a refresh shifts or flips it (the clean distillation does).
    train = blobs[0]
    cfg = config(gradient_source="surrogate", **{
        "surrogate.refresh_rounds": 1,
        "surrogate.refresh_queries": 16, "surrogate.refresh_epochs": 1, "surrogate.batch_size": 64,
    })
    source = make_gradient_source(CountingVictim(victim), cfg)
    with torch.no_grad():
        clean = victim.predict_proba(train)
    source.prepare(train, clean)
    seen = _seen_by_first_member(source)
    x_adv = (train[:24] + 0.05).clamp(0, 1)
    source.memberships(x_adv)
    seen.clear()
    source.after_step()
    (online,) = seen
    assert online.shape[0] == 48  # the 24 queried points and as many clean ones
    assert torch.equal(online[:24], x_adv)

    seen.clear()
    perturbed = []

    def perturb(images):
        out = (images + 0.05).clamp(0, 1)
        perturbed.append(out)
        return out

    source.end_of_epoch(source.schedule[0], perturb, train)
    fed = torch.cat(seen)
    (refreshed,) = perturbed
    # Every refreshed adversarial image reaches the member unchanged.
    rows = fed.flatten(1)
    assert all(bool((rows == r.flatten()).all(1).any()) for r in refreshed)
