"""Deploying the album service: build the Serve app, deploy it, launch it with keys, or run a throwaway one."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from ray import serve

from clusterattack.api.config import AlbumServiceConfig
from clusterattack.api.service import AlbumDeployment, ModelSource, store_actor_name
from clusterattack.api.store import kill_album_store
from clusterattack.serving.deployment import KeySpec, Launched, check_app_name, start_serve
from clusterattack.serving.detection import DetectionConfig
from clusterattack.serving.ledger_actor import LedgerAdmin, LedgerConfig, kill_ledger
from clusterattack.serving.ledger_records import IssuedKey

__all__ = ["build_album_app", "deploy_album_service", "launch_album_service", "local_album_service"]


def build_album_app(
    source: ModelSource,
    *,
    name: str,
    config: AlbumServiceConfig | None = None,
    ledger: LedgerConfig | None = None,
    detection: DetectionConfig | None = None,
):
    """The Serve application of one album service, ready for ``serve.run`` (nothing starts).

    ``detection`` turns query detection on for its adds (``serving.detector``).
    """
    config = config or AlbumServiceConfig()
    check_app_name(name)
    return AlbumDeployment.options(name="albums", **config.serve.deployment_options()).bind(
        source, config, ledger or LedgerConfig(), name, detection
    )


def deploy_album_service(
    source: ModelSource,
    *,
    name: str = "albums",
    config: AlbumServiceConfig | None = None,
    ledger: LedgerConfig | None = None,
    route_prefix: str | None = None,
    detection: DetectionConfig | None = None,
):
    """Deploy (or redeploy) the album service and return its ``DeploymentHandle``."""
    app = build_album_app(source, name=name, config=config, ledger=ledger, detection=detection)
    return serve.run(app, name=name, route_prefix=route_prefix or f"/{name}")


def launch_album_service(
    source: ModelSource,
    *,
    name: str = "albums",
    config: AlbumServiceConfig | None = None,
    ledger: LedgerConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    keys: Sequence[KeySpec] = (),
) -> Launched:
    """Start Serve on ``host:port``, deploy the service, issue attacker keys; URL and keys."""
    ledger = ledger or LedgerConfig()
    check_app_name(name)
    port = start_serve(host, port)
    admin = LedgerAdmin(ledger)
    issued: list[IssuedKey] = [
        admin.create_key(spec.name, budget=spec.budget, rate_per_s=spec.rate_per_s, burst=spec.burst)
        for spec in keys
    ]
    deploy_album_service(source, name=name, config=config, ledger=ledger)
    return Launched(urls={name: f"http://{host}:{port}/{name}"}, keys=issued)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def local_album_service(
    source: ModelSource,
    *,
    budget: int,
    name: str = "albums",
    config: AlbumServiceConfig | None = None,
    port: int | None = None,
    rate_per_s: float | None = None,
    ledger_dir: str | None = None,
    ray_options: dict[str, Any] | None = None,
) -> Iterator[tuple[str, str]]:
    """A throwaway album service on this machine; yields ``(url, api_key)``.

    Starts Ray when it is not running (``ray_options`` go to ``ray.init``), Serve on
    loopback (``port``, default a free one), a fresh ledger in ``ledger_dir`` (default a
    temporary folder) and one attacker key with ``budget`` image-queries. On exit Serve,
    the ledger and album store actors, and a Ray it started are shut down; so it refuses
    to start where Serve already runs.
    """
    import ray

    config = config or AlbumServiceConfig()
    started_ray = not ray.is_initialized()
    if not started_ray and serve.status().proxies:
        # Its exit shuts Serve down, which would take other applications with it.
        raise RuntimeError(
            "Serve already runs in this Ray instance; deploy into it with deploy_album_service "
            "and point an AlbumClient at the app instead of starting a throwaway service"
        )
    if started_ray:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        options = {
            "include_dashboard": False,
            "configure_logging": False,
            "log_to_driver": False,
            "object_store_memory": 256 * 1024**2,
        }
        ray.init(**{**options, **(ray_options or {})})
    folder = ledger_dir or tempfile.mkdtemp(prefix="album-ledger-")
    ledger = LedgerConfig(
        db_path=os.path.join(folder, f"ledger-{uuid.uuid4().hex[:8]}.sqlite"),
        actor_name=f"clusterattack-album-ledger-{uuid.uuid4().hex[:8]}",
    )
    try:
        launched = launch_album_service(
            source,
            name=name,
            config=config,
            ledger=ledger,
            port=port or _free_port(),
            keys=[KeySpec("attacker", budget, rate_per_s)],
        )
        yield launched.urls[name], launched.keys[0].api_key
    finally:
        serve.shutdown()
        kill_album_store(store_actor_name(name), config.store_namespace)
        kill_ledger(ledger)
        if started_ray:
            ray.shutdown()
