"""NES baseline: ART's query-efficient gradient estimate (Ilyas et al., ICML 2018) driving ART's PGD."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clusterattack.attacks.baselines.base import (
    BaselineAttack,
    BaselineConfig,
    MemoPredict,
    art_classifier,
    art_norm,
    check_fraction,
    check_int,
    check_positive,
    pgd_step_fraction,
)
from clusterattack.victims.base import Victim

__all__ = ["NESAttack", "NESConfig"]


def _nes_estimator(classifier: Any, samples: int, sigma: float, batch: int):
    """ART's NES estimator with its loss vectorised: same draws, same formula, far less Python.

    ART's ``loss_gradient`` scores every sample with ``scipy.stats.entropy`` one at a time
    (milliseconds each, most of the attack's run time) and predicts image by image; this
    subclass computes the same KL(y || p) of the clean one-hot y for all samples of all
    images at once and asks the victim in calls of ``batch`` images. The Gaussian
    directions (one draw shared by the batch, as in ART) and the estimate are unchanged.
    """
    from art.estimators.classification import QueryEfficientGradientEstimationClassifier

    class VectorisedNES(QueryEfficientGradientEstimationClassifier):
        def loss_gradient(self, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> np.ndarray:
            q = self.num_basis
            epsilon_map = self.sigma * np.random.normal(size=([q] + list(self.input_shape)))
            points = [self._generate_samples(x[i : i + 1], epsilon_map) for i in range(len(x))]
            minus = np.concatenate([m for m, _ in points])
            plus = np.concatenate([p for _, p in points])
            answers = self.predict(np.concatenate([minus, plus]), batch_size=batch)
            # scipy.stats.entropy normalises both arguments; so does this.
            probs = answers / answers.sum(1, keepdims=True)
            target = np.repeat(y / y.sum(1, keepdims=True), q, axis=0)
            safe = np.where(target > 0, target, 1.0)  # 0 log 0 = 0, as scipy's rel_entr
            kl_minus = (target * np.log(safe / np.clip(probs[: len(minus)], 1e-30, None))).sum(1)
            kl_plus = (target * np.log(safe / np.clip(probs[len(minus) :], 1e-30, None))).sum(1)
            diff = (kl_plus - kl_minus).reshape(len(x), q, 1) / (2 * self.sigma)
            grads = 2 * np.mean(epsilon_map.reshape(1, q, -1) * diff, axis=1).reshape(x.shape)
            return self._apply_preprocessing_gradient(x, grads)

    return VectorisedNES(classifier, num_basis=samples, sigma=sigma)


@dataclass(frozen=True)
class NESConfig(BaselineConfig):
    """NES (Ilyas et al., "Black-box adversarial attacks with limited queries and information", 2018).

    Each PGD iteration estimates the gradient of the cross-entropy -log M_y(x) of the
    clean cluster y from ``samples`` antithetic pairs x +- sigma u, u ~ N(0, I) at full
    resolution (ART's ``QueryEfficientGradientEstimationClassifier``), and takes a signed
    (L-inf) or normalised (L2) ascent step of ``step_fraction * eps``. Per image: 1 clean
    query, ``2 * samples`` per iteration and 1 for ART's closing success check, so
    ``(max_queries - 2) // (2 * samples)`` iterations. Defaults: q = 10, sigma = 0.02, as
    PAPER.md measured NES at.
    """

    samples: int = 10  # antithetic pairs per iteration (ART's num_basis)
    sigma: float = 0.02  # std of the finite-difference noise on [0, 1] images
    step_fraction: float | None = None  # PGD step / eps; None: min(1, 2.5 / iterations)

    def __post_init__(self) -> None:
        check_int("samples", self.samples, 1)
        check_positive("sigma", self.sigma)
        if self.step_fraction is not None:
            check_fraction("step_fraction", self.step_fraction)
        super().__post_init__()

    def min_queries(self) -> int:
        return 2 + 2 * self.samples

    def iterations(self) -> int:
        return (self.max_queries - 2) // (2 * self.samples)


class NESAttack(BaselineAttack):
    """Untargeted NES-PGD away from each image's clean cluster, L-inf or L2, through ART.

    Shapes: images N x C x H x W in [0, 1]; the victim is seen only through
    ``predict_proba`` (wrapped as an ART ``BlackBoxClassifier``).
    """

    name = "nes"
    config_class = NESConfig

    def _attack(
        self, victim: Victim, predict: MemoPredict, images: np.ndarray, clean: np.ndarray, progress: bool
    ) -> tuple[np.ndarray, dict[str, Any]]:
        from art.attacks.evasion import ProjectedGradientDescent

        cfg: NESConfig = self.config  # type: ignore[assignment]
        iterations = cfg.iterations()
        fraction = pgd_step_fraction(cfg.step_fraction, iterations)
        clf = art_classifier(predict, victim.input_shape, victim.num_clusters)
        nes = _nes_estimator(clf, cfg.samples, cfg.sigma, cfg.query_batch)
        pgd = ProjectedGradientDescent(
            nes,
            norm=art_norm(cfg.norm),
            eps=cfg.eps,
            eps_step=fraction * cfg.eps,
            max_iter=iterations,
            targeted=False,
            num_random_init=0,
            batch_size=cfg.query_batch,
            verbose=progress,
        )
        onehot = np.eye(victim.num_clusters, dtype=np.float32)[clean.argmax(1)]
        adv = pgd.generate(images, y=onehot)
        return adv, {"step_fraction": fraction, "queries_per_iteration": 2 * cfg.samples}

