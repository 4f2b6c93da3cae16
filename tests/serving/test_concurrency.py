"""32 concurrent clients against 2 replicas with a budget of N: exactly N served, even
when a replica is killed in the middle of a request."""

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
from tests.serving.tiny_victims import TRAP_GATE, TRAP_NAMESPACE, TrapGate, trap_image

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


def _post_until_answered(
    session: requests.Session, url: str, api_key: str, request_id: str, body: bytes, stats: RunStats
) -> tuple[requests.Response | None, int]:
    """POST until a 200 or a 429; a request that failed in transit is retried with the same
    idempotency key and the same images. Returns the answer (None after an unexpected 4xx)
    and how many times this request failed in transit."""
    failures = 0
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
            return answer, failures
        failures += 1
        with stats.lock:
            stats.transient_failures += 1
            if answer is not None and answer.status_code < 500:
                stats.unexpected.append(f"{answer.status_code}: {answer.text[:200]}")
                return None, failures
        time.sleep(0.05)


def _served(stats: RunStats, request_id: str, size: int) -> None:
    with stats.lock:
        stats.served_images += size
        stats.served_requests += 1
        stats.request_ids.append(request_id)


def _client(url: str, api_key: str, index: int, stats: RunStats) -> None:
    """Sends requests of 1-4 images until a 429 says nothing remains."""
    rng = np.random.default_rng(1000 + index)
    session = requests.Session()
    size = int(rng.integers(1, 5))
    for number in range(10_000):
        request_id = f"client{index}-{number}"
        body = _npy(tiny_images(size, seed=index * 10_000 + number))
        answer, _ = _post_until_answered(session, url, api_key, request_id, body, stats)
        if answer is None:
            return
        if answer.status_code == 200:
            assert len(answer.json()["scores"]) == size
            _served(stats, request_id, size)
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


def test_exact_budget_with_a_replica_killed_mid_request(serve_env):
    """A request is held inside a replica (the trap gate), that replica is killed under it:
    the request must fail in transit, be retried with its id and be charged once."""
    api_key, key_id = serve_env.new_key(budget=BUDGET)
    replicas = _replica_actors(SCORES_APP)
    assert len(replicas) == 2
    gate = ray.remote(TrapGate).options(name=TRAP_GATE, namespace=TRAP_NAMESPACE, num_cpus=0).remote()
    trap: dict = {}

    def send_trap(stats: RunStats) -> None:
        answer, failures = _post_until_answered(
            requests.Session(), serve_env.scores_url, api_key, "trap-request", _npy(trap_image()), stats
        )
        trap.update(status=None if answer is None else answer.status_code, failures=failures)
        if answer is not None and answer.status_code == 200:
            _served(stats, "trap-request", 1)

    def kill_the_replica_holding_the_trap(stats: RunStats) -> None:
        # Sent as the clients start, so its 1 image surely finds budget left; the kill then
        # waits for nothing but the trap request being inside a replica.
        sender = threading.Thread(target=send_trap, args=(stats,), daemon=True)
        sender.start()
        holder = ray.get(gate.held.remote(), timeout=120)  # the trap request is inside `holder` now
        trap["killed_at"] = stats.served_images
        trap["replica"] = holder
        ray.kill(ray.get_actor(holder, namespace="serve"), no_restart=True)
        sender.join(timeout=120)
        assert not sender.is_alive(), "the trapped request never came back"

    try:
        stats = _run(serve_env, api_key, during=kill_the_replica_holding_the_trap)
        entries = ray.get(gate.entries.remote())
    finally:
        ray.get(gate.release.remote())
        ray.kill(gate)
    assert trap["replica"] in replicas
    assert trap["killed_at"] < BUDGET  # mid-run: the clients went on to spend the rest
    # The kill caught the trapped request: it failed in transit, was retried with its id,
    # ran again on another replica (the gate saw it twice) and was served.
    assert trap["status"] == 200 and trap["failures"] >= 1
    assert entries == 2
    assert stats.transient_failures >= trap["failures"]
    assert stats.request_ids.count("trap-request") == 1
    # Charged once: its reservation from the killed replica was replayed, not charged again.
    _check_exact(serve_env, key_id, stats)
    # Serve replaces the killed replica once its controller notices the death (a health
    # check later): wait for that condition, then for both apps to answer.
    deadline = time.monotonic() + 120
    while len(replaced := _replica_actors(SCORES_APP)) != 2 or trap["replica"] in replaced:
        assert time.monotonic() < deadline, f"killed replica not replaced: {replaced}"
        time.sleep(0.5)
    serve_env.wait_until_serving()
