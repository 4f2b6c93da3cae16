"""AlbumClient: the attacker's side of the album service, over HTTP, with its own counts.

The client sees what a user of the production API sees: tokens, image ids and group
ids. It counts ``image_queries`` (images the service accepted, what the budget is
charged) and ``calls`` per endpoint (create, add, group, detail, delete, ...). Every
request that changes state carries an ``Idempotency-Key``, so a retry after a lost
connection or a 5xx neither creates a second album nor charges images twice.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from typing import Any

import numpy as np
import requests

from clusterattack.api.errors import album_error_from_payload
from clusterattack.serving import schema
from clusterattack.serving.client import TransientError, call_with_retries
from clusterattack.serving.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

__all__ = ["AlbumClient"]

_RETRY_STATUSES = frozenset({500, 502, 503, 504})


class AlbumClient:
    """Client of one album service at ``base_url`` (``http://host:port/<app>``).

    Raises the typed errors of :mod:`clusterattack.serving.errors` and
    :mod:`clusterattack.api.errors` (401, 404, 413, 422, 429, ...). A ``RateLimited``
    answer is waited out (up to ``max_rate_wait_s``) unless ``wait_on_rate_limit`` is
    False; ``BudgetExceeded`` is raised at once with ``remaining`` set.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        retry_backoff_s: float = 0.25,
        wait_on_rate_limit: bool = True,
        max_rate_wait_s: float = 300.0,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s):// URL of an album service, got {base_url!r}")
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        if max_retries < 0 or timeout_s <= 0:
            raise ValueError(f"need max_retries >= 0 and timeout_s > 0, got {max_retries}, {timeout_s}")
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.retry_backoff_s = float(retry_backoff_s)
        self.wait_on_rate_limit = bool(wait_on_rate_limit)
        self.max_rate_wait_s = float(max_rate_wait_s)
        self.image_queries = 0
        self.calls: Counter[str] = Counter()
        self.retries = 0
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._info: dict[str, Any] | None = None

    # ------------------------------------------------------------------ transport
    def _send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"X-API-Key": self._api_key, **kwargs.pop("headers", {})}
        try:
            response = self._session.request(
                method, self.base_url + path, headers=headers, timeout=self.timeout_s, **kwargs
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code in _RETRY_STATUSES and not _is_final(response):
            raise TransientError(f"HTTP {response.status_code}: {response.text[:300]}")
        if response.status_code >= 400:
            try:
                payload = response.json()
            except ValueError:
                payload = response.text[:300]
            raise album_error_from_payload(response.status_code, payload)
        return response

    def _request(self, endpoint: str, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One API call, retried on transient failures and rate limits; counted once answered."""
        response = call_with_retries(
            lambda: self._send(method, path, **kwargs),
            what=f"{method} {self.base_url}{path}",
            policy=self,
            on_retry=self._count_retry,
        )
        with self._lock:
            self.calls[endpoint] += 1
        return response

    def _count_retry(self) -> None:
        with self._lock:
            self.retries += 1

    # ------------------------------------------------------------------ API
    def info(self) -> dict[str, Any]:
        """Input shape and limits of the service (cached after the first call)."""
        if self._info is None:
            self._info = self._request("info", "GET", "/v1/info").json()
        return dict(self._info)

    def budget(self) -> dict[str, Any]:
        """The key's budget as the service's ledger sees it (remaining, used, rate)."""
        return self._request("budget", "GET", "/v1/budget").json()

    def create_album(self, name: str | None = None) -> str:
        """A new empty album; its token."""
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        body = {} if name is None else {"name": name}
        return self._request("create", "POST", "/v1/albums", json=body, headers=headers).json()["album_token"]

    def add_images(self, token: str, images: Any) -> list[str]:
        """Add float images N x C x H x W in [0, 1] (numpy or torch); their image ids in order.

        Larger batches than the service takes per request are split; each part is charged
        when it is answered, so a ``BudgetExceeded`` leaves the parts before it added.
        """
        array = _as_float_images(images)
        step = int(self.info()["max_images_per_request"])
        ids: list[str] = []
        for start in range(0, len(array), step):
            part = array[start : start + step]
            response = self._request(
                "add",
                "POST",
                f"/v1/albums/{token}/images",
                data=schema.to_npy(part),
                headers={"Content-Type": schema.NPY_MEDIA_TYPE, "Idempotency-Key": uuid.uuid4().hex},
            )
            with self._lock:
                self.image_queries += len(part)
            ids.extend(response.json()["image_ids"])
        return ids

    def group(self, token: str) -> dict[str, Any]:
        """Group the album; its summary (``group_count``, ``grouped_image_count``)."""
        return self._request("group", "POST", f"/v1/albums/{token}/group").json()

    def detail(self, token: str) -> dict[str, Any]:
        """The album's summary and ``images``: ``image_id`` and ``group_id`` of each, in order."""
        return self._request("detail", "GET", f"/v1/albums/{token}").json()

    def list_albums(self) -> list[dict[str, Any]]:
        return self._request("list", "GET", "/v1/albums").json()

    def delete_album(self, token: str) -> None:
        self._request("delete", "DELETE", f"/v1/albums/{token}")

    def cluster(self, images: Any, *, name: str | None = None, keep: bool = False) -> np.ndarray:
        """Group ids of ``images`` (in their order) through one album: create, add, group, read.

        The album is deleted afterwards unless ``keep``.
        """
        token = self.create_album(name)
        try:
            ids = self.add_images(token, images)
            self.group(token)
            by_id = {row["image_id"]: row["group_id"] for row in self.detail(token)["images"]}
        finally:
            if not keep:
                self.delete_album(token)
        groups = [by_id.get(image_id) for image_id in ids]
        if any(g is None for g in groups):
            raise ServiceUnavailable(f"album {token} answered without a group id for some of its images")
        return np.asarray(groups, dtype=np.int64)

    def counts(self) -> dict[str, int]:
        """``image_queries``, ``calls`` (all endpoints), ``calls.<endpoint>`` and ``retries``."""
        with self._lock:
            out = {"image_queries": self.image_queries, "calls": sum(self.calls.values()), "retries": self.retries}
            out.update({f"calls.{k}": v for k, v in sorted(self.calls.items())})
        return out

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> AlbumClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _is_final(response: requests.Response) -> bool:
    """True for the one 5xx a quick retry cannot fix: the album store is full."""
    try:
        payload = response.json()
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("reason") == "album_store_full"


def _as_float_images(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    array = np.asarray(images)
    if array.dtype.kind != "f" or array.ndim != 4 or len(array) == 0:
        raise ValueError(
            f"images must be a non-empty float array N x C x H x W in [0, 1], got dtype {array.dtype} "
            f"and shape {array.shape}"
        )
    return np.ascontiguousarray(array, dtype=np.float32)
