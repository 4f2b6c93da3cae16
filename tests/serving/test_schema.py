"""Request parsing without a server: every malformed body is a 4xx error naming the fault."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterattack.serving import schema
from clusterattack.serving.errors import (
    BadRequest,
    InvalidImages,
    PayloadTooLarge,
    UnsupportedMediaType,
)

SPEC = schema.ImageSpec((1, 4, 4), max_images=8, max_request_bytes=64 * 1024)
NPY = "application/x-npy"
JSON = "application/json"


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def good_images(n: int = 3, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 4, 4)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ">f4"])
def test_valid_npy_round_trips_as_float32(dtype):
    images = good_images(dtype=dtype)
    out = schema.parse_images(npy_bytes(images), NPY, SPEC)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, images.astype(np.float32))


def test_fortran_order_and_json_give_the_same_images():
    images = good_images()
    fortran = schema.parse_images(npy_bytes(np.asfortranarray(images)), NPY, SPEC)
    from_json = schema.parse_images(json.dumps({"images": images.tolist()}).encode(), JSON, SPEC)
    np.testing.assert_array_equal(fortran, images)
    np.testing.assert_array_equal(from_json, images)
    assert schema.images_digest(fortran) == schema.images_digest(from_json)


class _Trap:
    triggered = False

    def __reduce__(self):
        return (_spring, ())


def _spring():
    _Trap.triggered = True
    return 0


def test_pickled_object_arrays_are_refused_without_unpickling():
    body = npy_bytes(np.array([_Trap()], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidImages, match="no pickle") as info:
        schema.parse_images(body, NPY, SPEC)
    assert info.value.status_code == 422
    assert _Trap.triggered is False
    raw_pickle = b"\x80\x04\x95" + bytes(40)
    with pytest.raises(BadRequest, match="not a valid .npy"):
        schema.parse_images(raw_pickle, NPY, SPEC)


def test_a_header_that_lies_about_the_shape_allocates_nothing():
    header = npy_bytes(good_images(1))
    lying = header.replace(b"(1, 1, 4, 4)", b"(10000000000, 1, 4, 4)")
    with pytest.raises(BadRequest, match="needs 640000000000"):
        schema.parse_npy(lying)


@pytest.mark.parametrize(
    "array, error, match",
    [
        (good_images().astype(np.uint8), InvalidImages, "divide 8-bit images by 255"),
        (good_images().astype(np.int64), InvalidImages, "floating point"),
        (good_images()[:, :, :3], InvalidImages, r"N x 1 x 4 x 4, got \(3, 1, 3, 4\)"),
        (good_images()[0], InvalidImages, r"got \(1, 4, 4\)"),
        (np.zeros((0, 1, 4, 4), np.float32), InvalidImages, "at least one image"),
        (good_images(9), PayloadTooLarge, "9 images in one request exceed the limit of 8"),
        (np.full((2, 1, 4, 4), np.nan, np.float32), InvalidImages, "32 NaN"),
        (np.full((2, 1, 4, 4), np.inf, np.float32), InvalidImages, "32 infinite"),
        (good_images() * 2, InvalidImages, r"\[0, 1\], got min .* max 1\.9"),
        (good_images() - 0.5, InvalidImages, "min -0.4"),
        (np.zeros((2, 1, 4, 4), np.complex64), InvalidImages, "complex64"),
        (np.zeros((2, 1, 4, 4), [("a", "f4")]), InvalidImages, "floating point"),
    ],
)
def test_bad_arrays_name_what_is_wrong(array, error, match):
    with pytest.raises(error, match=match) as info:
        schema.parse_images(npy_bytes(array), NPY, SPEC)
    assert 400 <= info.value.status_code < 500


@pytest.mark.parametrize(
    "body, error, match",
    [
        (b"", BadRequest, "not valid JSON"),
        (b"{", BadRequest, "not valid JSON"),
        (b"[1, 2]", BadRequest, 'single field "images"'),
        (b'{"images": [], "extra": 1}', BadRequest, "extra"),
        (b'{"images": "abc"}', InvalidImages, "nested list"),
        (b'{"images": [[[[0.1, "a"]]]]}', InvalidImages, "string"),
        (b'{"images": [[[[0.1, null]]]]}', InvalidImages, "null"),
        (b'{"images": [[[[true]]]]}', InvalidImages, "boolean"),
        (b'{"images": [[[[0.1], [0.1, 0.2]]]]}', InvalidImages, "rectangular"),
        (b'{"images": [[[[NaN]]]]}', InvalidImages, r"shape|NaN"),
        (b'{"images": [[[[1e400]]]]}', InvalidImages, r"shape|infinite"),
        (b'{"images": [[[[' + b"9" * 400 + b"]]]]}", InvalidImages, "null, object"),
        (b"[" * 30_000 + b"]" * 30_000, BadRequest, "not valid JSON"),
        (b"\xff\xfe garbage", BadRequest, "not valid JSON"),
    ],
)
def test_bad_json_names_what_is_wrong(body, error, match):
    with pytest.raises(error, match=match):
        schema.parse_images(body, JSON, SPEC)


def test_media_type_size_and_request_id_checks():
    with pytest.raises(UnsupportedMediaType, match="text/plain"):
        schema.parse_images(b"x", "text/plain", SPEC)
    with pytest.raises(UnsupportedMediaType):
        schema.parse_images(b"x", None, SPEC)
    assert schema.media_kind("Application/JSON; charset=utf-8") == "json"
    with pytest.raises(PayloadTooLarge, match="65537 bytes exceeds the limit of 65536"):
        schema.parse_images(b"0" * (64 * 1024 + 1), NPY, SPEC)
    assert schema.check_request_id("abc-1.2:3") == "abc-1.2:3"
    for bad in ("", "-x", "a" * 129, "a b", "é"):
        with pytest.raises(BadRequest, match="request id"):
            schema.check_request_id(bad)


def test_image_spec_rejects_bad_limits():
    with pytest.raises(ValueError, match="input_shape"):
        schema.ImageSpec((1, 4))
    with pytest.raises(ValueError, match="max_images"):
        schema.ImageSpec((1, 4, 4), max_images=0)


def _corrupt(data: st.DataObject, body: bytes) -> bytes:
    """Flip, cut or splice bytes of a valid body (headers included)."""
    action = data.draw(st.sampled_from(["flip", "truncate", "append", "splice"]))
    if action == "truncate":
        return body[: data.draw(st.integers(0, len(body) - 1))]
    if action == "append":
        return body + data.draw(st.binary(min_size=1, max_size=64))
    position = data.draw(st.integers(0, len(body) - 1))
    if action == "flip":
        return body[:position] + bytes([body[position] ^ data.draw(st.integers(1, 255))]) + body[position + 1 :]
    return body[:position] + data.draw(st.binary(max_size=64)) + body[position:]


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_corrupted_or_random_body_is_a_4xx_or_valid_images(data):
    kind = data.draw(st.sampled_from([NPY, JSON]))
    images = good_images(data.draw(st.integers(1, 3)))
    valid = npy_bytes(images) if kind == NPY else json.dumps({"images": images.tolist()}).encode()
    body = data.draw(st.one_of(st.binary(max_size=512), st.just(valid).map(lambda b: _corrupt(data, b))))
    try:
        out = schema.parse_images(body, kind, SPEC)
    except BadRequest as exc:
        assert 400 <= exc.status_code < 500 and exc.message
    else:
        assert out.dtype == np.float32 and out.shape[1:] == (1, 4, 4)
        assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=3),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(value=json_values, wrap=st.booleans())
def test_any_json_value_is_a_4xx_or_valid_images(value, wrap):
    body = json.dumps({"images": value} if wrap else value).encode()
    try:
        out = schema.parse_images(body, JSON, SPEC)
    except BadRequest as exc:
        assert 400 <= exc.status_code < 500
    else:
        assert out.ndim == 4 and np.isfinite(out).all()
