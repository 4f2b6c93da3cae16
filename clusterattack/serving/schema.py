"""Request parsing and checking: ``.npy`` or JSON bodies in, checked float32 images out.

Nothing here unpickles: ``.npy`` headers are read with numpy's header parser (a literal
evaluator with a size cap), object dtypes are refused before any data is touched, and
the data is viewed in place with ``np.frombuffer`` after its length has been checked
against the header, so a lying header can neither allocate memory nor read past the body.
Every failure is a :class:`~clusterattack.serving.errors.BadRequest` subclass whose
message says what was wrong and what was expected.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tokenize
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.lib import format as npy_format

from clusterattack.serving.errors import (
    BadRequest,
    InvalidImages,
    PayloadTooLarge,
    UnsupportedMediaType,
)

NPY_MEDIA_TYPE = "application/x-npy"
NPY_MEDIA_TYPES = frozenset({NPY_MEDIA_TYPE, "application/npy", "application/octet-stream"})
JSON_MEDIA_TYPE = "application/json"
#: Header cap of numpy's own loader; a longer header is refused, not evaluated.
MAX_NPY_HEADER_BYTES = 10_000
_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# Failures numpy's header reader and json may raise on hostile input; none is a bug of ours.
_PARSE_ERRORS = (
    ValueError,
    TypeError,
    SyntaxError,
    RecursionError,
    MemoryError,
    OverflowError,
    EOFError,
    KeyError,
    IndexError,
    tokenize.TokenError,  # numpy tokenizes headers that look like Python 2's
)
# numpy warns on each Python-2-style header; from hostile bodies that would flood the logs.
warnings.filterwarnings("ignore", message=r"Reading `\.npy` or `\.npz` file required additional")


@dataclass(frozen=True)
class ImageSpec:
    """What a victim accepts: images of ``input_shape`` (C, H, W), at most ``max_images``
    per request, in a body of at most ``max_request_bytes``."""

    input_shape: tuple[int, int, int]
    max_images: int = 4096
    max_request_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        shape = tuple(self.input_shape)
        if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError(f"input_shape must be three positive ints (C, H, W), got {self.input_shape!r}")
        object.__setattr__(self, "input_shape", shape)
        if self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images!r}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes!r}")


def media_kind(content_type: str | None) -> Literal["npy", "json"]:
    """``npy`` or ``json`` from a Content-Type header (parameters ignored); 415 otherwise."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in NPY_MEDIA_TYPES:
        return "npy"
    if media == JSON_MEDIA_TYPE:
        return "json"
    raise UnsupportedMediaType(
        f"Content-Type {content_type!r} is not accepted; send {NPY_MEDIA_TYPE} "
        f"(np.save bytes) or {JSON_MEDIA_TYPE} ({{\"images\": nested lists}})"
    )


def _read_npy_header(buf: io.BytesIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(buf)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(buf, max_header_size=MAX_NPY_HEADER_BYTES)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(buf, max_header_size=MAX_NPY_HEADER_BYTES)
    raise BadRequest(f".npy format version {version} is not accepted; expected 1.0 or 2.0")


def parse_npy(body: bytes) -> np.ndarray:
    """The array in ``.npy`` bytes, viewed in place; never unpickles (see module docstring)."""
    if not body:
        raise BadRequest("empty body; expected the bytes of np.save(images)")
    buf = io.BytesIO(body)
    try:
        shape, fortran_order, dtype = _read_npy_header(buf)
    except BadRequest:
        raise
    except _PARSE_ERRORS as exc:
        raise BadRequest(f"body is not a valid .npy file ({type(exc).__name__}: {exc})") from None
    if dtype.hasobject:
        raise InvalidImages(
            f"object arrays (dtype {dtype}) are refused: no pickle is read from a request; "
            "send a float32 array"
        )
    if any(d < 0 for d in shape):
        raise BadRequest(f".npy header declares a negative dimension: shape {shape}")
    count = math.prod(shape)
    offset = buf.tell()
    expected = count * dtype.itemsize
    if len(body) - offset != expected:
        raise BadRequest(
            f".npy data is {len(body) - offset} bytes but its header (shape {shape}, "
            f"dtype {dtype}) needs {expected}"
        )
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran_order else "C")


