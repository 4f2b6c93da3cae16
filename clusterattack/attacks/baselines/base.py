"""Shared machinery of the per-image score-based baselines: config, clean clusters, ART bridge, projection.

The supervised score-based attacks (NES, SPSA, Square) are adapted to clustering as in
Appendix E of Chhabra et al. (NeurIPS 2022): the victim's clean cluster of each image,
argmax of its clean memberships M_i (queried once), is the label the attack moves away
from (untargeted). Unlike the generator attack, each new image costs the full attack's
queries; ``max_queries`` is that per-image budget, so attacks compare at equal
image-queries. Queries are counted by the victim passed in (``CountingVictim`` or
``ServedVictim``), never here: ``run`` only reads the counters.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch

from clusterattack.attacks.config import NORMS
from clusterattack.attacks.counting import read_counts
from clusterattack.attacks.generator import perturbation_norms, project_perturbation
from clusterattack.attacks.gradients.base import query_memberships
from clusterattack.victims.base import Victim, check_images

__all__ = ["BaselineAttack", "BaselineConfig", "BaselineResult", "MemoPredict", "art_classifier"]

log = logging.getLogger(__name__)


def check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_fraction(name: str, value: Any) -> None:
    check_positive(name, value)
    if value > 1:
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")


@dataclass(frozen=True)
class BaselineConfig:
    """What every baseline shares: the norm ball, the per-image query budget, batching, seed.

    ``max_queries`` is the budget in image-queries per attacked image, the clean query
    included; an attack plans its iterations so that it never spends more.
    """

    norm: str = "linf"
    eps: float = 0.1
    max_queries: int = 1000
    query_batch: int = 256  # images per victim call, as the paper's Table 2 counts
    seed: int = 0

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        check_positive("eps", self.eps)
        if self.norm == "linf" and self.eps > 1:
            raise ValueError(f"eps for norm 'linf' on [0, 1] images must be <= 1, got {self.eps!r}")
        check_int("max_queries", self.max_queries, 1)
        check_int("query_batch", self.query_batch, 1)
        check_int("seed", self.seed, 0)
        minimum = self.min_queries()
        if self.max_queries < minimum:
            raise ValueError(
                f"max_queries must be >= {minimum} image-queries per image for one iteration of "
                f"{type(self).__name__} with these settings, got {self.max_queries}"
            )

    def min_queries(self) -> int:
        """The smallest per-image budget that pays for the clean query and one iteration."""
        return 1

    def iterations(self) -> int:
        """Iterations the per-image budget pays for."""
        return self.max_queries - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def override(self, **changes: Any) -> BaselineConfig:
        """A validated copy with fields changed."""
        return replace(self, **changes)


@dataclass
class BaselineResult:
    """Adversarial images (N x C x H x W in [0, 1], inside the eps-ball) and what the run did."""

    adv_images: torch.Tensor
    clean_memberships: torch.Tensor
    info: dict[str, Any]


def _key(row: np.ndarray) -> bytes:
    return hashlib.blake2b(row.tobytes(), digest_size=16).digest()


class MemoPredict:
    """The attacker's memory of answers: numpy N x C x H x W float32 -> memberships N x K.

    ART's Square attack asks the same points more than once (the current iterate's loss
    right after predicting it; the restart check on the clean images); a real attacker
    would remember the answers, so repeats are served from an LRU cache of ``capacity``
    images and only new points reach the victim, in calls of at most ``batch`` images.
    """

    def __init__(self, victim: Victim, batch: int, capacity: int) -> None:
        self.victim = victim
        self.batch = batch
        self.capacity = capacity
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._pinned: dict[bytes, np.ndarray] = {}

    def pin(self, x: np.ndarray) -> np.ndarray:
        """Memberships of ``x`` (the clean images), kept for the whole run whatever the cache evicts."""
        answers = self(x)
        for row, answer in zip(np.ascontiguousarray(x, dtype=np.float32), answers, strict=True):
            self._pinned[_key(np.clip(row, 0.0, 1.0))] = answer
        return answers

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.clip(x, 0.0, 1.0), dtype=np.float32)
        keys = [_key(row) for row in x]
        out = np.empty((x.shape[0], self.victim.num_clusters), dtype=np.float32)
        missing: dict[bytes, list[int]] = {}
        for i, key in enumerate(keys):
            hit = self._pinned.get(key)
            if hit is None:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
            if hit is None:
                missing.setdefault(key, []).append(i)
            else:
                out[i] = hit
        if missing:
            first = [rows[0] for rows in missing.values()]
            answers = query_memberships(self.victim, torch.from_numpy(x[first]), self.batch).numpy()
            for (key, rows), answer in zip(missing.items(), answers, strict=True):
                out[rows] = answer
                self._cache[key] = answer
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return out


def art_classifier(predict: MemoPredict, input_shape: tuple[int, int, int], num_clusters: int):
    """The victim as ART sees it: a black-box classifier on NCHW float32 in [0, 1], clusters as classes.

    ``BlackBoxClassifierNeuralNetwork`` rather than ``BlackBoxClassifier``: the same
    predict-function wrapper, but it also satisfies the estimator requirements of ART's
    Square attack and takes ``channels_first``.
    """
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    return BlackBoxClassifierNeuralNetwork(
        predict, tuple(input_shape), num_clusters, channels_first=True, clip_values=(0.0, 1.0)
    )


def art_norm(norm: str) -> float:
    """ART's ``norm`` argument for the project's norm name: np.inf for L-inf, 2 for L2."""
    return np.inf if norm == "linf" else 2


def pgd_step_fraction(step_fraction: float | None, iterations: int) -> float:
    """Step as a fraction of eps: the given one, or Madry et al.'s 2.5 eps / iterations (at most eps)."""
    return step_fraction if step_fraction is not None else min(1.0, 2.5 / iterations)


