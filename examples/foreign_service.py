"""Someone else's clustering service, for trying the HTTP adapter: its own JSON, auth and rate limit.

A stand-in for a third-party API (nothing of clusterattack's serving layer): stdlib
``http.server``, the PCA + Gaussian mixture of ``sklearn_digits.py`` behind it, and house
rules of its own::

    POST /v2/assign   Authorization: Bearer <token>
    {"model": "gmm-digits", "inputs": {"pixels": [[64 values 0..255], ...]}}
    -> {"result": {"assignments": [{"cluster": 3, "probabilities": [10 floats]}, ...]}}

At most ``burst`` requests at once, refilled at ``rate`` per second; beyond that it answers
429 with ``Retry-After: 1``. Every request is written to its own log (status, images),
which is what the platform's query count is checked against. Run it and attack it::

    FOREIGN_TOKEN=s3cret python examples/foreign_service.py --port 8765 &
    FOREIGN_TOKEN=s3cret python jobs/attack.py --victim adapter:examples/foreign_service.yaml \\
        --dataset digits --eps 0.1 --epochs 2 --no-mlflow
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("foreign_service")


@dataclass
class ServiceState:
    """The model, the house rules and the request log (one entry per request, any status)."""

    model: Any
    token: str | None
    rate: float
    burst: float
    tokens: float = 0.0
    stamp: float = field(default_factory=time.monotonic)
    log: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            return False

    def record(self, status: int, images: int) -> None:
        with self.lock:
            self.log.append({"status": status, "images": images, "time": time.time()})

    def answered_images(self) -> int:
        with self.lock:
            return sum(e["images"] for e in self.log if e["status"] == 200)

    def count(self, status: int) -> int:
        with self.lock:
            return sum(1 for e in self.log if e["status"] == status)


def make_handler(state: ServiceState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: the state keeps the log
            log.debug(fmt, *args)

        def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path != "/v2/assign":
                state.record(404, 0)
                return self._send(404, {"message": f"no route {self.path}"})
            if state.token is not None and self.headers.get("Authorization") != f"Bearer {state.token}":
                state.record(401, 0)
                return self._send(401, {"message": "bad or missing bearer token"})
            if not state.admit():
                state.record(429, 0)
                return self._send(429, {"message": "slow down"}, {"Retry-After": "1"})
            try:
                pixels = np.asarray(json.loads(raw)["inputs"]["pixels"], dtype=np.float64)
            except (ValueError, KeyError, TypeError) as exc:
                state.record(400, 0)
                return self._send(400, {"message": f"bad body: {exc}"})
            if pixels.ndim != 2 or pixels.shape[1] != 64:
                state.record(422, 0)
                return self._send(422, {"message": f"pixels must be N x 64, got {list(pixels.shape)}"})
            probs = state.model.predict_proba((pixels / 255.0).reshape(-1, 1, 8, 8))
            state.record(200, len(pixels))
            assignments = [
                {"cluster": int(np.argmax(p)), "probabilities": [float(v) for v in p]} for p in probs
            ]
            return self._send(200, {"result": {"assignments": assignments}, "model": "gmm-digits"})

    return Handler


def start_service(
    port: int = 0, *, token: str | None = None, rate: float = 2.0, burst: float = 3.0, model: Any = None
) -> tuple[ThreadingHTTPServer, ServiceState]:
    """Start the service on 127.0.0.1:``port`` (0: a free one) in a daemon thread."""
    if model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from sklearn_digits import build

        model = build()
    state = ServiceState(model=model, token=token, rate=rate, burst=burst, tokens=burst)
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(state))
    threading.Thread(target=server.serve_forever, name="foreign-service", daemon=True).start()
    return server, state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--rate", type=float, default=2.0, help="requests per second it admits")
    p.add_argument("--burst", type=float, default=3.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    server, state = start_service(args.port, token=os.environ.get("FOREIGN_TOKEN"), rate=args.rate, burst=args.burst)
    log.info("foreign service on http://127.0.0.1:%d/v2/assign", server.server_address[1])
    try:
        while True:
            time.sleep(10)
            log.info("requests: %d answered (%d images), %d rate-limited", state.count(200),
                     state.answered_images(), state.count(429))
    except KeyboardInterrupt:
        server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
