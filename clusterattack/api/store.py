"""Where albums live: a bounded in-memory store per API key, served to every replica by one Ray actor.

An album holds, per image, an opaque image id and the hidden model's record of it (a
cluster id or a feature vector, see ``grouping``), never the image itself, plus the group
ids of its last grouping. :class:`AlbumStore` is plain Python (tested without Ray);
:func:`get_album_store` runs it as one named, detached actor, so every replica of the
service sees the same albums and albums survive replica crashes, redeploys and scaling.

What albums do not survive, on purpose: the store actor's own death or a restart of the
Ray cluster (the actor then comes back empty and old tokens answer 404), and
``album_ttl_s`` without any request (the album is dropped, as Face++ expired its
albums). Memory is bounded by the limits of :class:`StoreLimits`: images per album,
albums per key, and the bytes all records take together.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clusterattack.api.errors import (
    AlbumEmpty,
    AlbumFull,
    AlbumNotFound,
    AlbumStoreFull,
    TooManyAlbums,
)
from clusterattack.serving.errors import BadRequest, ServiceUnavailable, ServingError, unwrap_error

logger = logging.getLogger(__name__)

__all__ = [
    "AlbumStore",
    "AsyncAlbumStore",
    "StoreLimits",
    "get_album_store",
    "kill_album_store",
]

#: Bytes counted per image beyond its record: the id string and list slots.
_PER_IMAGE_OVERHEAD = 96
_MAX_NAME = 64


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class StoreLimits:
    """Bounds of the album store; the worst-case memory is ``max_store_bytes``."""

    max_images_per_album: int = 1000
    max_albums_per_key: int = 100
    max_store_bytes: int = 512 * 1024 * 1024
    album_ttl_s: float = 24 * 3600.0

    def __post_init__(self) -> None:
        _positive_int("max_images_per_album", self.max_images_per_album)
        _positive_int("max_albums_per_key", self.max_albums_per_key)
        _positive_int("max_store_bytes", self.max_store_bytes)
        if not (isinstance(self.album_ttl_s, int | float) and math.isfinite(self.album_ttl_s)) or self.album_ttl_s <= 0:
            raise ValueError(f"album_ttl_s must be a finite number of seconds > 0, got {self.album_ttl_s!r}")


@dataclass
class _Album:
    token: str
    key_id: str
    name: str
    created_at: float
    touched_at: float
    image_ids: list[str] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)
    requests: dict[str, tuple[int, int]] = field(default_factory=dict)
    groups: np.ndarray | None = None
    grouped_at: float | None = None
    nbytes: int = 0

    def records(self) -> np.ndarray:
        if len(self.chunks) > 1:
            # Merged once, so repeated groupings do not copy the album each time.
            self.chunks = [np.concatenate(self.chunks)]
        return self.chunks[0]

    def summary(self) -> dict[str, Any]:
        grouped = 0 if self.groups is None else int(self.groups.size)
        return {
            "album_token": self.token,
            "name": self.name,
            "image_count": len(self.image_ids),
            "grouped_image_count": grouped,
            "group_count": 0 if self.groups is None else int(np.unique(self.groups).size),
            # Whole seconds: no float in an answer, so nothing can pass for a score.
            "created_at": int(self.created_at),
            "grouped_at": None if self.grouped_at is None else int(self.grouped_at),
        }


class AlbumStore:
    """Albums per key, bounded by :class:`StoreLimits` (see the module docstring).

    Every method takes the caller's ``key_id`` and answers :class:`AlbumNotFound` for a
    token the key does not own. Adding is idempotent per ``request_id``: a retry returns
    the image ids of the first attempt and adds nothing. Methods return plain data
    (dicts, lists, arrays) so that they cross process boundaries unchanged.
    """

    def __init__(self, limits: StoreLimits | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.limits = limits or StoreLimits()
        self._clock = clock
        self._albums: dict[str, _Album] = {}
        self._create_requests: dict[tuple[str, str], str] = {}
        self._nbytes = 0
        # The actor runs one call at a time; the lock is for direct (threaded) use.
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ plumbing
    def _album(self, key_id: str, token: str) -> _Album:
        album = self._albums.get(token) if isinstance(token, str) else None
        if album is None or album.key_id != key_id:
            raise AlbumNotFound(f"no album {str(token)[:80]!r} for this API key (unknown, expired or deleted)")
        album.touched_at = self._clock()
        return album

    def _drop(self, album: _Album) -> None:
        self._albums.pop(album.token, None)
        self._nbytes -= album.nbytes
        for request_key in [k for k, v in self._create_requests.items() if v == album.token]:
            del self._create_requests[request_key]

    def reap(self) -> int:
        """Drop albums untouched for ``album_ttl_s``; returns how many."""
        with self._lock:
            deadline = self._clock() - self.limits.album_ttl_s
            stale = [a for a in self._albums.values() if a.touched_at < deadline]
            for album in stale:
                self._drop(album)
            if stale:
                logger.info("dropped %d albums idle for over %.0f s", len(stale), self.limits.album_ttl_s)
            return len(stale)

    def configure(self, limits: StoreLimits) -> None:
        """Apply new limits (a redeployed service brings its own); held albums are kept."""
        with self._lock:
            self.limits = limits

    # ------------------------------------------------------------------ albums
    def create(self, key_id: str, name: str | None = None, request_id: str | None = None) -> dict[str, Any]:
        """A new empty album of ``key_id``; a repeated ``request_id`` returns the same album."""
        if name is not None and (not isinstance(name, str) or len(name) > _MAX_NAME):
            raise BadRequest(f"album name must be a string of at most {_MAX_NAME} characters, got {name!r:.80}")
        with self._lock:
            self.reap()
            if request_id is not None:
                token = self._create_requests.get((key_id, request_id))
                if token in self._albums:
                    return self._albums[token].summary()
            owned = sum(1 for a in self._albums.values() if a.key_id == key_id)
            if owned >= self.limits.max_albums_per_key:
                raise TooManyAlbums(
                    f"this API key holds {owned} albums, the limit is {self.limits.max_albums_per_key}; "
                    "delete one (DELETE /v1/albums/{album_token}) before creating another"
                )
            now = self._clock()
            token = "alb_" + secrets.token_urlsafe(18)
            self._albums[token] = _Album(token, key_id, name or "", now, now)
            if request_id is not None:
                self._create_requests[(key_id, request_id)] = token
            return self._albums[token].summary()

    def check_room(self, key_id: str, token: str, images: int) -> None:
        """Raise unless ``images`` more images fit in the album (checked before charging)."""
        with self._lock:
            self._check_room(self._album(key_id, token), images)

    def _check_room(self, album: _Album, images: int) -> None:
        limit = self.limits.max_images_per_album
        if len(album.image_ids) + images > limit:
            raise AlbumFull(
                f"album {album.token} holds {len(album.image_ids)} images; adding {images} would pass "
                f"its limit of {limit} (room for {limit - len(album.image_ids)} more)"
            )

    def find_request(self, key_id: str, token: str, request_id: str) -> dict[str, Any] | None:
        """What an earlier add with ``request_id`` answered (``image_ids``, ``image_count``), or None."""
        with self._lock:
            album = self._album(key_id, token)
            span = album.requests.get(request_id)
            if span is None:
                return None
            return {"image_ids": album.image_ids[span[0] : span[1]], "image_count": len(album.image_ids)}

    def add(self, key_id: str, token: str, records: np.ndarray, request_id: str) -> dict[str, Any]:
        """Append one record per image; returns ``image_ids`` and the album's ``image_count``."""
        records = np.asarray(records)
        if records.ndim < 1 or records.shape[0] < 1:
            raise BadRequest(f"an add needs at least one image record, got shape {records.shape}")
        with self._lock:
            album = self._album(key_id, token)
            if request_id in album.requests:
                return self.find_request(key_id, token, request_id)
            self._check_room(album, records.shape[0])
            if album.chunks and (
                album.chunks[0].dtype != records.dtype or album.chunks[0].shape[1:] != records.shape[1:]
            ):
                raise ServingError(
                    f"album {token} holds records of {album.chunks[0].dtype} {album.chunks[0].shape[1:]}, "
                    f"got {records.dtype} {records.shape[1:]}: the service's model changed under it"
                )
            nbytes = int(records.nbytes) + _PER_IMAGE_OVERHEAD * records.shape[0]
            if self._nbytes + nbytes > self.limits.max_store_bytes:
                self.reap()
                if self._nbytes + nbytes > self.limits.max_store_bytes:
                    raise AlbumStoreFull(
                        f"the album store holds {self._nbytes} of {self.limits.max_store_bytes} bytes "
                        f"and cannot take {nbytes} more; retry later or delete albums"
                    )
            start = len(album.image_ids)
            album.image_ids.extend("img_" + secrets.token_hex(8) for _ in range(records.shape[0]))
            album.chunks.append(np.array(records, copy=True))
            album.requests[request_id] = (start, len(album.image_ids))
            album.nbytes += nbytes
            self._nbytes += nbytes
            return {"image_ids": album.image_ids[start:], "image_count": len(album.image_ids)}

    def records(self, key_id: str, token: str) -> np.ndarray:
        """Every record of the album in insertion order (what grouping runs on)."""
        with self._lock:
            album = self._album(key_id, token)
            if not album.image_ids:
                raise AlbumEmpty(
                    f"album {token} holds no images; add some (POST /v1/albums/{token}/images) before grouping"
                )
            return album.records()

    def set_groups(self, key_id: str, token: str, groups: np.ndarray) -> dict[str, Any]:
        """Store group ids for the first ``len(groups)`` images (those grouped); the summary."""
        groups = np.asarray(groups, dtype=np.int64)
        with self._lock:
            album = self._album(key_id, token)
            if groups.ndim != 1 or not 1 <= groups.size <= len(album.image_ids):
                raise ServingError(
                    f"{groups.size} group ids for album {token} of {len(album.image_ids)} images"
                )
            album.groups = groups.copy()
            album.grouped_at = self._clock()
            return album.summary()

    def detail(self, key_id: str, token: str) -> dict[str, Any]:
        """The summary and, per image in insertion order, its id and group id (None: not grouped)."""
        with self._lock:
            album = self._album(key_id, token)
            groups = [] if album.groups is None else album.groups.tolist()
            images = [
                {"image_id": image_id, "group_id": groups[i] if i < len(groups) else None}
                for i, image_id in enumerate(album.image_ids)
            ]
            return {**album.summary(), "images": images}

    def list_albums(self, key_id: str) -> list[dict[str, Any]]:
        """Summaries of the key's albums, oldest first."""
        with self._lock:
            self.reap()
            owned = [a for a in self._albums.values() if a.key_id == key_id]
            return [a.summary() for a in sorted(owned, key=lambda a: a.created_at)]

    def delete(self, key_id: str, token: str) -> None:
        with self._lock:
            self._drop(self._album(key_id, token))

    def stats(self) -> dict[str, int]:
        """Albums, images and bytes held (for operators and tests)."""
        with self._lock:
            return {
                "albums": len(self._albums),
                "images": sum(len(a.image_ids) for a in self._albums.values()),
                "bytes": self._nbytes,
            }

    def ping(self) -> bool:
        return True