def parse_json(body: bytes) -> np.ndarray:
    """The array of ``{"images": [[[[...]]]]}``: numbers only, any nesting numpy accepts."""
    try:
        payload = json.loads(body)
    except _PARSE_ERRORS as exc:
        raise BadRequest(f"body is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or set(payload) != {"images"}:
        got = sorted(payload)[:5] if isinstance(payload, dict) else type(payload).__name__
        raise BadRequest(f'JSON body must be an object with the single field "images", got {got}')
    images = payload["images"]
    if not isinstance(images, list):
        raise InvalidImages(f'"images" must be a nested list of numbers, got {type(images).__name__}')
    try:
        array = np.asarray(images)
    except _PARSE_ERRORS as exc:
        raise InvalidImages(
            f'"images" is not a rectangular nested list of numbers ({type(exc).__name__}: {exc})'
        ) from None
    if array.dtype.kind not in "iuf":
        raise InvalidImages(
            f'"images" must hold numbers only; found {_describe_kind(array.dtype)} values'
        )
    # JSON has no float/int distinction: 0 and 1 are valid pixel values here.
    return array.astype(np.float64, copy=False)


def _describe_kind(dtype: np.dtype) -> str:
    return {"b": "boolean", "U": "string", "S": "bytes", "O": "null, object or mixed"}.get(
        dtype.kind, str(dtype)
    )


def check_images(array: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """``array`` as C-contiguous float32 N x C x H x W in [0, 1]; InvalidImages otherwise."""
    if array.dtype.kind != "f":
        raise InvalidImages(
            f"images must be floating point (float16/32/64) in [0, 1], got dtype {array.dtype}"
            + ("; divide 8-bit images by 255" if array.dtype.kind in "iu" else "")
        )
    expected = "N x " + " x ".join(map(str, spec.input_shape))
    if array.ndim != 4 or tuple(array.shape[1:]) != spec.input_shape:
        raise InvalidImages(f"images must have shape {expected}, got {tuple(array.shape)}")
    n = array.shape[0]
    if n < 1:
        raise InvalidImages(f"a request needs at least one image of shape {expected}, got 0")
    if n > spec.max_images:
        raise PayloadTooLarge(
            f"{n} images in one request exceed the limit of {spec.max_images}; split the request"
        )
    finite = np.isfinite(array)
    if not finite.all():
        nan = int(np.isnan(array).sum())
        raise InvalidImages(
            f"images must be finite: found {nan} NaN and {int(finite.size - finite.sum()) - nan} "
            "infinite values"
        )
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise InvalidImages(f"pixel values must lie in [0, 1], got min {low:g} and max {high:g}")
    return np.ascontiguousarray(array, dtype=np.float32)


def parse_images(body: bytes, content_type: str | None, spec: ImageSpec) -> np.ndarray:
    """Checked float32 images from a request body of the given Content-Type."""
    if len(body) > spec.max_request_bytes:
        raise PayloadTooLarge(
            f"request body of {len(body)} bytes exceeds the limit of {spec.max_request_bytes}"
        )
    kind = media_kind(content_type)
    array = parse_npy(body) if kind == "npy" else parse_json(body)
    return check_images(array, spec)


async def read_body(request: Any, limit: int) -> bytes:
    """The body of a Starlette request, refused with 413 as soon as it passes ``limit`` bytes.

    The declared Content-Length is checked first and the stream is counted as it
    arrives, so a client that lies about the length cannot make the server buffer more.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(f"Content-Length must be a byte count, got {declared!r}")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_request_id(request_id: str | None) -> str | None:
    """A client's idempotency key: 1-128 characters of ``[A-Za-z0-9._:-]``."""
    if request_id is None:
        return None
    if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id):
        raise BadRequest(
            f"request id must be 1-128 characters of letters, digits and ._:- "
            f"starting with a letter or digit, got {request_id!r:.80}"
        )
    return request_id


def images_digest(images: np.ndarray) -> str:
    """SHA-256 of checked images (shape and float32 bytes): binds a request id to its images."""
    contiguous = np.ascontiguousarray(images, dtype=np.float32)
    digest = hashlib.sha256(repr(contiguous.shape).encode())
    digest.update(memoryview(contiguous).cast("B"))
    return digest.hexdigest()


def to_npy(array: np.ndarray) -> bytes:
    """``.npy`` bytes of a numeric array (never pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()
