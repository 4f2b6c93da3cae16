"""Someone else's HTTP clustering service as a victim, asked through its adapter, politely and counted.

The client counts as ``ServedVictim`` does: ``image_queries`` (images the service
answered), ``calls`` (answered ``predict_proba``/``predict`` calls), ``requests`` (HTTP
requests answered), plus ``retries`` and ``rate_limited`` (429s received, each waited out).
Requests go one at a time, at most ``politeness.rate_per_s`` a second; the cap
``politeness.max_image_queries`` raises ``BudgetExceeded`` before a request that would
pass it, so an attack stops cleanly as it does on a served victim's budget.
"""

from __future__ import annotations

import email.utils
import io
import logging
import os
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import requests
import torch

from clusterattack.serving.errors import BudgetExceeded, RateLimited, ServiceUnavailable
from clusterattack.victims.base import check_images
from clusterattack.victims.sources.adapter import AdapterConfig, get_path, set_path
from clusterattack.victims.sources.answers import (
    VictimAnswerError,
    as_tensor,
    check_labels,
    to_memberships,
)
from clusterattack.victims.sources.spec import VictimSpecError

__all__ = [
    "AdapterLabelsVictim",
    "AdapterScoresVictim",
    "ServiceError",
    "check_reachable",
    "make_adapter_victim",
    "parse_retry_after",
]

log = logging.getLogger(__name__)

NPY_MEDIA_TYPE = "application/x-npy"


class ServiceError(VictimSpecError):
    """The foreign service refused a request for good (a 4xx other than 429), or cannot be reached."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date; None if absent/bad."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def check_reachable(url: str, timeout_s: float = 5.0) -> None:
    """Open (and close) a TCP connection to the URL's host and port: no HTTP request is sent,
    so the service has nothing to log or charge. ServiceError naming the URL when it fails."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ServiceError(f"cannot reach {url} ({parts.hostname}:{port}): {exc}") from exc


