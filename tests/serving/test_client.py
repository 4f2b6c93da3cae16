"""ServedVictim against a fake transport: chunking, in-flight calls, retries, counts."""

from __future__ import annotations

import pickle
import threading
import time

import numpy as np
import pytest
import torch

from clusterattack.serving.client import ServedVictim, TransientError
from clusterattack.serving.errors import (
    BudgetExceeded,
    ModeMismatch,
    RateLimited,
    ServiceUnavailable,
    ServingError,
)
from clusterattack.victims.base import DecisionVictim, Victim


class FakeTransport:
    """An in-memory server: a budget, optional scripted failures, and a call log."""

    def __init__(self, mode="scores", budget=10_000, delay_s=0.0, failures=None, num_clusters=3, gate=None):
        self.mode = mode
        # With ``gate`` set, calls hold until that many are in flight at once (then all go):
        # a client that does not overlap its requests waits out the timeout instead.
        self.gate = gate
        self.opened = threading.Event()
        self.remaining = budget
        self.delay_s = delay_s
        self.failures = dict(failures or {})  # call number -> exception raised then
        self.num_clusters = num_clusters
        self.calls: list[tuple[str, int]] = []
        self.charged: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("lock", "opened")}

    def __setstate__(self, state):
        self.__dict__.update(state, lock=threading.Lock(), opened=threading.Event())

    def info(self, api_key):
        return {"name": "fake", "mode": self.mode, "num_clusters": self.num_clusters,
                "input_shape": [1, 4, 4], "max_images_per_request": 64}

    def budget(self, api_key):
        return {"remaining": self.remaining}

    def describe(self):
        return "fake"

    def predict(self, images, api_key, request_id):
        with self.lock:
            number = len(self.calls)
            self.calls.append((request_id, len(images)))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.gate is not None and self.in_flight >= self.gate:
                self.opened.set()
        try:
            if self.gate is not None:
                self.opened.wait(timeout=2.0)
            time.sleep(self.delay_s)
            if number in self.failures:
                raise self.failures[number]
            with self.lock:
                if request_id not in self.charged:
                    if len(images) > self.remaining:
                        raise BudgetExceeded("no", requested=len(images), remaining=self.remaining)
                    self.remaining -= len(images)
                    self.charged.add(request_id)
            scores = np.full((len(images), self.num_clusters), 1.0 / self.num_clusters, np.float32)
            return scores if self.mode == "scores" else np.zeros(len(images), np.int64)
        finally:
            with self.lock:
                self.in_flight -= 1


def images(n, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random((n, 1, 4, 4)).astype(np.float32))


def test_satisfies_the_victim_contracts_and_counts_chunks():
    fake = FakeTransport(gate=4)
    victim = ServedVictim(fake, "key", chunk_size=16, max_in_flight=4)
    assert isinstance(victim, Victim) and isinstance(victim, DecisionVictim)
    assert (victim.num_clusters, victim.input_shape, victim.mode) == (3, (1, 4, 4), "scores")
    scores = victim.predict_proba(images(100))
    assert scores.shape == (100, 3) and scores.dtype == torch.float32
    assert (victim.image_queries, victim.calls, victim.requests) == (100, 1, 7)
    assert sorted(n for _, n in fake.calls) == [4] + [16] * 6
    assert fake.max_in_flight == 4  # four overlapped, never more
    labels = victim.predict(images(5))
    assert labels.dtype == torch.int64 and labels.shape == (5,)
    assert victim.counts() == {"image_queries": 105, "calls": 2, "requests": 8, "retries": 0}
    assert len({rid for rid, _ in fake.calls}) == 8
    victim.close()


def test_chunk_size_is_capped_by_the_server_limit():
    victim = ServedVictim(FakeTransport(), "key", chunk_size=1000)
    assert victim.chunk_size == 64


def test_transient_failures_are_retried_with_the_same_request_id():
    fake = FakeTransport(failures={0: TransientError("replica died"), 1: TransientError("again")})
    victim = ServedVictim(fake, "key", chunk_size=8, max_in_flight=1, retry_backoff_s=0.001)
    victim.predict_proba(images(8))
    assert [rid for rid, _ in fake.calls] == [fake.calls[0][0]] * 3
    assert (victim.image_queries, victim.requests, victim.retries) == (8, 1, 2)
    assert fake.remaining == 10_000 - 8


def test_retries_give_up_with_service_unavailable():
    fake = FakeTransport(failures={i: TransientError("down") for i in range(10)})
    victim = ServedVictim(fake, "key", max_retries=2, retry_backoff_s=0.001)
    with pytest.raises(ServiceUnavailable, match="failed 3 times"):
        victim.predict_proba(images(2))
    assert (victim.image_queries, victim.calls, victim.requests) == (0, 0, 0)


def test_rate_limits_are_waited_out_or_raised():
    limited = RateLimited("slow down", requested=4, remaining=100, retry_after_s=0.05)
    fake = FakeTransport(failures={0: limited})
    victim = ServedVictim(fake, "key", max_in_flight=1)
    started = time.monotonic()
    victim.predict_proba(images(4))
    assert time.monotonic() - started >= 0.05 and victim.image_queries == 4
    impatient = ServedVictim(FakeTransport(failures={0: limited}), "key", wait_on_rate_limit=False)
    with pytest.raises(RateLimited):
        impatient.predict_proba(images(4))
    never = RateLimited("too big", requested=4, remaining=100, retry_after_s=None)
    with pytest.raises(RateLimited):
        ServedVictim(FakeTransport(failures={0: never}), "key").predict_proba(images(4))


