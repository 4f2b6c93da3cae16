"""32 concurrent clients against 2 replicas with a budget of N: exactly N served, even
when a replica is killed in the middle of the run."""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import ray
import requests

from tests.serving.conftest import SCORES_APP, tiny_images

pytestmark = pytest.mark.slow

CLIENTS = 32
BUDGET = 400


@dataclass
class RunStats:
    served_images: int = 0
    served_requests: int = 0
    rejected: int = 0
    transient_failures: int = 0
    request_ids: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _client(url: str, api_key: str, index: int, stats: RunStats) -> None:
    """Sends requests of 1-4 images until a 429 says nothing remains; retries a request
    that failed in transit with the same idempotency key and the same images."""
    rng = np.random.default_rng(1000 + index)
    session = requests.Session()
    size = int(rng.integers(1, 5))
    for number in range(10_000):
        request_id = f"client{index}-{number}"
        body = _npy(tiny_images(size, seed=index * 10_000 + number))
        while True:
            try:
                answer = session.post(
                    url + "/v1/predict",
                    data=body,
                    headers={
                        "X-API-Key": api_key,
                        "Content-Type": "application/x-npy",
                        "Idempotency-Key": request_id,
                    },
                    timeout=10,
                )
            except requests.RequestException:
                # A request caught by the kill can hang in Serve's proxy: time it out, retry.
                answer = None
            if answer is not None and answer.status_code in (200, 429):
                break
            with stats.lock:
                stats.transient_failures += 1
                if answer is not None and answer.status_code < 500:
                    stats.unexpected.append(f"{answer.status_code}: {answer.text[:200]}")
                    return
            time.sleep(0.05)
        if answer.status_code == 200:
            assert len(answer.json()["scores"]) == size
            with stats.lock:
                stats.served_images += size
                stats.served_requests += 1
                stats.request_ids.append(request_id)
            size = int(rng.integers(1, 5))
            continue
        remaining = answer.json()["remaining"]
        with stats.lock:
            stats.rejected += 1
        if remaining == 0:
            return
        # Something remains but less than asked: ask for what remains (others race for it).
        size = min(size, remaining)


def _run(serve_env, api_key: str, during=None) -> RunStats:
    stats = RunStats()
    threads = [
        threading.Thread(target=_client, args=(serve_env.scores_url, api_key, i, stats), daemon=True)
        for i in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    if during is not None:
        during(stats)
    for thread in threads:
        thread.join(timeout=240)
        assert not thread.is_alive(), "a client hung"
    return stats


def _check_exact(serve_env, key_id: str, stats: RunStats) -> None:
    assert stats.unexpected == []
    assert stats.served_images == BUDGET
    assert stats.rejected >= CLIENTS  # every client stopped on a 429
    assert len(set(stats.request_ids)) == stats.served_requests
    status = serve_env.admin.key_status(key_id)
    assert (status.used, status.remaining) == (BUDGET, 0)
    # Nothing lost, nothing counted twice: every charged image belongs to a served request.
    assert serve_env.admin.audit(key_id) == {
        "reserved": 0, "committed": BUDGET, "refunded": 0, "used": BUDGET,
    }


def test_32_clients_2_replicas_exactly_the_budget_is_served(serve_env):
    api_key, key_id = serve_env.new_key(budget=BUDGET)
    stats = _run(serve_env, api_key)
    _check_exact(serve_env, key_id, stats)
    assert stats.transient_failures == 0


def _replica_actors(app: str) -> list[str]:
    return sorted(
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#")
    )


def test_exact_budget_with_a_replica_killed_mid_run(serve_env):
    api_key, key_id = serve_env.new_key(budget=BUDGET)
    replicas = _replica_actors(SCORES_APP)
    assert len(replicas) == 2
    killed = {}

    def kill_one_replica_when_a_quarter_is_served(stats: RunStats) -> None:
        deadline = time.monotonic() + 120
        while stats.served_images < BUDGET // 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        killed["at"] = stats.served_images
        ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)

    stats = _run(serve_env, api_key, during=kill_one_replica_when_a_quarter_is_served)
    assert BUDGET // 4 <= killed["at"] < BUDGET
    # Requests caught on the killed replica either failed and were retried by their
    # clients with the same ids, or were re-routed by Serve before they started: how many
    # of each is timing (a kill between two requests catches none). Either way the budget
    # is spent exactly; the retry path itself is pinned by test_http_api's idempotency test.
    _check_exact(serve_env, key_id, stats)
    serve_env.wait_until_serving()
    replaced = _replica_actors(SCORES_APP)
    assert len(replaced) == 2 and replicas[0] not in replaced
