"""Joining a Ray cluster or starting Ray in-process: the one rule every job follows."""

from __future__ import annotations

import logging
import os

__all__ = ["init_ray"]

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, object_store_mb: int = 512, num_cpus: int | None = None) -> bool:
    """Connect to ``address``/``RAY_ADDRESS`` or start Ray in-process; True when started here.

    A Ray already initialised in this process is used as it is (False: not ours to stop).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("connected to the Ray cluster at %s", address)
        return False
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=object_store_mb * 1024 * 1024,
        include_dashboard=False,
        configure_logging=False,
    )
    log.info("started a local Ray: %s", ray.cluster_resources())
    return True
