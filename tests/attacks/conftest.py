"""Fixtures of the attack tests: tiny seeded victims and clustered synthetic images."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from clusterattack.attacks import AttackConfig

SHAPE = (1, 8, 8)
K = 3


class LinearSoftmaxVictim(nn.Module):
    """A fixed linear softmax clustering of C x H x W images: smooth, seeded, differentiable.

    Its weights are the centred cluster prototypes, so it clusters the synthetic images
    below by prototype (NMI about 0.85) and an attack has something to break.
    """

    def __init__(self, prototypes: torch.Tensor, scale: float = 3.0) -> None:
        super().__init__()
        self.num_clusters = int(prototypes.shape[0])
        self.input_shape = tuple(int(v) for v in prototypes.shape[1:])
        w = (prototypes - prototypes.mean(0, keepdim=True)).flatten(1)
        self.linear = nn.Linear(w.shape[1], self.num_clusters)
        with torch.no_grad():
            self.linear.weight.copy_(scale * w)
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - 0.5).flatten(1))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x), dim=1)


class ScoresOnlyVictim:
    """Exposes the Victim contract and nothing else: any other attribute access raises.

    Stands in for a served victim: an attack that tried to read weights, call the
    module or switch it to training mode would fail loudly.
    """

    def __init__(self, model: LinearSoftmaxVictim) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "num_clusters", model.num_clusters)
        object.__setattr__(self, "input_shape", model.input_shape)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return object.__getattribute__(self, "_model").predict_proba(x)

    def __getattribute__(self, name: str):
        if name in ("num_clusters", "input_shape", "predict_proba", "__class__"):
            return object.__getattribute__(self, name)
        raise AttributeError(f"black-box victim exposes no attribute {name!r}")


def make_blobs(n: int, shape=SHAPE, k: int = K, spread: float = 0.1, noise: float = 0.25, seed: int = 0):
    """Images around k random prototypes in [0, 1]; returns (images, labels, prototypes)."""
    g = torch.Generator().manual_seed(seed)
    prototypes = (0.5 + spread * torch.randn(k, *shape, generator=g)).clamp(0, 1)
    labels = torch.randint(0, k, (n,), generator=g)
    images = (prototypes[labels] + noise * torch.randn(n, *shape, generator=g)).clamp(0, 1)
    return images, labels, prototypes


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; two oversubscribe a shared CPU badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def attacker_cache(tmp_path, monkeypatch):
    """Attacker backbones (surrogate arch "pretext") are cached per test, not in runs/cache."""
    path = tmp_path / "attacker-cache"
    monkeypatch.setenv("CLUSTERATTACK_CACHE_DIR", str(path))
    return path


@pytest.fixture
def blobs():
    """(train images, test images, test labels, prototypes) on 8 x 8 images, 3 clusters."""
    images, labels, prototypes = make_blobs(480)
    return images[:320], images[320:], labels[320:], prototypes


@pytest.fixture
def victim(blobs) -> LinearSoftmaxVictim:
    return LinearSoftmaxVictim(blobs[3]).eval()


def tiny_config(**changes) -> AttackConfig:
    """A config small enough to train in about a second on 8 x 8 images."""
    base = AttackConfig(
        epochs=3,
        batch_size=64,
        eps=0.2,
        generator_width=4,
        generator_blocks=1,
        discriminator_width=4,
    ).override(
        **{
            "estimator.samples": 2,
            "estimator.resolution": 0.5,
            "surrogate.distill_queries": 320,
            "surrogate.distill_epochs": 2,
            "surrogate.refresh_rounds": 1,
            "surrogate.refresh_queries": 64,
            "surrogate.refresh_epochs": 1,
            "surrogate.width": 4,
            "surrogate.batch_size": 64,
        }
    )
    return base.override(**changes)


@pytest.fixture
def config():
    """Factory of tiny configs: ``config(gradient_source="estimate", epochs=5)``."""
    return tiny_config


@pytest.fixture
def scores_only():
    """Wraps a model so that only the Victim contract is reachable."""
    return ScoresOnlyVictim


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module
