"""Victims built from a model of any kind: the contract over a backend that answers raw arrays.

A backend is a callable from images (float N x C x H x W in [0, 1]) to what the model
answers (memberships, logits or cluster ids, as a tensor, array or list). ``ScoresVictim``
keeps the Victim contract (``predict_proba``, and ``predict`` as its argmax);
``LabelsVictim`` keeps the decision-only one (``predict``). Both check every answer
(``answers``) and say where they came from in ``describe()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from clusterattack.victims.base import check_images
from clusterattack.victims.sources.answers import as_tensor, check_labels, to_memberships

__all__ = ["Backend", "LabelsVictim", "ScoresVictim", "build_victim_from_backend"]

Backend = Callable[[torch.Tensor], Any]


class _BackendVictim:
    def __init__(
        self,
        backend: Backend,
        *,
        name: str,
        spec: str,
        kind: str,
        num_clusters: int,
        input_shape: tuple[int, int, int],
        output: str,
        differentiable: bool = False,
    ) -> None:
        self._backend = backend
        self.name = name
        self.spec = spec
        self.kind = kind
        self.num_clusters = int(num_clusters)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.output = output
        self.differentiable = bool(differentiable)

    @property
    def _who(self) -> str:
        return f"victim {self.spec!r}"

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.input_shape)
        grad = contextlib.nullcontext() if self.differentiable else torch.no_grad()
        with grad:
            out = self._backend(x if self.differentiable else x.detach())
        return as_tensor(out, self._who)

    def describe(self) -> dict[str, Any]:
        """What a record says about this victim: its spec, kind, output, clusters and input shape."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "output": self.output,
            "num_clusters": self.num_clusters,
            "input_shape": list(self.input_shape),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.spec!r}, {self.output}, K={self.num_clusters}, "
            f"input {'x'.join(map(str, self.input_shape))})"
        )


class ScoresVictim(_BackendVictim):
    """A model that answers memberships or logits, as the Victim contract.

    ``predict_proba`` gives float32 memberships on the input's device (the softmax of
    logits), checked to be probabilities; with ``differentiable`` (a torch backend) the
    autograd graph is kept, so a white-box attack can use it.
    """

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        out = self._raw(x)
        probs = to_memberships(out, self.output, int(x.shape[0]), self.num_clusters, self._who)
        return probs.to(x.device)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster id per image: the argmax of the memberships."""
        return self.predict_proba(x).argmax(dim=1)


class LabelsVictim(_BackendVictim):
    """A model that answers cluster ids only: the decision-only contract (``predict``)."""

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        out = self._raw(x)
        return check_labels(out, int(x.shape[0]), self.num_clusters, self._who).to(x.device)


def build_victim_from_backend(backend: Backend, *, output: str, **kwargs: Any) -> ScoresVictim | LabelsVictim:
    """``LabelsVictim`` for ``output="labels"``, else ``ScoresVictim``."""
    cls = LabelsVictim if output == "labels" else ScoresVictim
    return cls(backend, output=output, **kwargs)
