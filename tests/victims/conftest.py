"""Fixtures for the victim tests: a seeded 3-cluster 28x28 image set, tiny backbones and recipes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from clusterattack.data.dataset import ImageDataset
from clusterattack.victims.augment import AugmentConfig
from clusterattack.victims.backbones import BackboneConfig
from clusterattack.victims.pretext import PretextRecipe
from clusterattack.victims.registry import VICTIMS
from clusterattack.victims.training import TrainContext, TrainData

SHAPE = (1, 28, 28)
K = 3
N_TRAIN, N_TEST = 48, 24


def make_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Three shape classes (horizontal bars, vertical bars, a disk) with jitter and noise, uint8."""
    labels = np.arange(n) % K
    yy, xx = np.mgrid[0:28, 0:28]
    images = np.empty((n, 1, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        shift = rng.integers(-3, 4)
        if c == 0:
            img = ((yy + shift) // 4 % 2 == 0).astype(float)
        elif c == 1:
            img = ((xx + shift) // 4 % 2 == 0).astype(float)
        else:
            img = (((yy - 14 - shift) ** 2 + (xx - 14 + shift) ** 2) < 60).astype(float)
        img = img * rng.uniform(0.6, 1.0) + rng.normal(0, 0.08, img.shape)
        images[i, 0] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return images, labels.astype(np.int64)


@pytest.fixture(scope="session")
def synthetic_dataset() -> ImageDataset:
    rng = np.random.default_rng(0)
    x_train, y_train = make_images(N_TRAIN, rng)
    x_test, y_test = make_images(N_TEST, rng)
    return ImageDataset(
        name="synthetic",
        images=np.concatenate([x_train, x_test]),
        labels=np.concatenate([y_train, y_test]),
        split=np.array(["train"] * N_TRAIN + ["test"] * N_TEST),
        class_names=("hbars", "vbars", "disk"),
        source="tests/victims/conftest.py",
    )


@pytest.fixture(scope="session")
def tiny_data(synthetic_dataset) -> TrainData:
    return TrainData.from_dataset(synthetic_dataset)


@pytest.fixture
def tiny_ctx(tmp_path) -> TrainContext:
    torch.manual_seed(0)
    return TrainContext(
        device="cpu", seed=0, progress=False, cache_dir=tmp_path / "cache", eval_batch_size=16
    )


TINY_BACKBONE = BackboneConfig(arch="convnet", in_channels=1, image_size=28, width=4)
TINY_VIEW = AugmentConfig(crop_scale=(0.6, 1.0))
TINY_PRETEXT = PretextRecipe(epochs=1, batch_size=16, view=TINY_VIEW)

# Recipe overrides that make every model train in about a second on the tiny set.
TINY_RECIPES: dict[str, dict] = {
    "cc": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "view": TINY_VIEW},
    "scan": {
        "pretext": TINY_PRETEXT,
        "num_neighbors": 3,
        "head_epochs": 2,
        "epochs": 2,
        "batch_size": 16,
        "selflabel_epochs": 1,
    },
    "nnm": {
        "pretext": TINY_PRETEXT,
        "num_neighbors": 3,
        "head_epochs": 2,
        "epochs": 2,
        "batch_size": 16,
        "selflabel_epochs": 1,
    },
    "spice": {
        "pretext": TINY_PRETEXT,
        "epochs": 2,
        "self_batch_size": 24,
        "num_neighbors": 3,
        "semi_epochs": 1,
        "batch_size": 8,
        "reliable_agreement": 0.6,
        "reliable_confidence": 0.4,
    },
    "mice": {
        "pretext": TINY_PRETEXT,
        "gate_warmup_epochs": 2,
        "anchored_epochs": 0,  # the loss test then measures free EM epochs only
        "anneal_epochs": 0,
        "epochs": 2,
        "batch_size": 16,
        "queue_size": 32,
    },
    "ruc": {
        "scan": dataclasses.replace(
            VICTIMS["scan"].recipe("demo"),
            pretext=TINY_PRETEXT,
            num_neighbors=3,
            head_epochs=1,
            epochs=1,
            batch_size=16,
            selflabel_epochs=0,
        ),
        "epochs": 2,
        "steps_per_epoch": 2,
        "batch_size": 8,
        "num_neighbors": 3,
        "agreement": 0.5,
        "confidence": 0.5,
    },
}


def tiny_config(name: str):
    spec = VICTIMS[name]
    return spec.config_cls(num_clusters=K, input_shape=SHAPE, backbone=TINY_BACKBONE)


def tiny_recipe(name: str, **overrides):
    return VICTIMS[name].recipe("demo", **{**TINY_RECIPES[name], **overrides})


def tiny_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return VICTIMS[name].build(tiny_config(name))


@pytest.fixture(scope="session")
def tiny():
    """Helpers for tests: tiny configs, recipes and models per registered victim name."""
    import types

    return types.SimpleNamespace(
        config=tiny_config,
        recipe=tiny_recipe,
        model=tiny_model,
        K=K,
        SHAPE=SHAPE,
        backbone=TINY_BACKBONE,
    )
