"""The in-memory image dataset every reader returns and every job consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SPLITS = ("train", "test")


@dataclass(frozen=True)
class ImageDataset:
    """Images as uint8 N x C x H x W, integer labels, and which split each row belongs to.

    ``labels`` are class ids 0..len(class_names)-1; they are used only to score clusterings,
    never by an attack. ``source`` says where the data came from (a path, a package).
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    class_names: tuple[str, ...]
    source: str
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"{self.name}: images must be uint8 N x C x H x W, got {self.images.dtype} "
                f"with shape {self.images.shape}"
            )
        n = self.images.shape[0]
        if self.labels.shape != (n,) or self.split.shape != (n,):
            raise ValueError(
                f"{self.name}: {n} images but labels {self.labels.shape} and split "
                f"{self.split.shape}"
            )
        bad = set(np.unique(self.split).tolist()) - set(SPLITS)
        if bad:
            raise ValueError(f"{self.name}: unknown split names {sorted(bad)}, expected {SPLITS}")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(
                f"{self.name}: labels must lie in 0..{len(self.class_names) - 1}, got "
                f"{self.labels.min()}..{self.labels.max()}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """C, H, W of one image."""
        return tuple(int(v) for v in self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, split: str | None = None, limit: int | None = None, seed: int = 0):
        """Rows of one split (or all), optionally a seeded random ``limit`` of them."""
        idx = np.arange(len(self)) if split is None else np.flatnonzero(self.split == split)
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")
        if limit is not None and limit < idx.size:
            idx = np.sort(np.random.default_rng(seed).choice(idx, size=limit, replace=False))
        return ImageDataset(
            self.name,
            self.images[idx],
            self.labels[idx],
            self.split[idx],
            self.class_names,
            self.source,
            dict(self.extra),
        )

    def as_float(self):
        """Images as a float32 torch tensor in [0, 1] (N x C x H x W) and int64 labels."""
        import torch

        x = torch.from_numpy(self.images).float().div_(255.0)
        return x, torch.from_numpy(self.labels.astype(np.int64))
