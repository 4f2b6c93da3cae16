"""Typed errors of the serving layer: one class per outcome, each with its HTTP status.

The same classes travel three ways: raised in a replica and rendered as a JSON body by
the HTTP ingress, raised through a Serve handle (Ray wraps them in ``RayTaskError``,
which stays an instance of the class), and rebuilt by the client from a JSON body with
:func:`error_from_payload`. Every error pickles by its keyword arguments, so Ray can ship
it between processes without losing ``remaining`` or ``retry_after_s``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "BadRequest",
    "BudgetExceeded",
    "Forbidden",
    "InvalidImages",
    "ModeMismatch",
    "NotFound",
    "PayloadTooLarge",
    "QueryBlocked",
    "QuotaExceeded",
    "RateLimited",
    "RequestConflict",
    "ServiceUnavailable",
    "ServingError",
    "Unauthorized",
    "UnsupportedMediaType",
    "error_from_payload",
    "unwrap_error",
]


class ServingError(Exception):
    """Base of every error the victim service raises on purpose."""

    status_code: int = 500
    reason: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def _fields(self) -> dict[str, Any]:
        """Keyword arguments beyond ``message`` that rebuild this error."""
        return {}

    def to_payload(self) -> dict[str, Any]:
        """JSON-safe body: the class name, the reason label, the message and the fields."""
        return {"error": type(self).__name__, "reason": self.reason, "detail": self.message, **self._fields()}

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers of the response that carries this error."""
        return {}

    def __reduce__(self):
        # Exception pickles by ``self.args`` alone, which would drop the typed fields.
        return (_rebuild, (type(self), self.message, self._fields()))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[ServingError], message: str, fields: dict[str, Any]) -> ServingError:
    return cls(message, **fields)


class Unauthorized(ServingError):
    """The API key is missing, unknown or revoked (HTTP 401)."""

    status_code = 401
    reason = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'ApiKey header="X-API-Key"'}


class Forbidden(ServingError):
    """The key is valid but its role may not do this (HTTP 403)."""

    status_code = 403
    reason = "forbidden"


class QueryBlocked(Forbidden):
    """The key was flagged by query detection and this deployment blocks (HTTP 403).

    Nothing of the request was charged; ``key_id`` names the blocked key. An admin clears
    the flag (``POST /admin/keys/{key_id}/detection/clear``).
    """

    reason = "query_detection"

    def __init__(self, message: str, *, key_id: str | None = None) -> None:
        super().__init__(message)
        self.key_id = key_id

    def _fields(self) -> dict[str, Any]:
        return {"key_id": self.key_id}


class NotFound(ServingError):
    """An admin operation named a key id that does not exist (HTTP 404)."""

    status_code = 404
    reason = "not_found"


class BadRequest(ServingError):
    """The request cannot be parsed (HTTP 400); subclasses narrow the status."""

    status_code = 400
    reason = "bad_request"


class RequestConflict(BadRequest):
    """A request id was reused for different images (HTTP 409)."""

    status_code = 409
    reason = "conflict"


class PayloadTooLarge(BadRequest):
    """The body or the number of images exceeds the configured limit (HTTP 413)."""

    status_code = 413
    reason = "too_large"


class UnsupportedMediaType(BadRequest):
    """The Content-Type is neither .npy nor JSON (HTTP 415)."""

    status_code = 415
    reason = "unsupported_media_type"


class InvalidImages(BadRequest):
    """The images parsed but have the wrong shape, dtype, range or contain NaN (HTTP 422)."""

    status_code = 422
    reason = "invalid_images"


class QuotaExceeded(ServingError):
    """Base of the two 429 outcomes; nothing of the request was charged."""

    status_code = 429
    reason = "quota"

    def __init__(
        self,
        message: str,
        *,
        requested: int,
        remaining: int,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.requested = int(requested)
        self.remaining = int(remaining)
        self.retry_after_s = None if retry_after_s is None else float(retry_after_s)

    def _fields(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "remaining": self.remaining,
            "retry_after_s": self.retry_after_s,
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        # Retry-After takes whole seconds; round up so a client that obeys it succeeds.
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class BudgetExceeded(QuotaExceeded):
    """The key's total image-query budget cannot cover the request (HTTP 429).

    ``remaining`` image-queries are left; ``retry_after_s`` is None because a budget
    refills only when an admin grants more.
    """

    reason = "budget"


class RateLimited(QuotaExceeded):
    """The key's token bucket holds fewer tokens than images requested (HTTP 429).

    ``retry_after_s`` is when enough tokens will have accumulated, or None when the
    request is larger than the bucket (burst) and can never pass: split it.
    """

    reason = "rate_limit"


class ServiceUnavailable(ServingError):
    """The service failed or is unreachable after the client's retries (HTTP 503)."""

    status_code = 503
    reason = "unavailable"


class ModeMismatch(ServingError):
    """Scores were asked of a victim served in ``labels`` mode (client side)."""

    status_code = 400
    reason = "mode"


_BY_NAME: dict[str, type[ServingError]] = {
    cls.__name__: cls
    for cls in (
        ServingError,
        Unauthorized,
        Forbidden,
        QueryBlocked,
        NotFound,
        BadRequest,
        RequestConflict,
        PayloadTooLarge,
        UnsupportedMediaType,
        InvalidImages,
        QuotaExceeded,
        BudgetExceeded,
        RateLimited,
        ServiceUnavailable,
        ModeMismatch,
    )
}

_BY_STATUS: dict[int, type[ServingError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: RequestConflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidImages,
    503: ServiceUnavailable,
}


def error_from_payload(status_code: int, payload: Any) -> ServingError:
    """Rebuild the typed error from an HTTP status and JSON body (ours or FastAPI's)."""
    if isinstance(payload, dict) and payload.get("error") in _BY_NAME:
        cls = _BY_NAME[payload["error"]]
        detail = str(payload.get("detail", ""))
        if issubclass(cls, QuotaExceeded):
            return cls(
                detail,
                requested=int(payload.get("requested", 0)),
                remaining=int(payload.get("remaining", 0)),
                retry_after_s=payload.get("retry_after_s"),
            )
        if cls is QueryBlocked:
            return cls(detail, key_id=payload.get("key_id"))
        return cls(detail)
    # FastAPI's own validation errors (admin bodies) use {"detail": [...]}.
    detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
    cls = _BY_STATUS.get(status_code, BadRequest if 400 <= status_code < 500 else ServingError)
    return cls(f"HTTP {status_code}: {detail}")


def unwrap_error(exc: BaseException) -> BaseException:
    """The plain serving error inside a ``RayTaskError``, or ``exc`` unchanged.

    Ray raises ``RayTaskError(BudgetExceeded)``, an instance of both classes whose text
    holds the remote traceback; callers want the error itself.
    """
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ServingError) and isinstance(cause, ServingError):
        return cause
    return exc
