"""ServedVictim: the Victim contract over a Serve handle or HTTP, with query accounting.

This is the one place outside the server where queries are counted: ``image_queries``
(images answered, what the budget is charged), ``calls`` (``predict_proba``/``predict``
calls answered: the paper's victim calls) and ``requests`` (requests the server
answered). A batch larger than ``chunk_size`` is split and up to ``max_in_flight``
chunks are kept in flight, so the client's encoding, the transfer and the model of
several replicas (or one replica's batcher and model thread) overlap. Every chunk carries a request id of its own; a retry after a transport failure or
a killed replica reuses it, so the server never charges it twice.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Protocol, runtime_checkable

import numpy as np
import requests
import torch

from clusterattack.serving import schema
from clusterattack.serving.errors import (
    ModeMismatch,
    RateLimited,
    ServiceUnavailable,
    ServingError,
    error_from_payload,
    unwrap_error,
)
from clusterattack.victims.base import check_images

logger = logging.getLogger(__name__)

__all__ = ["HandleTransport", "HttpTransport", "ServedVictim", "Transport", "TransientError", "call_with_retries"]


class TransientError(Exception):
    """A failure worth retrying with the same request id (replica died, connection lost)."""


def call_with_retries(send: Any, *, what: str, policy: Any, on_retry: Any) -> Any:
    """``send()`` under the clients' retry policy; its answer, or the error that ended it.

    ``RateLimited`` waits out its ``retry_after_s`` while ``policy.wait_on_rate_limit`` and
    the total wait stays under ``policy.max_rate_wait_s``; ``TransientError`` (connection
    lost, 5xx, a replica gone) is retried up to ``policy.max_retries`` times with
    exponential backoff from ``policy.retry_backoff_s`` (``on_retry()`` is called each
    time), then raised as ``ServiceUnavailable``. Any other error is raised at once.
    """
    attempt, waited_s = 0, 0.0
    while True:
        try:
            return send()
        except RateLimited as exc:
            wait_s = exc.retry_after_s
            if not policy.wait_on_rate_limit or wait_s is None or waited_s + wait_s > policy.max_rate_wait_s:
                raise
            time.sleep(wait_s)
            waited_s += wait_s
        except TransientError as exc:
            attempt += 1
            if attempt > policy.max_retries:
                raise ServiceUnavailable(f"{what} failed {attempt} times: {exc}") from exc
            on_retry()
            logger.warning("%s failed (%s); retry %d", what, exc, attempt)
            time.sleep(min(5.0, policy.retry_backoff_s * 2 ** (attempt - 1)))



@runtime_checkable
class Transport(Protocol):
    """How requests reach a victim: raises serving errors, or TransientError to be retried."""

    def info(self, api_key: str) -> dict[str, Any]: ...

    def budget(self, api_key: str) -> dict[str, Any]: ...

    def predict(self, images: np.ndarray, api_key: str, request_id: str) -> np.ndarray: ...

    def describe(self) -> str: ...


class HandleTransport:
    """Requests through a Serve ``DeploymentHandle`` (inside the Ray cluster)."""

    def __init__(self, handle: Any, timeout_s: float) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    def _result(self, response: Any) -> Any:
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
        from ray.serve.exceptions import RayServeException

        try:
            return response.result(timeout_s=self.timeout_s)
        except ServingError as exc:
            raise unwrap_error(exc) from None
        except (
            RayActorError,
            ActorUnavailableError,
            RayServeException,
            GetTimeoutError,
            TimeoutError,
        ) as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}") from exc

    def info(self, api_key: str) -> dict[str, Any]:
        return self._result(self.handle.info.remote(api_key))

    def budget(self, api_key: str) -> dict[str, Any]:
        return self._result(self.handle.budget.remote(api_key))

    def predict(self, images: np.ndarray, api_key: str, request_id: str) -> np.ndarray:
        return self._result(self.handle.predict.remote(images, api_key, request_id))

    def describe(self) -> str:
        return f"handle {self.handle.deployment_name!r} of app {self.handle.app_name!r}"


class HttpTransport:
    """Requests over HTTP to ``base_url`` (``http://host:port/<app>``); .npy both ways."""

    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "timeout_s": self.timeout_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["base_url"], state["timeout_s"])

    def _session(self) -> requests.Session:
        # requests.Session is not thread-safe; one per worker thread keeps connections alive.
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _request(self, method: str, path: str, api_key: str, **kwargs: Any) -> requests.Response:
        headers = {"X-API-Key": api_key, **kwargs.pop("headers", {})}
        try:
            response = self._session().request(
                method, self.base_url + path, headers=headers, timeout=self.timeout_s, **kwargs
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500:
            raise TransientError(f"HTTP {response.status_code}: {response.text[:300]}")
        if response.status_code >= 400:
            try:
                payload = response.json()
            except ValueError:
                payload = response.text[:300]
            raise error_from_payload(response.status_code, payload)
        return response

    def info(self, api_key: str) -> dict[str, Any]:
        return self._request("GET", "/v1/info", api_key).json()

    def budget(self, api_key: str) -> dict[str, Any]:
        return self._request("GET", "/v1/budget", api_key).json()

    def predict(self, images: np.ndarray, api_key: str, request_id: str) -> np.ndarray:
        response = self._request(
            "POST",
            "/v1/predict",
            api_key,
            data=schema.to_npy(images),
            headers={
                "Content-Type": schema.NPY_MEDIA_TYPE,
                "Accept": schema.NPY_MEDIA_TYPE,
                "Idempotency-Key": request_id,
            },
        )
        # The same pickle-free reader as the server's: the client trusts no bytes either.
        return schema.parse_npy(response.content)

    def describe(self) -> str:
        return self.base_url


class ServedVictim:
    """A victim served by :mod:`clusterattack.serving.deployment`, as attacks see it.

    Satisfies ``Victim`` in ``scores`` mode (``predict_proba``) and ``DecisionVictim``
    in both modes (``predict``). Raises ``BudgetExceeded`` when the key's budget cannot
    cover a chunk, after the chunks already in flight have finished (their images are
    counted). ``RateLimited`` answers are waited out (up to ``max_rate_wait_s`` per
    chunk) unless ``wait_on_rate_limit`` is False. Counts: ``image_queries`` (images
    answered and charged), ``calls`` (answered ``predict_proba``/``predict`` calls, the
    paper's victim calls), ``requests`` and ``retries`` (transport level).

    Args:
        target: a ``DeploymentHandle``, an ``http(s)://host:port/<app>`` URL, the name
            of a running Serve application, or any :class:`Transport`.
        api_key: the attacker key.
        chunk_size: images per request; 128 splits a paper batch of 256 in two requests
            that overlap (one encodes or travels while the other runs).
        max_in_flight: chunks sent before the first answer is awaited.
        timeout_s: per request. max_retries: per chunk, on transient failures.
        device: where returned tensors go.
    """

    def __init__(
        self,
        target: Any,
        api_key: str,
        *,
        chunk_size: int = 128,
        max_in_flight: int = 4,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        retry_backoff_s: float = 0.25,
        wait_on_rate_limit: bool = True,
        max_rate_wait_s: float = 300.0,
        device: str | torch.device = "cpu",
    ) -> None:
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        if chunk_size < 1 or max_in_flight < 1 or max_retries < 0:
            raise ValueError(
                f"need chunk_size >= 1, max_in_flight >= 1, max_retries >= 0; got "
                f"{chunk_size}, {max_in_flight}, {max_retries}"
            )
        self._api_key = api_key
        self.max_in_flight = int(max_in_flight)
        self.max_retries = int(max_retries)
        self.retry_backoff_s = float(retry_backoff_s)
        self.wait_on_rate_limit = bool(wait_on_rate_limit)
        self.max_rate_wait_s = float(max_rate_wait_s)
        self.device = torch.device(device)
        self._transport = _make_transport(target, timeout_s)
        self.image_queries = 0
        self.calls = 0
        self.requests = 0
        self.retries = 0
        self._init_runtime()
        info = self._retrying(lambda: self._transport.info(api_key))
        self.name: str = info["name"]
        self.mode: str = info["mode"]
        self.num_clusters: int = int(info["num_clusters"])
        self.input_shape: tuple[int, int, int] = tuple(int(d) for d in info["input_shape"])
        self.chunk_size_limit = int(info["max_images_per_request"])
        self.chunk_size = min(int(chunk_size), self.chunk_size_limit)
        logger.info(
            "served victim %s (%s mode, %d clusters) via %s",
            self.name, self.mode, self.num_clusters, self._transport.describe(),
        )

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="served-victim")
        self._session = uuid.uuid4().hex[:16]
        self._ids = itertools.count()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", "_pool", "_ids"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy gets a fresh request-id session: ids never collide between copies.
        self.__dict__.update(state)
        self._init_runtime()

    # ------------------------------------------------------------------ Victim contract
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Soft memberships N x K (float32) of images N x C x H x W in [0, 1]."""
        self._require_scores()
        scores = self._query(x)
        self._count_call()
        return torch.from_numpy(scores).to(self.device)

    def predict_proba_batches(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Memberships of ``x`` asked as calls of at most ``batch_size`` images, several in flight.

        What an attack loop does when it has many images to ask at once (a surrogate's
        distillation pool, the perturbed points of one gradient estimate): the same calls
        of ``batch_size`` as asking them one at a time (each counted in ``calls``, each a
        request of its own, capped by the server's request limit), but up to
        ``max_in_flight`` of them outstanding, so the client's encoding, the transfer and
        the replicas' models overlap instead of taking turns.
        """
        self._require_scores()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of images, got {batch_size!r}")
        scores = self._query(x, min(batch_size, self.chunk_size_limit), chunks_are_calls=True)
        return torch.from_numpy(scores).to(self.device)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster ids (int64, N); in scores mode the argmax of the same single query."""
        out = self._query(x)
        self._count_call()
        labels = out if self.mode == "labels" else out.argmax(axis=1)
        return torch.from_numpy(labels.astype(np.int64, copy=False)).to(self.device)

    def budget(self) -> dict[str, Any]:
        """The key's budget as the ledger sees it now (remaining, used, rate, tokens)."""
        return self._retrying(lambda: self._transport.budget(self._api_key))

    def counts(self) -> dict[str, int]:
        """``image_queries``, ``calls``, ``requests`` and transport ``retries`` so far."""
        with self._lock:
            return {
                "image_queries": self.image_queries,
                "calls": self.calls,
                "requests": self.requests,
                "retries": self.retries,
            }

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ServedVictim:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _require_scores(self) -> None:
        if self.mode != "scores":
            raise ModeMismatch(
                f"victim {self.name!r} is served in {self.mode!r} mode: it answers cluster "
                "ids only; use predict()"
            )

    def _count_call(self) -> None:
        with self._lock:
            self.calls += 1

    def _images(self, x: torch.Tensor) -> np.ndarray:
        """``x`` as float32 numpy, checked like ``victims.base.check_images`` but in numpy:
        torch's reductions start intra-op threads that cost more than the request itself
        on a busy machine, and NaN propagates through min and max, so two passes suffice."""
        if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            check_images(x, self.input_shape)  # raises the contract's TypeError/ValueError
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            check_images(x, self.input_shape)
        images = x.detach().to("cpu", torch.float32).contiguous().numpy()
        if images.size and not (images.min() >= 0.0 and images.max() <= 1.0):
            raise ValueError("images must be finite and lie in [0, 1]")
        return images

    def _query(
        self, x: torch.Tensor, chunk_size: int | None = None, chunks_are_calls: bool = False
    ) -> np.ndarray:
        """Answers to ``x`` in requests of ``chunk_size``, up to ``max_in_flight`` outstanding;
        with ``chunks_are_calls`` each answered request also counts as a call (even when a
        later one fails, as its images were charged)."""
        images = self._images(x)
        if len(images) == 0:
            width = (self.num_clusters,) if self.mode == "scores" else ()
            return np.zeros((0, *width), np.float32 if self.mode == "scores" else np.int64)
        chunk_size = chunk_size or self.chunk_size
        starts = range(0, len(images), chunk_size)
        chunks = iter(enumerate(starts))
        results: list[np.ndarray | None] = [None] * len(starts)
        pending: dict[Future, int] = {}
        failures: list[BaseException] = []
        while True:
            # Stop sending once a chunk failed: its successors would fail the same way.
            while not failures and len(pending) < self.max_in_flight:
                item = next(chunks, None)
                if item is None:
                    break
                index, start = item
                chunk = images[start : start + chunk_size]
                pending[self._pool.submit(self._call, chunk, self._next_id())] = index
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                try:
                    results[index] = future.result()
                except Exception as exc:
                    failures.append(exc)
                else:
                    if chunks_are_calls:
                        self._count_call()
        if failures:
            raise failures[0]
        return np.concatenate(results)

    def _next_id(self) -> str:
        with self._lock:
            return f"{self._session}-{next(self._ids)}"

    def _call(self, images: np.ndarray, request_id: str) -> np.ndarray:
        out = call_with_retries(
            lambda: self._transport.predict(images, self._api_key, request_id),
            what=f"{self._transport.describe()} request {request_id}",
            policy=self,
            on_retry=self._count_retry,
        )
        self._check_output(out, len(images))
        with self._lock:
            self.image_queries += len(images)
            self.requests += 1
        return out

    def _count_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def _check_output(self, out: np.ndarray, n: int) -> None:
        expected = (n, self.num_clusters) if self.mode == "scores" else (n,)
        kind = "f" if self.mode == "scores" else "i"
        if not isinstance(out, np.ndarray) or out.shape != expected or out.dtype.kind != kind:
            got = (out.shape, out.dtype) if isinstance(out, np.ndarray) else type(out).__name__
            raise ServingError(f"server answered {got}, expected an array of shape {expected}")

    def _retrying(self, fn: Any) -> Any:
        for attempt in range(self.max_retries + 1):
            try:
                return fn()
            except TransientError as exc:
                if attempt == self.max_retries:
                    raise ServiceUnavailable(f"{self._transport.describe()}: {exc}") from exc
                time.sleep(min(5.0, self.retry_backoff_s * 2**attempt))
        raise AssertionError("unreachable")


def _make_transport(target: Any, timeout_s: float) -> Transport:
    if isinstance(target, str) and target.startswith(("http://", "https://")):
        return HttpTransport(target, timeout_s)
    if isinstance(target, str):
        from ray import serve

        return HandleTransport(serve.get_app_handle(target), timeout_s)
    from ray.serve.handle import DeploymentHandle

    if isinstance(target, DeploymentHandle):
        return HandleTransport(target, timeout_s)
    # Checked after DeploymentHandle, whose attribute access answers any method name.
    if isinstance(target, Transport):
        return target
    raise TypeError(
        f"target must be a DeploymentHandle, an http(s):// URL, a Serve app name or a "
        f"Transport, got {type(target).__name__}"
    )
