"""Square attack baseline (Andriushchenko et al., ECCV 2020) through ART's ``SquareAttack``."""

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
)
from clusterattack.victims.base import Victim

__all__ = ["SquareAttack", "SquareConfig"]


@dataclass(frozen=True)
class SquareConfig(BaselineConfig):
    """Square attack (Andriushchenko et al., "Square Attack: a query-efficient black-box
    adversarial attack via random search", ECCV 2020), L-inf or L2.

    Random search: each iteration proposes a square of side sqrt(p * H * W) at a corner
    of the ball (L-inf) or a redistributed square (L2) and keeps it when the margin loss of
    the clean cluster falls. ``p_init`` is the initial fraction p (ART's default 0.8,
    halved on ART's schedule). ART stops querying an image once its cluster changed; it
    also re-asks points it has seen, which the attack's answer cache serves, so an image
    costs 1 clean query, 1 for the initial stripes and at most 1 per iteration:
    ``max_queries - 2`` iterations.
    """

    p_init: float = 0.8

    def __post_init__(self) -> None:
        check_fraction("p_init", self.p_init)
        super().__post_init__()

    def min_queries(self) -> int:
        return 3

    def iterations(self) -> int:
        return self.max_queries - 2


class SquareAttack(BaselineAttack):
    """Untargeted Square attack away from each image's clean cluster (ART's implementation, one restart).

    Shapes: images N x C x H x W in [0, 1], H and W >= 8; the victim is seen only
    through ``predict_proba`` (wrapped as an ART ``BlackBoxClassifier``).
    """

    name = "square"
    config_class = SquareConfig

    def _attack(
        self, victim: Victim, predict: MemoPredict, images: np.ndarray, clean: np.ndarray, progress: bool
    ) -> tuple[np.ndarray, dict[str, Any]]:
        from art.attacks.evasion import SquareAttack as ARTSquareAttack

        cfg: SquareConfig = self.config  # type: ignore[assignment]
        clf = art_classifier(predict, victim.input_shape, victim.num_clusters)
        square = ARTSquareAttack(
            clf,
            norm=art_norm(cfg.norm),
            eps=cfg.eps,
            max_iter=cfg.iterations(),
            p_init=cfg.p_init,
            nb_restarts=1,  # the query plan counts one restart
            batch_size=cfg.query_batch,
            verbose=progress,
        )
        onehot = np.eye(victim.num_clusters, dtype=np.float32)[clean.argmax(1)]
        adv = square.generate(images, y=onehot)
        return adv, {}
