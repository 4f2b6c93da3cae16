"""The frozen, validated config of one album service: replicas, request limits, grouping, store limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from clusterattack.api.grouping import GroupingSpec
from clusterattack.api.store import StoreLimits
from clusterattack.serving.config import ServeConfig

__all__ = ["AlbumServiceConfig"]


@dataclass(frozen=True)
class AlbumServiceConfig:
    """How one album service runs.

    ``serve`` is the serving layer's own config (replicas, autoscaling, CPUs/GPUs, device,
    torch threads, ``max_batch_size`` images per model call, request size limits, load
    shedding); it must be in ``labels`` mode because the album service answers group ids
    only. ``grouping`` picks the hidden clustering, ``limits`` bound the album store.
    ``charge_grouping`` is False: each image is charged once, when it is added (the
    model runs then); a group call runs no model and, being deterministic, repeats
    reveal nothing new.
    """

    serve: ServeConfig = field(default_factory=lambda: ServeConfig(mode="labels", max_images_per_request=1000))
    grouping: GroupingSpec = field(default_factory=GroupingSpec)
    limits: StoreLimits = field(default_factory=StoreLimits)
    store_namespace: str = "clusterattack"

    def __post_init__(self) -> None:
        for name, cls in (("serve", ServeConfig), ("grouping", GroupingSpec), ("limits", StoreLimits)):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        if self.serve.mode != "labels":
            raise ValueError(
                f"the album service answers group ids only: serve.mode must be 'labels', got {self.serve.mode!r}"
            )
        if not self.store_namespace:
            raise ValueError("store_namespace must be a non-empty Ray namespace")
