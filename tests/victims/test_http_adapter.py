"""Someone else's HTTP clustering service through an adapter: its own schema, auth and rate limit.

The service (examples/foreign_service.py) runs in a thread on a free loopback port and
keeps its own request log; the platform's counts must agree with it, and its 429s with
Retry-After must be waited out, not fatal.
"""

from __future__ import annotations

import importlib.util
import io
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from clusterattack.attacks import AttackConfig, run_attack
from clusterattack.serving.errors import BudgetExceeded, RateLimited
from clusterattack.victims.sources import OneHotMemberships, VictimSpecError, resolve_victim
from clusterattack.victims.sources.adapter import AdapterPathError, get_path, load_adapter
from clusterattack.victims.sources.remote import ServiceError, parse_retry_after
from clusterattack.victims.sources.target import open_attack_target

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret"


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits_model():
    return _load_example("sklearn_digits").build(components=8)


@pytest.fixture
def service(digits_model):
    server, state = _load_example("foreign_service").start_service(
        0, token=TOKEN, rate=2.0, burst=3.0, model=digits_model
    )
    yield f"http://127.0.0.1:{server.server_address[1]}/v2/assign", state
    server.shutdown()
    server.server_close()


def write_adapter(tmp_path: Path, url: str, **changes) -> Path:
    """The example adapter with the test's URL and ``changes`` merged section by section."""
    data = yaml.safe_load((ROOT / "examples" / "foreign_service.yaml").read_text())
    data["url"] = url
    data["batch_size"] = 40
    data["politeness"] = {**data["politeness"], "rate_per_s": None, "backoff_s": 0.05}
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    path = tmp_path / "adapter.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("FOREIGN_TOKEN", TOKEN)


def digits(n_train: int, n_test: int):
    from clusterattack.data import load_dataset

    data = load_dataset("digits")
    train_x, _ = data.subset("train", limit=n_train, seed=0).as_float()
    test_x, test_y = data.subset("test", limit=n_test, seed=0).as_float()
    return train_x, test_x, test_y


def test_attack_through_the_adapter_agrees_with_the_services_own_log(service, token, tmp_path):
    url, state = service
    adapter = write_adapter(tmp_path, url)
    target = open_attack_target(f"adapter:{adapter}", gradient_source="surrogate", dataset=(1, 8, 8))
    assert state.log == []  # resolving sent nothing (a TCP connect only)
    train_x, test_x, test_y = digits(160, 80)
    config = AttackConfig(
        eps=0.15, epochs=1, batch_size=32, query_batch=80, gradient_source="surrogate", seed=0,
    ).override(**{
        "surrogate.distill_queries": 160, "surrogate.distill_epochs": 2, "surrogate.refresh_rounds": 0,
        "surrogate.online": False, "surrogate.width": 8,
    })
    report = run_attack(
        target.victim, train_x, test_x, test_y, config, victim_name=target.name, dataset="digits",
        eval_victim=target.scorer, progress=False,
    )
    attacker, scorer = target.victim.counts(), target.scorer.counts()
    assert report.evaluation is not None and report.result.image_queries == attacker["image_queries"]
    assert report.record()["nmi_pre"] > 0.5
    # The service's own log: every answered image was counted once, by the attacker or the scorer.
    assert state.answered_images() == attacker["image_queries"] + scorer["image_queries"]
    assert state.count(200) == attacker["requests"] + scorer["requests"]
    assert scorer["image_queries"] == 2 * len(test_x)
    # It rate-limited us, and every 429 was waited out (Retry-After: 1) instead of failing.
    assert state.count(429) >= 1
    assert state.count(429) == attacker["rate_limited"] + scorer["rate_limited"]
    assert set(e["status"] for e in state.log) == {200, 429}
    assert target.victim.waited_s >= 1.0 * attacker["rate_limited"]


def test_an_adapter_path_missing_from_the_answer_is_named(service, token, tmp_path):
    url, _ = service
    adapter = write_adapter(tmp_path, url, response={"path": "result.scores"})
    victim = resolve_victim(f"adapter:{adapter}")
    with pytest.raises(AdapterPathError, match="'result.scores' not found in the answer: no key 'scores' in result"):
        victim.predict_proba(torch.rand(3, 1, 8, 8))


def test_labels_from_a_path_make_a_decision_only_victim(service, token, tmp_path):
    url, state = service
    adapter = write_adapter(tmp_path, url, response={"path": "result.assignments[*].cluster", "kind": "labels"})
    target = open_attack_target(f"adapter:{adapter}", gradient_source="surrogate")
    assert isinstance(target.victim, OneHotMemberships)
    onehot = target.victim.predict_proba(torch.rand(5, 1, 8, 8))
    assert onehot.shape == (5, 10) and target.victim.image_queries == 5 == state.answered_images()
    with pytest.raises(VictimSpecError, match="decision-only .*'estimate'"):
        open_attack_target(f"adapter:{adapter}", gradient_source="estimate")


def test_unreachable_service_fails_at_resolve(tmp_path, token):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    adapter = write_adapter(tmp_path, f"http://127.0.0.1:{port}/v2/assign")
    with pytest.raises(ServiceError, match=f"cannot reach http://127.0.0.1:{port}/v2/assign"):
        resolve_victim(f"adapter:{adapter}")


