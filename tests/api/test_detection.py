"""Query detection at the album service: a key that re-uploads copies is refused with 403 and charged nothing."""

from __future__ import annotations

import numpy as np
import pytest

from tests.api.conftest import call
from tests.api.test_service import add, create

pytestmark = pytest.mark.slow

APP = "albums-detect-block"


@pytest.fixture(scope="module")
def block_app(album_env):
    import tests.api.tiny_models as tiny_models
    from clusterattack.api.launch import deploy_album_service
    from clusterattack.api.service import store_actor_name
    from clusterattack.api.store import kill_album_store
    from clusterattack.serving.detection import DetectionConfig
    from clusterattack.serving.detector import kill_detector

    config = album_env.configs["albums-labels"]
    detection = DetectionConfig(policy="block", flag_after=5, flag_window=20, history=64)
    deploy_album_service(tiny_models.PrototypeModel(), name=APP, config=config, ledger=album_env.ledger, detection=detection)
    yield APP
    from ray import serve

    serve.delete(APP)
    kill_album_store(store_actor_name(APP))
    kill_detector(album_env.ledger)


def photos(n: int, seed: int) -> np.ndarray:
    """Distinct 8x8 images (uniform noise: no two share a window)."""
    return np.random.default_rng(seed).random((n, 1, 8, 8)).astype(np.float32)


def test_album_adds_of_copies_are_blocked_and_not_charged(album_env, block_app):
    key, key_id = album_env.new_key(budget=100)
    library = photos(10, seed=5)
    first = create(album_env, key, block_app)
    assert add(album_env, key, first, library, block_app).status_code == 200
    # The same photos in a second album: the fifth copy crosses flag_after, the add is refused.
    second = create(album_env, key, block_app)
    refused = add(album_env, key, second, library[:6], block_app)
    assert refused.status_code == 403, refused.text
    body = refused.json()
    assert body["error"] == "QueryBlocked" and body["reason"] == "query_detection" and body["key_id"] == key_id
    assert album_env.used(key_id) == 10
    # Blocked from now on, new photos too; reading and grouping its albums still works.
    assert add(album_env, key, second, photos(2, seed=6), block_app).status_code == 403
    assert album_env.used(key_id) == 10
    assert call("GET", f"{album_env.url(block_app)}/v1/albums/{second}", key).json()["image_count"] == 0
