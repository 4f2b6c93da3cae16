"""Serving metrics reach Ray's Prometheus endpoint: served, rejected by reason, budgets, latency."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import ray
import requests

from tests.serving.conftest import SCORES_APP, tiny_images

pytestmark = pytest.mark.slow


def _post(serve_env, api_key, n):
    buf = io.BytesIO()
    np.save(buf, tiny_images(n))
    return requests.post(
        serve_env.scores_url + "/v1/predict",
        data=buf.getvalue(),
        headers={"X-API-Key": api_key, "Content-Type": "application/x-npy"},
        timeout=60,
    )


def _sample(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = None
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


def test_queries_rejections_budget_and_latency_are_exported(serve_env):
    api_key, key_id = serve_env.new_key(budget=6)
    assert _post(serve_env, api_key, 6).status_code == 200
    assert _post(serve_env, api_key, 2).status_code == 429
    assert _post(serve_env, "ca_wrong", 1).status_code == 401
    port = ray._private.worker.global_worker.node.metrics_export_port
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 90
    while True:
        text = requests.get(url, timeout=10).text
        found = {
            "served": _sample(text, "ray_clusterattack_serve_images_served_total", app=SCORES_APP),
            "budget": _sample(text, "ray_clusterattack_serve_requests_rejected_total", reason="budget"),
            "auth": _sample(text, "ray_clusterattack_serve_requests_rejected_total", reason="unauthorized"),
            "remaining": _sample(text, "ray_clusterattack_budget_remaining", key_id=key_id),
            "used": _sample(text, "ray_clusterattack_budget_used", key_id=key_id),
            "latency": _sample(text, "ray_clusterattack_serve_request_latency_s_count", endpoint="http"),
        }
        if found["used"] == 6.0 and None not in found.values():
            break
        assert time.monotonic() < deadline, f"metrics missing after 90 s: {found}"
        time.sleep(1.0)
    assert found["served"] >= 6 and found["budget"] >= 1 and found["auth"] >= 1
    assert found["remaining"] == 0.0 and found["latency"] >= 3
    assert api_key not in text and serve_env.admin_key not in text  # key ids only, never keys
