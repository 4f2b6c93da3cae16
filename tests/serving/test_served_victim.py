"""ServedVictim against the real deployment, over a handle, HTTP and an app name."""

from __future__ import annotations

import pickle
import time

import pytest
import torch

from clusterattack.serving.client import ServedVictim
from clusterattack.serving.errors import BudgetExceeded, ModeMismatch, Unauthorized
from clusterattack.victims.base import Victim
from tests.serving.conftest import SCORES_APP, tiny_images

pytestmark = pytest.mark.slow


def _local(serve_env, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return serve_env.source.predict_proba(x)


@pytest.mark.parametrize("via", ["handle", "http", "app-name"])
def test_scores_match_the_local_model_and_every_image_is_counted(serve_env, via):
    api_key, key_id = serve_env.new_key(budget=1000)
    target = {"handle": serve_env.scores_handle, "http": serve_env.scores_url, "app-name": SCORES_APP}[via]
    x = torch.from_numpy(tiny_images(150, seed=3))
    with ServedVictim(target, api_key, chunk_size=32, max_in_flight=4) as victim:
        assert isinstance(victim, Victim)
        assert (victim.num_clusters, victim.input_shape, victim.mode) == (3, (1, 8, 8), "scores")
        scores = victim.predict_proba(x)
        torch.testing.assert_close(scores, _local(serve_env, x), rtol=1e-5, atol=1e-6)
        assert (victim.image_queries, victim.calls, victim.requests) == (150, 1, 5)
        assert victim.budget()["remaining"] == 850
    assert serve_env.admin.key_status(key_id).used == 150


@pytest.mark.parametrize("via", ["handle", "http"])
def test_budget_runs_out_with_a_typed_error_and_counts_match_the_ledger(serve_env, via):
    api_key, key_id = serve_env.new_key(budget=40)
    target = serve_env.scores_handle if via == "handle" else serve_env.scores_url
    victim = ServedVictim(target, api_key, chunk_size=16, max_in_flight=4)
    with pytest.raises(BudgetExceeded) as info:
        victim.predict_proba(torch.from_numpy(tiny_images(64)))
    assert type(info.value) is BudgetExceeded and info.value.remaining < 16
    assert victim.image_queries == serve_env.admin.key_status(key_id).used
    assert victim.image_queries + info.value.remaining <= 40
    victim.close()


def test_labels_victim_answers_ids_only(serve_env):
    api_key, _ = serve_env.new_key(budget=100)
    victim = ServedVictim(serve_env.labels_url, api_key, chunk_size=16)
    x = torch.from_numpy(tiny_images(20, seed=4))
    assert victim.predict(x).tolist() == _local(serve_env, x).argmax(1).tolist()
    with pytest.raises(ModeMismatch):
        victim.predict_proba(x)
    assert (victim.image_queries, victim.calls, victim.requests) == (20, 1, 2)


def test_rate_limited_key_is_waited_out(serve_env):
    api_key, key_id = serve_env.new_key(budget=100, rate_per_s=100.0, burst=16.0)
    victim = ServedVictim(serve_env.scores_url, api_key, chunk_size=16, max_in_flight=2)
    started = time.monotonic()
    victim.predict_proba(torch.from_numpy(tiny_images(64)))
    assert time.monotonic() - started >= 0.45  # 48 images beyond the burst at 100/s
    assert victim.image_queries == 64 == serve_env.admin.key_status(key_id).used


def test_unknown_key_fails_at_construction_and_a_pickled_client_still_queries(serve_env):
    with pytest.raises(Unauthorized):
        ServedVictim(serve_env.scores_url, "ca_not-a-key")
    api_key, key_id = serve_env.new_key(budget=10)
    copy = pickle.loads(pickle.dumps(ServedVictim(serve_env.scores_handle, api_key)))
    copy.predict_proba(torch.from_numpy(tiny_images(3)))
    assert copy.image_queries == 3 == serve_env.admin.key_status(key_id).used
