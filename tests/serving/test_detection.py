"""Query detection in the served victim: block answers 403 and charges nothing, flag lists and
lets through, state is shared by replicas and survives their kill and the detector's restart."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import ray
import requests
import torch

from clusterattack.serving.client import ServedVictim
from clusterattack.serving.detection import DetectionConfig
from clusterattack.serving.detector import DetectorAdmin, kill_detector
from clusterattack.serving.errors import QueryBlocked
from tests.serving.conftest import tiny_images

pytestmark = pytest.mark.slow

BLOCK_APP = "tiny-detect-block"
FLAG_APP = "tiny-detect-flag"
DETECTION = DetectionConfig(flag_after=5, history=256)


@pytest.fixture(scope="module")
def apps(serve_env):
    from ray import serve

    from clusterattack.serving.deployment import deploy_victim

    deploy_victim(
        serve_env.source, name=BLOCK_APP, config=serve_env.scores_config, ledger=serve_env.ledger_config,
        detection=DETECTION.with_policy("block"),
    )
    deploy_victim(
        serve_env.source, name=FLAG_APP, config=serve_env.labels_config, ledger=serve_env.ledger_config,
        detection=DETECTION.with_policy("flag"),
    )
    base = f"http://127.0.0.1:{serve_env.port}"
    yield {"block": f"{base}/{BLOCK_APP}", "flag": f"{base}/{FLAG_APP}"}
    serve.delete(BLOCK_APP)
    serve.delete(FLAG_APP)
    kill_detector(serve_env.ledger_config)


def post(url: str, api_key: str, images: np.ndarray, request_id: str | None = None) -> requests.Response:
    buf = io.BytesIO()
    np.save(buf, images.astype(np.float32))
    headers = {"X-API-Key": api_key, "Content-Type": "application/x-npy"}
    if request_id:
        headers["Idempotency-Key"] = request_id
    return requests.post(url + "/v1/predict", data=buf.getvalue(), headers=headers, timeout=60)


def admin_listing(url: str, admin_key: str, **params) -> dict[str, dict]:
    answer = requests.get(url + "/admin/detection", headers={"X-API-Key": admin_key}, params=params, timeout=60)
    assert answer.status_code == 200, answer.text
    return {row["key_id"]: row for row in answer.json()}


def test_block_answers_403_naming_the_reason_and_charges_nothing(serve_env, apps):
    api_key, key_id = serve_env.new_key(budget=1000)
    images = tiny_images(12, seed=101)
    assert post(apps["block"], api_key, images).status_code == 200  # distinct images: no match
    # Two exact repeats, two shifted down a row, two with faint noise: 6 matches >= flag_after
    # (5), crossed at the fifth, in this request.
    noise = 0.002 * np.random.default_rng(0).standard_normal((2, 1, 8, 8))
    near = np.concatenate([images[:2], np.roll(images[2:4], 1, axis=2), np.clip(images[4:6] + noise, 0, 1)])
    refused = post(apps["block"], api_key, near)
    assert refused.status_code == 403, refused.text
    body = refused.json()
    assert body["error"] == "QueryBlocked" and body["reason"] == "query_detection" and body["key_id"] == key_id
    assert "query detection" in body["detail"] and "nothing was charged" in body["detail"]
    # Every later request of the key is refused too, fresh images or not, and none is charged.
    assert post(apps["block"], api_key, tiny_images(4, seed=102)).status_code == 403
    with ServedVictim(apps["block"], api_key) as victim, pytest.raises(QueryBlocked, match=key_id):
        victim.predict_proba(torch.from_numpy(tiny_images(2, seed=103)))
    status = serve_env.admin.key_status(key_id)
    assert status.used == 12 and status.remaining == 988
    assert serve_env.admin.audit(key_id) == {"reserved": 0, "committed": 12, "refunded": 0, "used": 12}
    listed = admin_listing(apps["block"], serve_env.admin_key, flagged="true")[key_id]
    assert listed["flagged"] and listed["flag_query"] == 17 and listed["first_match_query"] == 13
    # An admin clears the flag: the key is served again, from an empty history.
    cleared = requests.post(
        f"{apps['block']}/admin/keys/{key_id}/detection/clear", headers={"X-API-Key": serve_env.admin_key}, timeout=60
    )
    assert cleared.status_code == 200 and not cleared.json()["flagged"]
    assert post(apps["block"], api_key, images[:6]).status_code == 200
    assert serve_env.admin.key_status(key_id).used == 18


def test_flag_lets_requests_through_and_lists_the_key(serve_env, apps):
    api_key, key_id = serve_env.new_key(budget=1000)
    images = tiny_images(8, seed=201)
    for attempt in range(3):  # the same 8 images three times: 16 matches
        answer = post(apps["flag"], api_key, images)
        assert answer.status_code == 200, (attempt, answer.text)
    # A retry with the same Idempotency-Key is neither charged nor matched again.
    assert post(apps["flag"], api_key, images, request_id="same-id").status_code == 200
    assert post(apps["flag"], api_key, images, request_id="same-id").status_code == 200
    row = admin_listing(apps["flag"], serve_env.admin_key)[key_id]
    assert row["flagged"] and row["queries"] == 32 and row["matched"] == 24 and row["flag_query"] == 13
    assert serve_env.admin.key_status(key_id).used == 32
    # The info endpoint names the policy; admin endpoints need an admin key.
    info = requests.get(apps["flag"] + "/v1/info", headers={"X-API-Key": api_key}, timeout=60).json()
    assert info["detection"] == "flag"
    assert requests.get(apps["flag"] + "/admin/detection", headers={"X-API-Key": api_key}, timeout=60).status_code == 403


def test_keys_of_one_owner_are_one_history(serve_env, apps):
    (key_a, id_a), (key_b, id_b) = serve_env.new_key(budget=100), serve_env.new_key(budget=100)
    for key_id in (id_a, id_b):
        linked = requests.post(
            f"{apps['flag']}/admin/keys/{key_id}/detection/owner", json={"owner": "acme-301"},
            headers={"X-API-Key": serve_env.admin_key}, timeout=60,
        )
        assert linked.status_code == 200 and linked.json()["scope"] == "owner:acme-301"
    images = tiny_images(6, seed=301)
    assert post(apps["block"], key_a, images).status_code == 200
    # The second key's copies match the first key's queries: the owner is flagged and blocked.
    assert post(apps["block"], key_b, images).status_code == 403
    assert post(apps["block"], key_a, tiny_images(2, seed=302)).status_code == 403
    rows = admin_listing(apps["block"], serve_env.admin_key)
    assert rows[id_a]["flagged"] and rows[id_b]["flagged"] and rows[id_b]["flag_key"] == id_b


def _replicas(app: str) -> list[str]:
    return [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#")
    ]


def test_state_survives_a_replica_kill_and_a_detector_restart(serve_env, apps):
    flagged_key, flagged_id = serve_env.new_key(budget=1000)
    quiet_key, quiet_id = serve_env.new_key(budget=1000)
    images = tiny_images(6, seed=401)
    assert post(apps["flag"], flagged_key, np.concatenate([images, images])).status_code == 200
    assert post(apps["flag"], quiet_key, images).status_code == 200  # one clean request: history only
    # Kill every replica of the blocking app and the detector actor (for good: it is
    # recreated from its sqlite file by the first replica that needs it).
    for name in _replicas(BLOCK_APP):
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    assert kill_detector(serve_env.ledger_config)
    deadline = time.monotonic() + 120
    while len(_replicas(BLOCK_APP)) < serve_env.scores_config.num_replicas or not _answers(apps["block"], quiet_key):
        assert time.monotonic() < deadline, "the blocking app did not come back in 120 s"
        time.sleep(0.5)
    # The flag survived: the flagged key is blocked on the other app's new replicas.
    assert post(apps["block"], flagged_key, tiny_images(1, seed=402)).status_code == 403
    # The history survived: repeats of what the quiet key asked before the kill match now.
    assert post(apps["block"], quiet_key, images[:4]).status_code == 200
    assert post(apps["block"], quiet_key, images[4:]).status_code == 403  # 6 matches >= 5
    rows = DetectorAdmin(serve_env.ledger_config).list_keys()
    by_id = {row.key_id: row for row in rows}
    assert by_id[quiet_id].flagged and by_id[quiet_id].matched == 6 and by_id[flagged_id].flagged


def _answers(url: str, api_key: str) -> bool:
    try:
        return requests.get(url + "/v1/info", headers={"X-API-Key": api_key}, timeout=10).status_code == 200
    except requests.RequestException:
        return False