# ---------------------------------------------------------------------- as a Ray actor
def get_album_store(actor_name: str, limits: StoreLimits, namespace: str = "clusterattack"):
    """The album store actor ``actor_name``, created (detached) when none is alive.

    ``max_restarts=-1`` brings a crashed store back at once, but empty (see the module
    docstring); the limits of a running store are the ones it was created with.
    """
    import ray

    return (
        ray.remote(AlbumStore)
        .options(
            name=actor_name,
            namespace=namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            num_cpus=0,
        )
        .remote(limits)
    )


def kill_album_store(actor_name: str, namespace: str = "clusterattack") -> bool:
    """Kill the store actor (its albums are lost); False when none was running."""
    import ray

    try:
        actor = ray.get_actor(actor_name, namespace=namespace)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True


class AsyncAlbumStore:
    """The replicas' awaitable view of the store actor; recreates it if it was killed for good."""

    def __init__(self, actor_name: str, limits: StoreLimits, namespace: str = "clusterattack") -> None:
        self._args = (actor_name, limits, namespace)
        self._actor = get_album_store(*self._args)
        # A store that outlived an earlier deploy takes the limits of this one (first call).
        self._configured = False

    async def call(self, method: str, *args: Any, attempts: int = 3) -> Any:
        from ray.exceptions import ActorUnavailableError, RayActorError

        for attempt in range(attempts):
            try:
                if not self._configured:
                    await self._actor.configure.remote(self._args[1])
                    self._configured = True
                return await getattr(self._actor, method).remote(*args)
            except ServingError as exc:
                raise unwrap_error(exc) from None
            except (RayActorError, ActorUnavailableError) as exc:
                logger.warning(
                    "album store call %s failed (%s), attempt %d of %d",
                    method, type(exc).__name__, attempt + 1, attempts,
                )
                await asyncio.sleep(0.2 * (attempt + 1))
                self._actor = get_album_store(*self._args)
        raise ServiceUnavailable(f"the album store is unavailable after {attempts} attempts")
