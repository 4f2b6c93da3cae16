"""BudgetLedger without Ray: exactness under threads, all or nothing, buckets, persistence."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from clusterattack.serving.errors import (
    BadRequest,
    BudgetExceeded,
    Forbidden,
    NotFound,
    RateLimited,
    RequestConflict,
    Unauthorized,
)
from clusterattack.serving.ledger import BudgetLedger
from clusterattack.serving.ledger_actor import LedgerConfig
from clusterattack.serving.ledger_records import hash_api_key


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger(tmp_path, clock) -> BudgetLedger:
    led = BudgetLedger(tmp_path / "ledger.sqlite", clock=clock, reservation_ttl_s=60.0)
    yield led
    led.close()


def _reserve(led: BudgetLedger, api_key: str, n: int, rid: str, digest: str = "d"):
    return led.reserve(hash_api_key(api_key), n, rid, digest + rid)


def test_reservations_are_exact_under_threads_and_two_ledgers_on_one_file(tmp_path):
    path = tmp_path / "shared.sqlite"
    first = BudgetLedger(path)
    second = BudgetLedger(path)  # a second process's view of the same file
    key = first.create_key("a", budget=1000)
    served, rejected = [], []
    lock = threading.Lock()

    def client(worker: int) -> None:
        led = first if worker % 2 else second
        for i in range(40):
            size = 1 + (worker + i) % 7
            try:
                _reserve(led, key.api_key, size, f"w{worker}-{i}")
            except BudgetExceeded:
                with lock:
                    rejected.append(size)
            else:
                with lock:
                    served.append(size)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(client, range(16)))
    assert sum(served) + sum(rejected) == sum(1 + (w + i) % 7 for w in range(16) for i in range(40))
    status = first.key_status(key.key_id)
    assert status.used == sum(served) <= 1000
    assert status.remaining == 1000 - sum(served)
    assert first.audit(key.key_id)["reserved"] == sum(served)
    # Rejections happen only when the remainder is smaller than the request.
    assert status.remaining < 7
    first.close()
    second.close()


def test_reserve_is_all_or_nothing(ledger):
    key = ledger.create_key("a", budget=10)
    _reserve(ledger, key.api_key, 7, "r1")
    with pytest.raises(BudgetExceeded) as info:
        _reserve(ledger, key.api_key, 4, "r2")
    assert info.value.remaining == 3 and info.value.requested == 4
    assert info.value.status_code == 429
    assert "3 of 10 remain" in str(info.value)
    assert ledger.key_status(key.key_id).used == 7  # nothing of the refused request charged
    _reserve(ledger, key.api_key, 3, "r3")
    assert ledger.key_status(key.key_id).remaining == 0


def test_retry_with_same_id_is_not_charged_twice_and_other_images_conflict(ledger):
    key = ledger.create_key("a", budget=10)
    first = ledger.reserve(hash_api_key(key.api_key), 4, "same", "digest-1")
    again = ledger.reserve(hash_api_key(key.api_key), 4, "same", "digest-1")
    assert not first.replayed and again.replayed
    assert ledger.key_status(key.key_id).used == 4
    with pytest.raises(RequestConflict, match="already used"):
        ledger.reserve(hash_api_key(key.api_key), 4, "same", "digest-2")
    ledger.commit(hash_api_key(key.api_key), "same")
    replay = ledger.reserve(hash_api_key(key.api_key), 4, "same", "digest-1")
    assert replay.replayed and ledger.audit(key.key_id) == {
        "reserved": 0, "committed": 4, "refunded": 0, "used": 4,
    }


def test_refund_returns_images_once_and_a_refunded_id_is_charged_again(ledger):
    key = ledger.create_key("a", budget=10)
    key_hash = hash_api_key(key.api_key)
    ledger.reserve(key_hash, 6, "r", "d")
    assert ledger.refund(key_hash, "r") is True
    assert ledger.refund(key_hash, "r") is False
    assert ledger.key_status(key.key_id).used == 0
    assert not ledger.reserve(key_hash, 6, "r", "d").replayed
    ledger.commit(key_hash, "r")
    assert ledger.refund(key_hash, "r") is False  # a served request is never refunded
    assert ledger.key_status(key.key_id).used == 6


def test_stale_reservation_is_reaped_and_a_late_commit_charges_again(ledger, clock):
    key = ledger.create_key("a", budget=10)
    key_hash = hash_api_key(key.api_key)
    ledger.reserve(key_hash, 4, "lost", "d")
    ledger.reserve(key_hash, 3, "slow", "d")
    clock.now += 61
    assert ledger.reap() == 2
    assert ledger.key_status(key.key_id).used == 0
    ledger.commit(key_hash, "slow")  # finished after all: counted exactly once
    assert ledger.audit(key.key_id) == {"reserved": 0, "committed": 3, "refunded": 4, "used": 3}
    ledger.reset(key.key_id, budget=2)
    ledger.reserve(key_hash, 2, "late", "d2")
    clock.now += 61
    ledger.reap()
    ledger.reserve(key_hash, 2, "other", "d3")
    with pytest.raises(BudgetExceeded, match="outlived its reservation"):
        ledger.commit(key_hash, "late")  # its answer must not leave uncounted
    assert ledger.key_status(key.key_id).used == 2


def test_token_bucket_limits_and_refills(ledger, clock):
    key = ledger.create_key("a", budget=1000, rate_per_s=10.0, burst=20.0)
    _reserve(ledger, key.api_key, 15, "a")
    with pytest.raises(RateLimited) as info:
        _reserve(ledger, key.api_key, 10, "b")
    assert info.value.retry_after_s == pytest.approx(0.5)
    assert info.value.remaining == 985
    assert info.value.headers() == {"Retry-After": "1"}
    assert ledger.key_status(key.key_id).used == 15
    clock.now += 0.5
    _reserve(ledger, key.api_key, 10, "b")
    clock.now += 100  # refill is capped at the burst
    assert ledger.key_status(key.key_id).tokens == pytest.approx(20.0)
    with pytest.raises(RateLimited, match="exceed the burst") as too_big:
        _reserve(ledger, key.api_key, 21, "c")
    assert too_big.value.retry_after_s is None


def test_budget_is_checked_before_rate(ledger):
    key = ledger.create_key("a", budget=5, rate_per_s=1.0, burst=1.0)
    with pytest.raises(BudgetExceeded):
        _reserve(ledger, key.api_key, 6, "a")


def test_state_persists_across_reopen_with_keys_stored_hashed(tmp_path, clock):
    path = tmp_path / "ledger.sqlite"
    led = BudgetLedger(path, clock=clock)
    key = led.create_key("attacker-1", budget=100, rate_per_s=50.0, burst=60.0)
    _reserve(led, key.api_key, 40, "a")
    led.commit(hash_api_key(key.api_key), "a")
    _reserve(led, key.api_key, 5, "b")
    led.close()

    reopened = BudgetLedger(path, clock=clock)
    status = reopened.status(hash_api_key(key.api_key))
    assert (status.used, status.remaining, status.name) == (45, 55, "attacker-1")
    assert status.tokens == pytest.approx(15.0)
    assert _reserve(reopened, key.api_key, 5, "b").replayed
    reopened.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.sqlite*"))
    assert key.api_key.encode() not in raw
    rows = sqlite3.connect(path).execute("SELECT key_hash FROM api_keys").fetchall()
    assert rows == [(hash_api_key(key.api_key),)]


def test_unknown_revoked_and_admin_keys(ledger):
    key = ledger.create_key("a", budget=10)
    admin = ledger.create_key("root", role="admin")
    with pytest.raises(Unauthorized):
        _reserve(ledger, "ca_not-a-key", 1, "x")
    with pytest.raises(Forbidden):
        _reserve(ledger, admin.api_key, 1, "x")
    with pytest.raises(Forbidden):
        ledger.authenticate(hash_api_key(key.api_key), "admin")
    assert ledger.authenticate(hash_api_key(admin.api_key), "admin").role == "admin"
    ledger.revoke(key.key_id)
    with pytest.raises(Unauthorized):
        _reserve(ledger, key.api_key, 1, "y")
    with pytest.raises(Unauthorized):
        ledger.status(hash_api_key(key.api_key))


def test_admin_grant_reset_set_rate_and_bad_values(ledger):
    key = ledger.create_key("a", budget=3)
    _reserve(ledger, key.api_key, 3, "a")
    assert ledger.grant(key.key_id, 7).remaining == 7
    assert ledger.reset(key.key_id).remaining == 10
    assert ledger.reset(key.key_id, budget=4).budget_total == 4
    limited = ledger.set_rate(key.key_id, 2.0, burst=3.0)
    assert (limited.rate_per_s, limited.burst, limited.tokens) == (2.0, 3.0, 3.0)
    assert ledger.set_rate(key.key_id, None).rate_per_s is None
    with pytest.raises(NotFound, match="key_nope"):
        ledger.grant("key_nope", 1)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(BadRequest):
            ledger.grant(key.key_id, bad)
    with pytest.raises(BadRequest, match="rate_per_s"):
        ledger.create_key("b", budget=1, rate_per_s=0.0)
    with pytest.raises(BadRequest, match="role"):
        ledger.create_key("b", role="root")
    with pytest.raises(BadRequest, match="positive number of images"):
        _reserve(ledger, key.api_key, 0, "zero")
    imported = ledger.create_key("env-admin", role="admin", api_key="x" * 32)
    assert imported.api_key == "x" * 32
    with pytest.raises(RequestConflict):
        ledger.create_key("again", role="admin", api_key="x" * 32)
    assert [s.name for s in ledger.list_keys()] == ["a", "env-admin"]


def test_default_burst_fits_a_paper_batch(ledger):
    key = ledger.create_key("a", budget=1000, rate_per_s=10.0)
    assert ledger.key_status(key.key_id).burst == 256.0
    _reserve(ledger, key.api_key, 256, "batch")


def test_on_change_reports_every_charge(tmp_path):
    seen = []
    led = BudgetLedger(tmp_path / "l.sqlite", on_change=seen.append)
    key = led.create_key("a", budget=5)
    _reserve(led, key.api_key, 2, "a")
    led.refund(hash_api_key(key.api_key), "a")
    assert [s.remaining for s in seen] == [5, 3, 5]
    led.close()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"db_path": ""}, "db_path"),
        ({"reservation_ttl_s": 0}, "reservation_ttl_s"),
        ({"synchronous": "OFF"}, "synchronous"),
    ],
)
def test_ledger_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LedgerConfig(**kwargs)


def test_reserve_many_decides_in_order_and_returns_refusals_as_values(ledger):
    key = ledger.create_key("a", budget=10)
    h = hash_api_key(key.api_key)
    answers = ledger.reserve_many(
        [(h, 4, "r1", "d1"), (h, 7, "r2", "d2"), (h, 6, "r3", "d3"), (h, 4, "r1", "other"), ("nokey", 1, "r4", "d4")]
    )
    assert answers[0].images == 4 and answers[0].remaining == 6
    assert isinstance(answers[1], BudgetExceeded) and answers[1].remaining == 6  # 7 > 6: nothing charged
    assert answers[2].images == 6 and answers[2].remaining == 0  # fits after the refusal
    assert isinstance(answers[3], RequestConflict)  # r1 again with other images
    assert isinstance(answers[4], Unauthorized)
    commits = ledger.commit_many([(h, "r1"), (h, "r3"), (h, "never")])
    assert [c.request_id for c in commits[:2]] == ["r1", "r3"]
    assert "no reservation" in str(commits[2])
    assert ledger.audit(key.key_id) == {"reserved": 0, "committed": 10, "refunded": 0, "used": 10}
