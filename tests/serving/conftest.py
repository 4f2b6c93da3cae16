"""Fixtures of the serving tests: one Serve instance for the whole package, two victim apps.

Starting Ray, Serve and three replicas costs tens of seconds on two shared cores, so
the apps are deployed once (package scope) and shut down after the last serving test.
Tests that spend budget create their own keys; tests that break things (kill replicas,
the ledger or the controller) wait until the apps serve again before they return.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import numpy as np
import pytest
import requests

from tests.conftest import free_port

SCORES_APP = "tiny-scores"
LABELS_APP = "tiny-labels"


@dataclass
class ServeEnv:
    port: int
    ledger_config: object
    admin: object
    admin_key: str
    scores_handle: object
    labels_handle: object
    scores_config: object
    labels_config: object
    source: object

    @property
    def scores_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{SCORES_APP}"

    @property
    def labels_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{LABELS_APP}"

    def new_key(self, budget: int, **kwargs) -> tuple[str, str]:
        """A fresh attacker key: (api_key, key_id)."""
        issued = self.admin.create_key(f"t-{uuid.uuid4().hex[:6]}", budget=budget, **kwargs)
        return issued.api_key, issued.key_id

    def wait_until_serving(self, timeout_s: float = 120.0) -> None:
        """Block until both apps run all their replicas and answer over HTTP (after a kill)."""
        from ray import serve

        api_key, _ = self.new_key(budget=0)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = serve.status()
                running = all(
                    status.applications[name].status == "RUNNING"
                    and status.applications[name].deployments["victim"].replica_states.get("RUNNING")
                    == config.num_replicas
                    for name, config in (
                        (SCORES_APP, self.scores_config),
                        (LABELS_APP, self.labels_config),
                    )
                )
                answers = [
                    requests.get(url + "/v1/info", headers={"X-API-Key": api_key}, timeout=10)
                    for url in (self.scores_url, self.labels_url)
                ]
                if running and all(r.status_code == 200 for r in answers):
                    return
            except (requests.RequestException, KeyError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"victim apps not serving after {timeout_s} s")
            time.sleep(0.5)


def tiny_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8)).astype(np.float32)


@pytest.fixture(scope="package")
def serve_env(ray_session, tmp_path_factory):
    import ray.cloudpickle
    from ray import serve

    import tests.serving.tiny_victims as tiny_victims
    from clusterattack.serving.deployment import ServeConfig, deploy_victim, start_serve
    from clusterattack.serving.ledger_actor import LedgerAdmin, LedgerConfig, kill_ledger

    # The replicas cannot import the tests folder: ship the test victim by value.
    ray.cloudpickle.register_pickle_by_value(tiny_victims)
    ledger_config = LedgerConfig(
        db_path=str(tmp_path_factory.mktemp("ledger") / "ledger.sqlite"),
        actor_name=f"test-ledger-{uuid.uuid4().hex[:8]}",
    )
    # Serve keeps one HTTP proxy per Ray session: another package's may still be up.
    port = start_serve("127.0.0.1", free_port())
    admin = LedgerAdmin(ledger_config)
    admin_key = admin.create_key("root", role="admin").api_key
    limits = {
        "num_cpus": 0.25,
        "max_batch_size": 32,
        "batch_wait_timeout_s": 0.002,
        "max_images_per_request": 64,
        "max_request_bytes": 64 * 1024,
        "max_ongoing_requests": 8,
        "torch_threads": 1,
    }
    scores_config = ServeConfig(mode="scores", num_replicas=2, **limits)
    labels_config = ServeConfig(mode="labels", num_replicas=1, **limits)
    source = tiny_victims.TinyVictim(seed=0, delay_s=0.005)
    scores = deploy_victim(source, name=SCORES_APP, config=scores_config, ledger=ledger_config)
    labels = deploy_victim(source, name=LABELS_APP, config=labels_config, ledger=ledger_config)
    yield ServeEnv(
        port=port,
        ledger_config=ledger_config,
        admin=admin,
        admin_key=admin_key,
        scores_handle=scores,
        labels_handle=labels,
        scores_config=scores_config,
        labels_config=labels_config,
        source=source,
    )
    serve.shutdown()
    kill_ledger(ledger_config)
