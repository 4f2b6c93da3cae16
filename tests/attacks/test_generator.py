"""Generator and discriminator: shapes from the input shape; the norm bound always holds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterattack.attacks import Discriminator, Generator, perturbation_norms, project_perturbation


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 9, 13), (3, 96, 96)])
def test_shapes_follow_the_input_shape(shape):
    torch.manual_seed(0)
    g, d = Generator(shape, width=4, blocks=1), Discriminator(shape, width=4)
    x = torch.rand(2, *shape)
    x_adv, delta, raw = g.perturb(x, "linf", 0.1)
    assert x_adv.shape == delta.shape == raw.shape == x.shape
    assert d(x).shape == (2,)


def test_too_small_images_are_rejected():
    with pytest.raises(ValueError, match="H, W >= 8"):
        Generator((1, 4, 4))
    with pytest.raises(ValueError, match="H, W >= 8"):
        Discriminator((1, 6, 6))


@settings(max_examples=40, deadline=None)
@given(
    eps=st.floats(1e-3, 1.0),
    scale=st.floats(0.0, 50.0),
    seed=st.integers(0, 2**16),
    hard_clamp=st.booleans(),
)
def test_linf_bound_holds_for_any_raw_output(eps, scale, seed, hard_clamp):
    g = torch.Generator().manual_seed(seed)
    raw = torch.tanh(scale * torch.randn(4, 1, 8, 8, generator=g))
    delta = project_perturbation(raw, "linf", eps, hard_clamp)
    assert float(delta.abs().max()) <= eps


@settings(max_examples=40, deadline=None)
@given(eps=st.floats(1e-3, 10.0), scale=st.floats(0.0, 50.0), seed=st.integers(0, 2**16))
def test_l2_bound_holds_for_any_raw_output(eps, scale, seed):
    g = torch.Generator().manual_seed(seed)
    raw = scale * torch.randn(4, 3, 8, 8, generator=g)
    l2, _ = perturbation_norms(project_perturbation(raw, "l2", eps, False))
    assert float(l2.max()) <= eps


@settings(max_examples=15, deadline=None)
@given(
    norm=st.sampled_from(["linf", "l2"]),
    eps=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**16),
    hard_clamp=st.booleans(),
)
def test_generated_images_stay_in_the_box_and_the_ball(norm, eps, seed, hard_clamp):
    torch.manual_seed(seed)
    g = Generator((1, 8, 8), width=4, blocks=1)
    with torch.no_grad():  # large random weights push the tanh output to saturation
        for p in g.parameters():
            p.mul_(5.0)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        x_adv, _, _ = g.perturb(x, norm, eps, hard_clamp)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    l2, linf = perturbation_norms(x_adv - x)
    bound = linf if norm == "linf" else l2
    assert float(bound.max()) <= eps + 1e-6


def test_unknown_norm_is_rejected():
    with pytest.raises(ValueError, match="'l1'"):
        project_perturbation(torch.zeros(1, 1, 8, 8), "l1", 0.1, False)
