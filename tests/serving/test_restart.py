"""Budget state survives the ledger actor, the Serve controller and the replicas restarting."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import ray
import requests

from clusterattack.serving.deployment import deploy_victim
from clusterattack.serving.ledger_actor import kill_ledger
from tests.serving.conftest import SCORES_APP, tiny_images

pytestmark = pytest.mark.slow


def spend(serve_env, api_key: str, n: int) -> requests.Response:
    buf = io.BytesIO()
    np.save(buf, tiny_images(n, seed=n))
    return requests.post(
        serve_env.scores_url + "/v1/predict",
        data=buf.getvalue(),
        headers={"X-API-Key": api_key, "Content-Type": "application/x-npy"},
        timeout=60,
    )


def remaining(serve_env, api_key: str) -> int:
    answer = requests.get(serve_env.scores_url + "/v1/budget", headers={"X-API-Key": api_key}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["remaining"]


@pytest.mark.parametrize("no_restart", [False, True], ids=["restarted-by-ray", "killed-for-good"])
def test_budget_survives_the_ledger_actor_dying(serve_env, no_restart):
    api_key, key_id = serve_env.new_key(budget=50)
    assert spend(serve_env, api_key, 20).status_code == 200
    assert kill_ledger(serve_env.ledger_config, no_restart=no_restart)
    # Restarted by Ray, or recreated by the first replica that needs it: same file either way.
    assert remaining(serve_env, api_key) == 30
    assert spend(serve_env, api_key, 25).status_code == 200
    refused = spend(serve_env, api_key, 6)
    assert refused.status_code == 429 and refused.json()["remaining"] == 5
    assert serve_env.admin.key_status(key_id).used == 45


def test_budget_survives_a_serve_controller_restart(serve_env):
    api_key, key_id = serve_env.new_key(budget=30)
    assert spend(serve_env, api_key, 10).status_code == 200
    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    ray.kill(controller, no_restart=False)
    serve_env.wait_until_serving()
    assert remaining(serve_env, api_key) == 20
    assert spend(serve_env, api_key, 20).status_code == 200
    assert spend(serve_env, api_key, 1).status_code == 429
    assert serve_env.admin.key_status(key_id).used == 30


def test_budget_survives_redeploying_the_replicas(serve_env):
    api_key, key_id = serve_env.new_key(budget=30)
    assert spend(serve_env, api_key, 12).status_code == 200
    before = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    # A changed config makes Serve replace every replica of the app.
    changed = dataclasses.replace(serve_env.scores_config, batch_wait_timeout_s=0.003)
    deploy_victim(serve_env.source, name=SCORES_APP, config=changed, ledger=serve_env.ledger_config)
    serve_env.scores_config = changed
    serve_env.wait_until_serving()
    after = {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{SCORES_APP}#")
    }
    assert len(after) == 2 and not after & before
    assert remaining(serve_env, api_key) == 18
    assert spend(serve_env, api_key, 18).status_code == 200
    assert serve_env.admin.key_status(key_id).used == 30
