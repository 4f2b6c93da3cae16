"""Models of 'a user' for the victim-spec tests, named by file path: good ones and every bad kind."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

SHAPE = (1, 8, 8)
K = 3


def _proto() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(K, int(np.prod(SHAPE))))


class NumpySoftmax:
    """predict_proba in numpy: a fixed linear softmax of the flat image."""

    num_clusters = K
    input_shape = SHAPE

    def __init__(self, temperature: float = 1.0) -> None:
        self.w = _proto() / temperature

    def logits(self, images: np.ndarray) -> np.ndarray:
        return (images.reshape(len(images), -1) - 0.5) @ self.w.T

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        z = self.logits(images)
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)


def good(temperature: float = 1.0) -> NumpySoftmax:
    return NumpySoftmax(temperature)


class _Logits(NumpySoftmax):
    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return self.logits(images)  # scores before a softmax: negative, rows not summing to 1


def logits_model() -> _Logits:
    return _Logits()


class _Unnormalised(NumpySoftmax):
    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return super().predict_proba(images) * 2.0


def unnormalised() -> _Unnormalised:
    return _Unnormalised()


class _NaN(NumpySoftmax):
    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        out = super().predict_proba(images)
        out[1, 0] = np.nan
        return out


def nan_model() -> _NaN:
    return _NaN()


class _Labels:
    num_clusters = K
    input_shape = SHAPE

    def predict(self, images: np.ndarray) -> np.ndarray:
        return NumpySoftmax().predict_proba(images).argmax(1)


def labels_only() -> _Labels:
    return _Labels()


class _Nothing:
    num_clusters = K
    input_shape = SHAPE

    def cluster(self, images):
        return images


def no_predict() -> _Nothing:
    return _Nothing()


def wrong_shape() -> NumpySoftmax:
    model = NumpySoftmax()
    model.input_shape = (1, 28, 28)
    return model


class TorchVictim(nn.Module):
    """A torch module of the Victim contract: white-box attacks reach through it."""

    def __init__(self) -> None:
        super().__init__()
        self.num_clusters, self.input_shape = K, SHAPE
        self.linear = nn.Linear(int(np.prod(SHAPE)), K)
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(_proto(), dtype=torch.float32))
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - 0.5).flatten(1))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x), dim=1)


def torch_victim() -> TorchVictim:
    return TorchVictim()


NOT_A_FACTORY = 42


class _LabelsUndeclared:
    input_shape = SHAPE

    def predict(self, images: np.ndarray) -> np.ndarray:
        return NumpySoftmax().predict_proba(images).argmax(1)


def labels_undeclared() -> _LabelsUndeclared:
    return _LabelsUndeclared()
