"""Building, deploying and launching victim apps on Ray Serve: the Serve side of ``jobs/serve.py``.

The replica itself (FastAPI ingress, budget checks, batched model calls) is
:class:`~clusterattack.serving.deployment.VictimDeployment`; every name here is importable
from :mod:`clusterattack.serving.deployment` too.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ray import serve
from ray.exceptions import ActorDiedError

from clusterattack.serving.config import ServeConfig
from clusterattack.serving.detection import DetectionConfig
from clusterattack.serving.errors import RequestConflict
from clusterattack.serving.ledger_actor import LedgerAdmin, LedgerConfig
from clusterattack.serving.ledger_records import IssuedKey

if TYPE_CHECKING:
    from clusterattack.serving.deployment import VictimSource

__all__ = [
    "KeySpec",
    "Launched",
    "build_victim_app",
    "check_app_name",
    "deploy_victim",
    "launch_victims",
    "start_serve",
]

logger = logging.getLogger(__name__)

_APP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_app_name(name: str) -> str:
    if not isinstance(name, str) or not _APP_NAME.match(name):
        raise ValueError(
            f"victim app name must be 1-63 characters of letters, digits and _.- "
            f"(it becomes the route prefix), got {name!r}"
        )
    return name


def build_victim_app(
    source: VictimSource,
    *,
    name: str,
    config: ServeConfig | None = None,
    ledger: LedgerConfig | None = None,
    detection: DetectionConfig | None = None,
):
    """The Serve application of one victim, ready for ``serve.run`` (nothing starts here).

    ``detection`` turns query detection on for this app (its policy; see ``serving.detector``).
    """
    from clusterattack.serving.deployment import (
        VictimDeployment,  # FastAPI and the ingress: only when built
    )

    config = config or ServeConfig()
    ledger = ledger or LedgerConfig()
    check_app_name(name)
    return VictimDeployment.options(name="victim", **config.deployment_options()).bind(
        source, config, ledger, name, detection or DetectionConfig()
    )


def deploy_victim(
    source: VictimSource,
    *,
    name: str,
    config: ServeConfig | None = None,
    ledger: LedgerConfig | None = None,
    route_prefix: str | None = None,
    detection: DetectionConfig | None = None,
):
    """Deploy (or redeploy) one victim app and return its ``DeploymentHandle``.

    Serve must be running or is started with its defaults; call :func:`start_serve` first
    to choose the HTTP address.
    """
    app = build_victim_app(source, name=name, config=config, ledger=ledger, detection=detection)
    return serve.run(app, name=name, route_prefix=route_prefix or f"/{name}")


def start_serve(host: str = "127.0.0.1", port: int = 8000) -> int:
    """Start Serve (in the connected Ray) with its HTTP proxy on ``host:port``; returns its port.

    Serve has one HTTP proxy configuration per cluster: when it is already running, Serve
    keeps the running one and ignores ``port``. The port it really listens on is returned
    (and a differing one logged), so that URLs are built from where requests are answered.
    """
    for attempt in range(3):
        try:
            serve.start(http_options={"host": host, "port": port})
            break
        except ActorDiedError as err:
            # Seen on a busy machine when Serve is started again in the same Ray: the new
            # controller gives up on a proxy that has not started in time and kills it, and
            # serve.start, waiting on that proxy, fails. The controller stays up and makes
            # another proxy: ask again.
            if attempt == 2 or "ProxyActor" not in str(err):
                raise
            logger.warning("Serve's HTTP proxy died while starting (%s); starting Serve again", err)
            time.sleep(2.0)
    try:
        from ray.serve.context import _get_global_client

        actual = int(_get_global_client().http_config.port)
    except Exception as err:  # a private accessor: fall back to what was asked for
        logger.debug("could not read Serve's HTTP port (%s); assuming %d", err, port)
        return port
    if actual != port:
        logger.warning("Serve was already running with its HTTP proxy on port %d (not %d): using it", actual, port)
    return actual


@dataclass(frozen=True)
class KeySpec:
    """An attacker key to issue at launch: a name, a budget and an optional rate limit."""

    name: str
    budget: int
    rate_per_s: float | None = None
    burst: float | None = None


@dataclass(frozen=True)
class Launched:
    """What :func:`launch_victims` started: URL per app and the keys it issued."""

    urls: dict[str, str]
    keys: list[IssuedKey] = field(default_factory=list)


def launch_victims(
    victims: Mapping[str, VictimSource],
    *,
    config: ServeConfig,
    ledger: LedgerConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    keys: Sequence[KeySpec] = (),
    admin_key: str | None = None,
    detection: DetectionConfig | None = None,
) -> Launched:
    """Start Serve, deploy every victim, issue keys; the body of ``jobs/serve.py``.

    An admin key is issued when the ledger has none (or ``admin_key`` is imported if new).
    ``detection`` applies to every victim deployed.
    """
    for name in victims:
        check_app_name(name)
    port = start_serve(host, port)
    admin = LedgerAdmin(ledger)
    issued: list[IssuedKey] = []
    has_admin = any(s.role == "admin" and not s.revoked for s in admin.list_keys())
    if admin_key is not None:
        try:
            issued.append(admin.create_key("admin", role="admin", api_key=admin_key))
        except RequestConflict:
            logger.info("the given admin key is already in the ledger")
    elif not has_admin:
        issued.append(admin.create_key("admin", role="admin"))
    for spec in keys:
        issued.append(
            admin.create_key(
                spec.name, budget=spec.budget, rate_per_s=spec.rate_per_s, burst=spec.burst
            )
        )
    urls = {}
    for name, source in victims.items():
        deploy_victim(source, name=name, config=config, ledger=ledger, detection=detection)
        urls[name] = f"http://{host}:{port}/{name}"
    return Launched(urls=urls, keys=issued)
