"""Adversarial retraining (footnote 12) on a tiny CC: perturbed batches, recipe reuse, the result rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clusterattack.analyses import RetrainingConfig, run_retraining
from clusterattack.analyses.common import LoadedGenerator
from clusterattack.attacks import AttackConfig, train_generator
from clusterattack.data.dataset import ImageDataset
from clusterattack.defenses import AdversarialTrainData
from clusterattack.victims.backbones import BackboneConfig
from clusterattack.victims.cc import CCConfig
from clusterattack.victims.registry import get_spec
from clusterattack.victims.training import TrainData
from tests.victims.conftest import make_images

ATTACK = AttackConfig(
    epochs=1, batch_size=16, eps=0.2, gradient_source="whitebox",
    generator_width=4, generator_blocks=1, discriminator_width=4,
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def dataset() -> ImageDataset:
    rng = np.random.default_rng(0)
    x_train, y_train = make_images(48, rng)
    x_test, y_test = make_images(24, rng)
    return ImageDataset(
        name="synthetic",
        images=np.concatenate([x_train, x_test]),
        labels=np.concatenate([y_train, y_test]),
        split=np.array(["train"] * 48 + ["test"] * 24),
        class_names=("hbars", "vbars", "disk"),
        source="tests/defenses",
    )


@pytest.fixture
def tiny_cc():
    torch.manual_seed(0)
    backbone = BackboneConfig(arch="convnet", in_channels=1, image_size=28, width=4)
    return get_spec("cc").build(CCConfig(num_clusters=3, input_shape=(1, 28, 28), backbone=backbone)).eval()


def _generator(model, dataset) -> LoadedGenerator:
    x, _ = dataset.subset("train").as_float()
    result = train_generator(model, x, ATTACK, progress=False)
    return LoadedGenerator(result.generator, ATTACK, "tiny-generator", result.image_queries)


def test_training_batches_are_perturbed_within_the_bound(dataset, tiny_cc):
    data = TrainData.from_dataset(dataset)
    gen = _generator(tiny_cc, dataset)
    adv = AdversarialTrainData.wrap(data, [(gen.generator, ATTACK)], mix=1.0)
    idx = torch.arange(16)
    clean = data.batch(idx, torch.device("cpu"))
    perturbed = adv.batch(idx, torch.device("cpu"))
    assert adv.name == "synthetic+adv" and adv.num_train == data.num_train
    assert not torch.equal(clean, perturbed)
    assert (perturbed - clean).abs().max() <= 0.2 + 1e-6
    assert torch.equal(adv.batch(idx, torch.device("cpu"), test=True), data.batch(idx, torch.device("cpu"), test=True))
    with pytest.raises(ValueError, match="mix"):
        AdversarialTrainData.wrap(data, [(gen.generator, ATTACK)], mix=0.0)
    with pytest.raises(ValueError, match="at least one"):
        AdversarialTrainData.wrap(data, [], mix=0.5)


def test_run_retraining_reports_original_and_retrained(dataset, tiny_cc):
    gen = _generator(tiny_cc, dataset)
    config = RetrainingConfig(
        dataset="synthetic", victim="cc", generators=("tiny-generator",), epochs=1,
        train_limit=None, test_limit=None, fresh_attack=ATTACK, progress=False,
    )
    before = {k: v.clone() for k, v in tiny_cc.state_dict().items()}
    result = run_retraining(config, victim=tiny_cc, generators=[gen], dataset=dataset)
    p = result.payload
    assert [r["model"] for r in p["rows"]] == ["original", "retrained"]
    for row in p["rows"]:
        for m in ("nmi", "ari", "acc"):
            for col in ("clean", "old_generators", "fresh_attack"):
                assert 0 <= row[f"{m}_{col}"] <= 1 or m == "ari"
    assert p["generators"] == ["tiny-generator"]
    assert p["fresh_attack"]["gradient_source"] == "whitebox" and p["fresh_attack"]["image_queries"] > 0
    # The original victim is left untouched; the copy was retrained.
    assert all(torch.equal(before[k], v) for k, v in tiny_cc.state_dict().items())
    assert len(p["retraining"]["history"]) == 1


def test_bad_retraining_config_is_rejected():
    with pytest.raises(ValueError, match="generators"):
        RetrainingConfig(dataset="d", victim="cc", generators=())
    with pytest.raises(ValueError, match="mix"):
        RetrainingConfig(dataset="d", victim="cc", generators=("g",), mix=1.5)
    with pytest.raises(ValueError, match="epochs"):
        RetrainingConfig(dataset="d", victim="cc", generators=("g",), epochs=0)
