"""How a victim is served: the frozen, validated config of one Serve application."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from clusterattack.serving import schema

MODES = ("scores", "labels")


@dataclass(frozen=True)
class AutoscalingSpec:
    """Serve autoscaling between ``min_replicas`` and ``max_replicas`` on queued requests."""

    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 4.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                f"{self.min_replicas} and {self.max_replicas}"
            )
        if not self.target_ongoing_requests > 0:
            raise ValueError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests!r}")


@dataclass(frozen=True)
class ServeConfig:
    """How one victim is served. Validated on construction.

    ``max_batch_size`` counts images per model call; requests smaller than it are merged
    by ``@serve.batch``, larger ones run alone in chunks of it. ``batch_wait_timeout_s``
    is how long a lone request waits for company; the default 0 adds no latency and still
    merges everything that queued while the model was busy, which is when merging pays. ``device`` defaults to ``cuda`` when ``num_gpus > 0``, else ``cpu``.
    ``torch_threads`` sets the replica's intra-op threads (Ray's default otherwise).
    """

    mode: str = "scores"
    num_replicas: int = 1
    autoscaling: AutoscalingSpec | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    device: str | None = None
    torch_threads: int | None = None
    max_batch_size: int = 256
    batch_wait_timeout_s: float = 0.0
    max_images_per_request: int = 4096
    max_request_bytes: int = 16 * 1024 * 1024
    max_ongoing_requests: int = 16
    max_queued_requests: int = -1
    access_log: bool = True  # a log line per request (the sweep's thousands of calls leave it off)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas!r}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus and num_gpus must be >= 0, got {self.num_cpus!r}, {self.num_gpus!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 or None, got {self.torch_threads!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 image, got {self.max_batch_size!r}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s!r}")
        if self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests!r}")
        if self.max_queued_requests < -1:
            raise ValueError(f"max_queued_requests must be >= 0 or -1 (unbounded), got {self.max_queued_requests!r}")
        # Builds (and so validates) the image limits once, here rather than in a replica.
        schema.ImageSpec((1, 1, 1), self.max_images_per_request, self.max_request_bytes)

    @property
    def resolved_device(self) -> str:
        return self.device or ("cuda" if self.num_gpus > 0 else "cpu")

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options`` for this config."""
        actor_options: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor_options["num_gpus"] = self.num_gpus
        options: dict[str, Any] = {
            "ray_actor_options": actor_options,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if not self.access_log:
            options["logging_config"] = {"enable_access_log": False}
        if self.autoscaling is None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = asdict(self.autoscaling)
        return options