@contextlib.contextmanager
def numpy_seed(seed: int) -> Iterator[None]:
    """Seed numpy's global generator (ART draws from it) and restore the caller's state after."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def project_images(clean: torch.Tensor, adv: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """clamp(x + P(x_adv - x), 0, 1) with P the projection onto the ``norm`` ball of radius ``eps``."""
    delta = project_perturbation(adv - clean, norm, eps, hard_clamp=True)
    return (clean + delta).clamp(0.0, 1.0)


def _count_delta(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


class BaselineAttack(abc.ABC):
    """A per-image score-based attack: ``run(victim, images)`` -> adversarial images and info.

    Subclasses set ``name`` and ``config_class`` and implement ``_attack`` on numpy
    images with the clean memberships at hand. ``run`` queries the clean memberships
    once, calls ``_attack`` under a seeded numpy generator, projects the result onto the
    norm ball and [0, 1] whatever the attack returned, and reads the victim's counters.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[BaselineConfig]] = BaselineConfig

    def __init__(self, config: BaselineConfig | None = None, **changes: Any) -> None:
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise ValueError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config.override(**changes) if changes else config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @abc.abstractmethod
    def _attack(
        self,
        victim: Victim,
        predict: MemoPredict,
        images: np.ndarray,
        clean: np.ndarray,
        progress: bool,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Adversarial images (numpy, same shape) and attack-specific info."""

    def run(self, victim: Victim, images: torch.Tensor, *, progress: bool = False) -> BaselineResult:
        """Attack every image of ``images`` (N x C x H x W in [0, 1]) within ``config.max_queries`` each."""
        check_images(images, victim.input_shape)
        cfg = self.config
        x = images.detach().to("cpu", torch.float32)
        n = int(x.shape[0])
        before = read_counts(victim)
        # Room for one iteration's worth of distinct points of every image, twice over.
        predict = MemoPredict(victim, cfg.query_batch, capacity=max(4 * n, 1024))
        with numpy_seed(cfg.seed), torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            x_np = x.numpy()
            clean = predict.pin(x_np)
            with np.errstate(divide="ignore", invalid="ignore"):
                adv_np, extra = self._attack(victim, predict, x_np, clean, progress)
        adv = torch.as_tensor(np.asarray(adv_np), dtype=torch.float32)
        # ART's L2 Square can divide 0 by 0 on tiny images; such a pixel keeps its clean value.
        adv = project_images(x, torch.where(torch.isfinite(adv), adv, x), cfg.norm, cfg.eps)
        after = read_counts(victim)
        queries = _count_delta(after[0], before[0])
        clean_t = torch.from_numpy(clean)
        l2, linf = perturbation_norms(adv - x)
        info: dict[str, Any] = {
            "attack": self.name,
            **{f"{self.name}.{k}": v for k, v in cfg.to_dict().items()},
            "norm": cfg.norm,
            "eps": cfg.eps,
            "max_queries_per_image": cfg.max_queries,
            "iterations": cfg.iterations(),
            "n_images": n,
            "image_queries": queries,
            "calls": _count_delta(after[1], before[1]),
            "image_queries_per_image": None if queries is None or n == 0 else queries / n,
            "l2_max": float(l2.max()) if n else 0.0,
            "linf_max": float(linf.max()) if n else 0.0,
            **extra,
        }
        if queries is not None and queries > n * cfg.max_queries:
            # Planning is analytic; a miss here is a bug worth shouting about, not hiding.
            log.error("%s spent %d image-queries, over its budget of %d", self.name, queries, n * cfg.max_queries)
        return BaselineResult(adv, clean_t, info)
