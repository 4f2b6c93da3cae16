"""Typed errors of the album service, subclasses of the serving errors so one handler renders all."""

from __future__ import annotations

from typing import Any

from clusterattack.serving.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    ServingError,
    error_from_payload,
)

__all__ = [
    "AlbumEmpty",
    "AlbumFull",
    "AlbumNotFound",
    "AlbumStoreFull",
    "TooManyAlbums",
    "album_error_from_payload",
]


class AlbumNotFound(NotFound):
    """No album with this token belongs to the key (HTTP 404).

    An album of another key answers the same as one that never existed, so a token
    cannot be probed for existence.
    """

    reason = "album_not_found"


class AlbumFull(PayloadTooLarge):
    """The images would take the album past its size limit; none was added (HTTP 413)."""

    reason = "album_full"


class AlbumEmpty(BadRequest):
    """Grouping was asked of an album that holds no image (HTTP 409)."""

    status_code = 409
    reason = "album_empty"


class TooManyAlbums(BadRequest):
    """The key already holds as many albums as it may; delete one first (HTTP 409)."""

    status_code = 409
    reason = "too_many_albums"


class AlbumStoreFull(ServiceUnavailable):
    """The service's album memory is full: not the client's fault, retry later (HTTP 503)."""

    reason = "album_store_full"


_ALBUM_ERRORS: dict[str, type[ServingError]] = {
    cls.__name__: cls for cls in (AlbumNotFound, AlbumFull, AlbumEmpty, TooManyAlbums, AlbumStoreFull)
}


def album_error_from_payload(status_code: int, payload: Any) -> ServingError:
    """The typed error of an HTTP answer: an album error by name, else the serving errors'."""
    if isinstance(payload, dict) and payload.get("error") in _ALBUM_ERRORS:
        return _ALBUM_ERRORS[payload["error"]](str(payload.get("detail", "")))
    return error_from_payload(status_code, payload)
