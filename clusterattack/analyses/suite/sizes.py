"""How large each of a sweep's analyses is: :class:`AnalysisSizes` and the sweep presets' values."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["AnalysisSizes"]


@dataclass(frozen=True)
class AnalysisSizes:
    """How large each analysis is (the presets' values: :mod:`clusterattack.analyses.suite`).

    ``norm_eps`` None: the sweep's own eps grid; otherwise these values and the grid's.
    ``norm_epochs``/``retraining_fresh_epochs`` cap the generator epochs of the generators
    those analyses train (None: the sweep's). ``baseline_budgets`` are per-image budgets
    tried besides the one at equal total queries.
    """

    grid_images: int = 8
    norm_eps: tuple[float, ...] | None = (0.05, 0.1, 0.15, 0.2)
    norm_reference: str = "whitebox"
    norm_epochs: int | None = None
    detection_images: int = 8000
    detection_trials: int = 100
    detection_fit_images: int = 10_000
    detection_heldout_images: int = 2000
    pca_images: int = 2000
    retraining_epochs: int = 2
    retraining_train_limit: int | None = 20_000
    retraining_fresh_epochs: int | None = None
    baseline_images: int = 1000
    baseline_budgets: tuple[int, ...] = (25, 100, 400, 1600)
    baselines: tuple[str, ...] = ("nes", "spsa", "square")

    def __post_init__(self) -> None:
        from clusterattack.attacks.baselines import BASELINES
        from clusterattack.attacks.config import GRADIENT_SOURCES

        for name in ("grid_images", "detection_images", "detection_trials", "detection_fit_images",
                     "detection_heldout_images", "pca_images", "retraining_epochs", "baseline_images"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("norm_epochs", "retraining_train_limit", "retraining_fresh_epochs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if self.norm_eps is not None:
            eps = tuple(float(e) for e in self.norm_eps)
            if not eps or any(not math.isfinite(e) or e <= 0 for e in eps):
                raise ValueError(f"norm_eps must be positive radii or None (the sweep's grid), got {self.norm_eps!r}")
            object.__setattr__(self, "norm_eps", eps)
        if self.norm_reference not in GRADIENT_SOURCES:
            raise ValueError(f"norm_reference must be one of {GRADIENT_SOURCES}, got {self.norm_reference!r}")
        object.__setattr__(self, "baseline_budgets", tuple(self.baseline_budgets))
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.baseline_budgets):
            raise ValueError(f"baseline_budgets must be per-image image-queries >= 1, got {self.baseline_budgets!r}")
        object.__setattr__(self, "baselines", tuple(self.baselines))
        if not self.baselines or any(b not in BASELINES for b in self.baselines):
            raise ValueError(f"baselines must name some of {tuple(BASELINES)}, got {self.baselines!r}")

    @classmethod
    def preset(cls, name: str) -> AnalysisSizes:
        """The sizes of sweep preset ``name`` ("tiny", "demo", "paper")."""
        presets = {
            "tiny": cls(
                norm_eps=None, detection_images=200, detection_trials=20, detection_fit_images=800,
                detection_heldout_images=300, pca_images=256, retraining_epochs=1, retraining_train_limit=512,
                baseline_images=64, baseline_budgets=(25, 100),
            ),
            "demo": cls(
                norm_eps=(0.05, 0.1, 0.2), detection_images=1000, pca_images=1000, retraining_epochs=1,
                retraining_train_limit=10_000, baseline_images=1000, baseline_budgets=(25, 100, 400),
            ),
            "paper": cls(),
        }  # fmt: skip
        if name not in presets:
            raise ValueError(f"unknown preset {name!r} for analysis sizes, expected one of {tuple(presets)}")
        return presets[name]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