@pytest.mark.parametrize("in_flight", [1, 4])
def test_budget_exceeded_is_raised_after_in_flight_chunks_finish_and_counts_match(in_flight):
    fake = FakeTransport(budget=40, delay_s=0.01)
    victim = ServedVictim(fake, "key", chunk_size=16, max_in_flight=in_flight)
    with pytest.raises(BudgetExceeded):
        victim.predict_proba(images(64))
    assert victim.image_queries == 40 - fake.remaining
    assert victim.requests == len(fake.charged) and victim.calls == 0
    if in_flight == 1:
        assert (victim.image_queries, len(fake.calls)) == (32, 3)  # stopped at the first refusal


def test_batches_are_calls_of_the_batch_size_kept_in_flight():
    fake = FakeTransport(gate=4)
    victim = ServedVictim(fake, "key", chunk_size=8, max_in_flight=4)
    x = images(100)
    scores = victim.predict_proba_batches(x, 32)
    assert scores.shape == (100, 3) and torch.equal(scores, victim.predict_proba(x))
    # 100 images as calls of 32: four calls (32, 32, 32, 4), four requests, overlapping.
    assert sorted(n for _, n in fake.calls[:4]) == [4, 32, 32, 32]
    assert (victim.image_queries, victim.calls, victim.requests) == (200, 5, 17)
    assert fake.max_in_flight == 4  # the four calls of 32 overlapped
    # The server's request limit (64) caps a batch, and each capped request is a call.
    victim.predict_proba_batches(images(130), 256)
    assert [n for _, n in fake.calls[17:]] == [64, 64, 2] and victim.calls == 8
    with pytest.raises(ValueError, match="batch_size"):
        victim.predict_proba_batches(x, 0)
    with pytest.raises(ModeMismatch):
        ServedVictim(FakeTransport(mode="labels"), "key").predict_proba_batches(x, 8)
    victim.close()


def test_query_memberships_sends_a_served_victim_all_its_batches_at_once():
    from clusterattack.attacks.gradients import query_memberships

    # The gate holds each call until both are in flight: overlap is required, not left to a
    # 10 ms sleep (which a busy machine could outlast, making max_in_flight 1 by chance).
    fake = FakeTransport(budget=40, gate=2)
    victim = ServedVictim(fake, "key", chunk_size=8, max_in_flight=4)
    out = query_memberships(victim, images(24), 16)
    assert out.shape == (24, 3) and sorted(n for _, n in fake.calls) == [8, 16]
    assert (victim.image_queries, victim.calls) == (24, 2) and fake.max_in_flight == 2
    # Budget exhaustion part-way: the answered calls are counted, the rest raise.
    with pytest.raises(BudgetExceeded):
        query_memberships(victim, images(32), 8)
    assert victim.image_queries == 40 - fake.remaining == 40
    assert victim.calls == 2 + 2 and victim.requests == len(fake.charged)


def test_labels_mode_refuses_scores():
    victim = ServedVictim(FakeTransport(mode="labels"), "key")
    with pytest.raises(ModeMismatch, match="labels"):
        victim.predict_proba(images(2))
    assert victim.predict(images(3)).tolist() == [0, 0, 0]
    assert victim.image_queries == 3


def test_bad_images_are_refused_before_any_query():
    fake = FakeTransport()
    victim = ServedVictim(fake, "key")
    refused = [
        (images(2) * 2, r"images must be finite and lie in \[0, 1\]"),
        (images(2)[:, :, :2], r"images must have shape N x 1 x 4 x 4, got \(2, 1, 2, 4\)"),
        (images(2).double().long(), r"images must be floating point in \[0, 1\], got dtype torch.int64"),
    ]
    for bad, fault in refused:
        with pytest.raises(ValueError, match=fault):
            victim.predict_proba(bad)
    assert fake.calls == [] and victim.image_queries == 0
    assert victim.predict_proba(images(0)).shape == (0, 3)


def test_malformed_server_answers_are_errors():
    class Liar(FakeTransport):
        def predict(self, images, api_key, request_id):
            return np.zeros((len(images), 2), np.float32)

    with pytest.raises(ServingError, match="expected an array of shape"):
        ServedVictim(Liar(), "key").predict_proba(images(2))


def test_pickled_copy_keeps_counts_and_gets_fresh_request_ids():
    victim = ServedVictim(FakeTransport(), "key")
    victim.predict_proba(images(3))
    copy = pickle.loads(pickle.dumps(victim))
    assert copy.image_queries == 3
    copy.predict_proba(images(2))
    assert copy.image_queries == 5 and victim.image_queries == 3
    assert copy._next_id().split("-")[0] != victim._next_id().split("-")[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="api_key"):
        ServedVictim(FakeTransport(), "")
    with pytest.raises(ValueError, match="chunk_size"):
        ServedVictim(FakeTransport(), "key", chunk_size=0)
    with pytest.raises(TypeError, match="Transport"):
        ServedVictim(42, "key")
