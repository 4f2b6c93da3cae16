"""Fixtures of the album service tests: one Serve instance for the package, two album apps.

Starting Ray, Serve and the replicas costs tens of seconds on two shared cores, so the
apps are deployed once (package scope) and shut down after the last test here. Tests
that spend budget create their own keys, so they do not depend on each other's order.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
import requests

from tests.conftest import free_port

LABELS_APP = "albums-labels"
KMEANS_APP = "albums-kmeans"
MAX_PER_REQUEST = 32
MAX_PER_ALBUM = 40
MAX_ALBUMS = 3


@dataclass
class AlbumEnv:
    port: int
    admin: object
    admin_key: str
    labels_handle: object
    ledger: object
    configs: dict

    def url(self, app: str = LABELS_APP) -> str:
        return f"http://127.0.0.1:{self.port}/{app}"

    def new_key(self, budget: int = 1000, **kwargs) -> tuple[str, str]:
        """A fresh attacker key: (api_key, key_id)."""
        issued = self.admin.create_key(f"t-{uuid.uuid4().hex[:6]}", budget=budget, **kwargs)
        return issued.api_key, issued.key_id

    def used(self, key_id: str) -> int:
        return self.admin.key_status(key_id).used


def call(method: str, url: str, key: str | None, **kwargs) -> requests.Response:
    headers = dict(kwargs.pop("headers", {}))
    if key is not None:
        headers["X-API-Key"] = key
    return requests.request(method, url, headers=headers, timeout=60, **kwargs)


@pytest.fixture(scope="package")
def album_env(ray_session, tmp_path_factory):
    import ray.cloudpickle
    from ray import serve

    import tests.api.tiny_models as tiny_models
    from clusterattack.api.config import AlbumServiceConfig
    from clusterattack.api.grouping import GroupingSpec
    from clusterattack.api.launch import deploy_album_service
    from clusterattack.api.service import store_actor_name
    from clusterattack.api.store import StoreLimits, kill_album_store
    from clusterattack.serving.config import ServeConfig
    from clusterattack.serving.deployment import start_serve
    from clusterattack.serving.ledger_actor import LedgerAdmin, LedgerConfig, kill_ledger

    # The replicas cannot import the tests folder: ship the test model by value.
    ray.cloudpickle.register_pickle_by_value(tiny_models)
    ledger = LedgerConfig(
        db_path=str(tmp_path_factory.mktemp("album-ledger") / "ledger.sqlite"),
        actor_name=f"test-album-ledger-{uuid.uuid4().hex[:8]}",
    )
    # Serve keeps one HTTP proxy per Ray session: another package's may still be up.
    port = start_serve("127.0.0.1", free_port())
    admin = LedgerAdmin(ledger)
    admin_key = admin.create_key("root", role="admin").api_key
    serve_config = ServeConfig(
        mode="labels",
        num_cpus=0.25,
        torch_threads=1,
        max_batch_size=16,
        max_images_per_request=MAX_PER_REQUEST,
        max_request_bytes=64 * 1024,
    )
    limits = StoreLimits(max_images_per_album=MAX_PER_ALBUM, max_albums_per_key=MAX_ALBUMS)
    handles, configs = {}, {}
    for app, grouping in ((LABELS_APP, GroupingSpec("labels")), (KMEANS_APP, GroupingSpec("kmeans", max_groups=6))):
        configs[app] = AlbumServiceConfig(serve=serve_config, grouping=grouping, limits=limits)
        handles[app] = deploy_album_service(
            tiny_models.PrototypeModel(), name=app, config=configs[app], ledger=ledger
        )
    yield AlbumEnv(
        port=port,
        admin=admin,
        admin_key=admin_key,
        labels_handle=handles[LABELS_APP],
        ledger=ledger,
        configs=configs,
    )
    serve.shutdown()
    for app in handles:
        kill_album_store(store_actor_name(app))
    kill_ledger(ledger)
