"""Every registered victim satisfies the Victim contract on tiny synthetic images."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clusterattack.victims import VICTIMS, ClusteringModel, Victim, load_victim, save_victim
from clusterattack.victims.registry import config_from_dict, get_spec

NAMES = sorted(VICTIMS)


def test_registry_holds_the_six_models():
    assert set(VICTIMS) == {"cc", "scan", "nnm", "spice", "mice", "ruc"}
    for name, spec in VICTIMS.items():
        assert spec.name == name and spec.model_cls.name == name


def test_unknown_model_is_rejected_by_name():
    with pytest.raises(KeyError, match="unknown victim model 'kmeans'"):
        get_spec("kmeans")


@pytest.mark.parametrize("name", NAMES)
def test_memberships_are_probabilities(name, tiny, tiny_data):
    model = tiny.model(name).eval()
    x = tiny_data.batch(torch.arange(10), torch.device("cpu"), test=True)
    assert isinstance(model, Victim) and isinstance(model, ClusteringModel)
    assert model.num_clusters == tiny.K and model.input_shape == tiny.SHAPE
    p = model.predict_proba(x)
    assert p.shape == (10, tiny.K)
    assert torch.isfinite(p).all() and (p >= 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(10))
    assert model.predict(x).shape == (10,)
    assert model.features(x).shape == (10, tiny.backbone.feature_dim)


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_is_deterministic(name, tiny, tiny_data):
    model = tiny.model(name).eval()
    x = tiny_data.batch(torch.arange(8), torch.device("cpu"), test=True)
    torch.testing.assert_close(model.predict_proba(x), model.predict_proba(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_memberships_are_differentiable_in_the_input(name, tiny, tiny_data):
    model = tiny.model(name).eval()
    x = tiny_data.batch(torch.arange(4), torch.device("cpu"), test=True).requires_grad_(True)
    p = model.predict_proba(x)
    (p[:, 0] - p[:, 1]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_are_rejected(name, tiny):
    model = tiny.model(name).eval()
    with pytest.raises(ValueError, match="shape N x 1 x 28 x 28"):
        model.predict_proba(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.predict_proba(torch.rand(2, 1, 28, 28) * 2)


@pytest.mark.parametrize("name", NAMES)
def test_bad_configs_are_rejected(name, tiny):
    spec = VICTIMS[name]
    with pytest.raises(ValueError, match="num_clusters must be >= 2"):
        spec.config_cls(num_clusters=1, input_shape=tiny.SHAPE, backbone=tiny.backbone)
    with pytest.raises(ValueError, match="does not match the backbone"):
        spec.config_cls(num_clusters=3, input_shape=(3, 32, 32), backbone=tiny.backbone)
    with pytest.raises(ValueError, match="unknown preset"):
        spec.recipe("huge")


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_through_a_dict(name, tiny):
    cfg = tiny.config(name)
    assert config_from_dict(type(cfg), dataclasses.asdict(cfg)) == cfg
    recipe = tiny.recipe(name)
    assert config_from_dict(type(recipe), dataclasses.asdict(recipe)) == recipe


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_file_round_trip(name, tiny, tiny_data, tmp_path):
    model = tiny.model(name, seed=1).eval()
    x = tiny_data.batch(torch.arange(6), torch.device("cpu"), test=True)
    path = save_victim(model, tmp_path / f"{name}.pt")
    loaded = load_victim(path)
    assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
    torch.testing.assert_close(loaded.predict_proba(x), model.predict_proba(x))


def test_load_victim_names_what_it_expected(tmp_path):
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": 1}, bogus)
    with pytest.raises(ValueError, match="not a victim file written by save_victim"):
        load_victim(bogus)
    with pytest.raises(ValueError, match="cannot resolve victim source"):
        load_victim("no-such-thing")