class _TokenBucket:
    """Requests per second with a burst; ``take`` sleeps until a token is there."""

    def __init__(self, rate_per_s: float | None, burst: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        if self.rate is None:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        wait = 0.0
        if self.tokens < 1.0:
            wait = (1.0 - self.tokens) / self.rate
            time.sleep(wait)
            self.stamp = time.monotonic()
            self.tokens = 1.0
        self.tokens -= 1.0
        return wait


class _AdapterVictim:
    def __init__(
        self,
        config: AdapterConfig,
        *,
        input_shape: tuple[int, int, int],
        api_key: str | None = None,
        spec: str | None = None,
        check: bool = True,
    ) -> None:
        self.config = config
        self.spec = spec or (f"adapter:{config.source}" if config.source else config.url)
        self.name = config.name or urlsplit(config.url).hostname or "service"
        self.kind = "adapter"
        self.output = config.response.kind
        self.num_clusters = int(config.num_clusters)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.max_image_queries = config.politeness.max_image_queries
        self._secret = self._read_secret(api_key)
        self.image_queries = 0
        self.calls = 0
        self.requests = 0
        self.retries = 0
        self.rate_limited = 0
        self.waited_s = 0.0
        self._init_runtime()
        if check:
            check_reachable(config.url, min(5.0, config.politeness.timeout_s))

    # ------------------------------------------------------------------ set-up
    def _read_secret(self, api_key: str | None) -> str | None:
        auth = self.config.auth
        if auth is None:
            return None
        secret = os.environ.get(auth.env) if auth.env else None
        secret = secret or api_key
        if not secret:
            raise VictimSpecError(
                f"adapter {self.config.source or self.config.url} sends {auth.header!r} but has no secret: "
                f"set the environment variable {auth.env!r}" + (" or pass --api-key" if auth.env else " (auth.env) or pass --api-key")
            )
        return auth.prefix + secret

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._bucket = _TokenBucket(self.config.politeness.rate_per_s, self.config.politeness.burst)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", "_session", "_bucket"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def counts(self) -> dict[str, int]:
        """``image_queries``, ``calls``, ``requests``, ``retries`` and ``rate_limited`` so far."""
        with self._lock:
            return {
                "image_queries": self.image_queries,
                "calls": self.calls,
                "requests": self.requests,
                "retries": self.retries,
                "rate_limited": self.rate_limited,
            }

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "url": self.config.url,
            "output": self.output,
            "num_clusters": self.num_clusters,
            "input_shape": list(self.input_shape),
            "max_image_queries": self.max_image_queries,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.url!r}, {self.output}, K={self.num_clusters}, {self.counts()})"

    # ------------------------------------------------------------------ requests
    def _encode(self, images: np.ndarray) -> tuple[dict[str, Any], dict[str, str]]:
        req = self.config.request
        if req.layout == "nhwc":
            images = images.transpose(0, 2, 3, 1)
        elif req.layout == "flat":
            images = images.reshape(len(images), -1)
        scaled = images.astype(np.float64) * req.pixel_scale
        if req.dtype == "uint8":
            pixels = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        else:
            pixels = scaled.astype(req.dtype)
        headers = {str(k): str(v) for k, v in req.headers.items()}
        if self._secret is not None and self.config.auth is not None:
            headers[self.config.auth.header] = self._secret
        if req.format == "npy":
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(pixels), allow_pickle=False)
            headers.setdefault("Content-Type", NPY_MEDIA_TYPE)
            return {"data": buffer.getvalue()}, headers
        body = set_path(_deep_copy(req.extra), req.field, pixels.tolist())
        return {"json": body}, headers

    def _decode(self, response: requests.Response, n: int) -> torch.Tensor:
        res = self.config.response
        who = f"service {self.config.url}"
        if res.format == "npy":
            try:
                arr = np.load(io.BytesIO(response.content), allow_pickle=False)
            except ValueError as exc:
                raise VictimAnswerError(f"{who} answered a body that is not an .npy array: {exc}") from exc
            return as_tensor(arr, who)
        try:
            doc = response.json()
        except ValueError as exc:
            raise VictimAnswerError(
                f"{who} answered a body that is not JSON ({response.headers.get('content-type')}): "
                f"{response.text[:200]!r}"
            ) from exc
        return as_tensor(get_path(doc, res.path), who)

    def _backoff(self, attempt: int) -> float:
        pol = self.config.politeness
        return min(pol.max_backoff_s, pol.backoff_s * 2 ** (attempt - 1))

    def _post(self, images: np.ndarray) -> torch.Tensor:
        """One request for ``images`` under the politeness rules; the decoded answer."""
        pol = self.config.politeness
        payload, headers = self._encode(images)
        attempt, rate_waits, waited = 0, 0, 0.0
        while True:
            self._bucket.take()
            try:
                response = self._session.request(
                    self.config.method.upper(), self.config.url, headers=headers, timeout=pol.timeout_s, **payload
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                status, failure, retry_after = None, f"{type(exc).__name__}: {exc}", None
            else:
                status = response.status_code
                if status < 400:
                    return self._decode(response, len(images))
                failure = f"HTTP {status}: {response.text[:300]}"
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if status == 429 or (status == 503 and retry_after is not None):
                # The service asks us to slow down: wait as told; this is not a failure.
                wait = retry_after if retry_after is not None else self._backoff(rate_waits + 1)
                rate_waits += 1
                with self._lock:
                    self.rate_limited += 1
                if wait > pol.max_retry_after_s or waited + wait > pol.max_rate_wait_s:
                    raise RateLimited(
                        f"{self.config.url} asks to wait {wait:.1f} s (Retry-After) after {waited:.1f} s of "
                        f"waits; politeness allows {pol.max_retry_after_s:g} s per wait and "
                        f"{pol.max_rate_wait_s:g} s per request",
                        requested=len(images),
                        remaining=0 if self.max_image_queries is None else self.max_image_queries - self.image_queries,
                        retry_after_s=wait,
                    )
                log.info("%s: HTTP 429, waiting %.2f s as its Retry-After asks", self.config.url, wait)
                time.sleep(wait)
                waited += wait
                with self._lock:
                    self.waited_s += wait
                continue
            if status is not None and status < 500:
                raise ServiceError(f"{self.config.url} refused the request: {failure}")
            attempt += 1
            if attempt > pol.max_retries:
                raise ServiceUnavailable(f"{self.config.url} failed {attempt} times; last: {failure}")
            wait = retry_after if retry_after is not None else self._backoff(attempt)
            with self._lock:
                self.retries += 1
            log.warning("%s failed (%s); retry %d in %.2f s", self.config.url, failure, attempt, wait)
            time.sleep(wait)

    def _ask(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The service's answers to ``x``, one per request of at most ``batch_size`` images."""
        check_images(x, self.input_shape)
        images = x.detach().to("cpu", torch.float32).contiguous().numpy()
        answers = []
        step = self.config.batch_size
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            with self._lock:
                cap = self.max_image_queries
                if cap is not None and self.image_queries + len(chunk) > cap:
                    raise BudgetExceeded(
                        f"adapter cap of {cap} image-queries on {self.config.url}: {len(chunk)} requested, "
                        f"{cap - self.image_queries} remaining",
                        requested=len(chunk),
                        remaining=cap - self.image_queries,
                    )
            answer = self._post(chunk)
            answers.append((answer, len(chunk)))
            with self._lock:
                self.image_queries += len(chunk)
                self.requests += 1
        with self._lock:
            self.calls += 1
        return answers


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


class AdapterScoresVictim(_AdapterVictim):
    """A foreign service that answers memberships or logits: the Victim contract."""

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        who = f"service {self.config.url}"
        parts = [
            to_memberships(out, self.output, n, self.num_clusters, who) for out, n in self._ask(x)
        ]
        if not parts:
            return torch.zeros(0, self.num_clusters, device=x.device)
        return torch.cat(parts).to(x.device)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict_proba(x).argmax(dim=1)


class AdapterLabelsVictim(_AdapterVictim):
    """A foreign service that answers cluster ids only: the decision-only contract."""

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        who = f"service {self.config.url}"
        parts = [check_labels(out, n, self.num_clusters, who) for out, n in self._ask(x)]
        if not parts:
            return torch.zeros(0, dtype=torch.int64, device=x.device)
        return torch.cat(parts).to(x.device)


def make_adapter_victim(
    config: AdapterConfig,
    *,
    input_shape: tuple[int, int, int] | None = None,
    api_key: str | None = None,
    spec: str | None = None,
    check: bool = True,
) -> AdapterScoresVictim | AdapterLabelsVictim:
    """The client of ``config``'s service; ``check`` first opens a TCP connection (nothing is asked)."""
    shape = config.input_shape or input_shape
    if shape is None:
        raise VictimSpecError(
            f"adapter {config.source or config.url} does not say the input shape: add input_shape: [C, H, W] "
            "or name the data set"
        )
    cls = AdapterLabelsVictim if config.response.kind == "labels" else AdapterScoresVictim
    return cls(config, input_shape=shape, api_key=api_key, spec=spec, check=check)