def test_auth_faults_are_named(service, tmp_path, monkeypatch):
    url, _ = service
    adapter = write_adapter(tmp_path, url)
    monkeypatch.delenv("FOREIGN_TOKEN", raising=False)
    with pytest.raises(VictimSpecError, match="has no secret: set the environment variable 'FOREIGN_TOKEN'"):
        resolve_victim(f"adapter:{adapter}")
    victim = resolve_victim(f"adapter:{adapter}", api_key="wrong")
    with pytest.raises(ServiceError, match="refused the request: HTTP 401"):
        victim.predict_proba(torch.rand(2, 1, 8, 8))


def test_the_cap_on_image_queries_stops_before_the_request_that_would_pass_it(service, token, tmp_path):
    url, state = service
    adapter = write_adapter(tmp_path, url, politeness={"max_image_queries": 100})
    victim = resolve_victim(f"adapter:{adapter}")
    with pytest.raises(BudgetExceeded, match="cap of 100 image-queries"):
        victim.predict_proba(torch.rand(120, 1, 8, 8))
    assert victim.image_queries == 80 == state.answered_images()
    capped = resolve_victim(f"adapter:{adapter}", max_image_queries=30)
    assert capped.max_image_queries == 30


def test_a_retry_after_longer_than_politeness_allows_raises(service, token, tmp_path):
    url, state = service
    adapter = write_adapter(tmp_path, url, politeness={"max_retry_after_s": 0.5})
    victim = resolve_victim(f"adapter:{adapter}")
    with pytest.raises(RateLimited, match="asks to wait 1.0 s"):
        victim.predict_proba(torch.rand(200, 1, 8, 8))  # 5 requests against a burst of 3
    assert victim.rate_limited == 1 and state.count(429) == 1


class FlakyNpyService:
    """.npy in, .npy labels out; the first ``failures`` requests answer 500, then one 503 + Retry-After."""

    def __init__(self, failures: int) -> None:
        self.failures, self.log = failures, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_PUT(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                n = len(outer.log)
                if n < outer.failures or n == outer.failures:
                    status = 500 if n < outer.failures else 503
                    outer.log.append((status, 0))
                    self.send_response(status)
                    if status == 503:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                x = np.load(io.BytesIO(body), allow_pickle=False)
                assert x.dtype == np.float32 and x.shape[1:] == (8, 8, 1)  # NHWC floats
                out = io.BytesIO()
                np.save(out, (x.reshape(len(x), -1).mean(1) > 0.5).astype(np.int64))
                outer.log.append((200, len(x)))
                self.send_response(200)
                self.send_header("Content-Length", str(len(out.getvalue())))
                self.end_headers()
                self.wfile.write(out.getvalue())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/labels"


def test_npy_bodies_and_transient_failures_are_retried_with_back_off(tmp_path):
    service = FlakyNpyService(failures=2)
    try:
        path = tmp_path / "npy.json"
        path.write_text(json.dumps({
            "url": service.url, "method": "PUT", "num_clusters": 2, "input_shape": [1, 8, 8],
            "request": {"format": "npy", "layout": "nhwc", "dtype": "float32"},
            "response": {"format": "npy", "kind": "labels"},
            "politeness": {"max_retries": 3, "backoff_s": 0.01},
        }))
        victim = resolve_victim(f"adapter:{path}")
        started = time.monotonic()
        labels = victim.predict(torch.rand(6, 1, 8, 8))
        assert labels.shape == (6,) and time.monotonic() - started < 5
        assert victim.retries == 2 and victim.rate_limited == 1 and victim.image_queries == 6
        assert [s for s, _ in service.log] == [500, 500, 503, 200]
    finally:
        service.server.shutdown()
        service.server.server_close()


@pytest.mark.parametrize(
    ("data", "fault"),
    [
        ({"num_clusters": 3}, "lacks \\['url'\\]"),
        ({"url": "ftp://x/y", "num_clusters": 3}, "url must be http"),
        ({"url": "http://x/y", "num_clusters": 3, "colour": 1}, "unknown keys \\['colour'\\]"),
        ({"url": "http://x/y", "num_clusters": 3, "request": {"layout": "hwc"}}, "request.layout must be one of"),
        ({"url": "http://x/y", "num_clusters": 3, "response": {"kind": "scores"}}, "response.kind must be one of"),
        ({"url": "http://x/y", "num_clusters": 1}, "num_clusters must be an integer >= 2"),
        ({"url": "http://x/y", "num_clusters": 3, "politeness": {"burst": 0}}, "politeness.burst"),
    ],
)
def test_bad_adapter_files_name_the_fault(tmp_path, data, fault):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(VictimSpecError, match=fault):
        load_adapter(path)
    with pytest.raises(VictimSpecError, match="no adapter file"):
        load_adapter(tmp_path / "missing.yaml")


def test_paths_and_retry_after():
    doc = {"result": {"assignments": [{"p": [0.5, 0.5]}, {"p": [1.0, 0.0]}]}}
    assert get_path(doc, "result.assignments[*].p") == [[0.5, 0.5], [1.0, 0.0]]
    assert get_path(doc, "result.assignments[1].p[0]") == 1.0
    assert get_path([1, 2], "") == [1, 2]
    with pytest.raises(AdapterPathError, match="no item \\[5\\]"):
        get_path(doc, "result.assignments[5]")
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
