"""The album store on its own: ownership, limits, idempotent adds, grouping coverage, expiry."""

from __future__ import annotations

import numpy as np
import pytest

from clusterattack.api.errors import (
    AlbumEmpty,
    AlbumFull,
    AlbumNotFound,
    AlbumStoreFull,
    TooManyAlbums,
)
from clusterattack.api.store import AlbumStore, StoreLimits
from clusterattack.serving.errors import BadRequest, ServingError


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def labels(n: int, start: int = 0) -> np.ndarray:
    return (np.arange(start, start + n) % 3).astype(np.int64)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock) -> AlbumStore:
    return AlbumStore(StoreLimits(max_images_per_album=10, max_albums_per_key=2, album_ttl_s=60), clock=clock)


def test_album_lifecycle_create_add_group_detail_delete(store):
    token = store.create("key_a", "holiday")["album_token"]
    assert token.startswith("alb_")
    first = store.add("key_a", token, labels(4), "r1")
    second = store.add("key_a", token, labels(2, 4), "r2")
    assert first["image_count"] == 4 and second["image_count"] == 6
    ids = first["image_ids"] + second["image_ids"]
    assert len(set(ids)) == 6
    before = store.detail("key_a", token)
    assert [row["group_id"] for row in before["images"]] == [None] * 6 and before["group_count"] == 0
    np.testing.assert_array_equal(store.records("key_a", token), np.concatenate([labels(4), labels(2, 4)]))
    summary = store.set_groups("key_a", token, np.array([0, 1, 2, 0, 1, 2]))
    assert summary["group_count"] == 3 and summary["grouped_image_count"] == 6
    detail = store.detail("key_a", token)
    assert [row["image_id"] for row in detail["images"]] == ids
    assert [row["group_id"] for row in detail["images"]] == [0, 1, 2, 0, 1, 2]
    assert detail["name"] == "holiday" and isinstance(detail["created_at"], int)
    store.delete("key_a", token)
    with pytest.raises(AlbumNotFound):
        store.detail("key_a", token)
    assert store.stats() == {"albums": 0, "images": 0, "bytes": 0}


def test_images_added_after_a_grouping_stay_ungrouped_until_the_next(store):
    token = store.create("key_a")["album_token"]
    store.add("key_a", token, labels(3), "r1")
    store.set_groups("key_a", token, np.array([0, 0, 1]))
    store.add("key_a", token, labels(2), "r2")
    groups = [row["group_id"] for row in store.detail("key_a", token)["images"]]
    assert groups == [0, 0, 1, None, None]


def test_another_keys_album_answers_as_if_it_did_not_exist(store):
    token = store.create("key_a")["album_token"]
    store.add("key_a", token, labels(2), "r1")
    for call in (
        lambda: store.detail("key_b", token),
        lambda: store.add("key_b", token, labels(1), "r9"),
        lambda: store.records("key_b", token),
        lambda: store.check_room("key_b", token, 1),
        lambda: store.delete("key_b", token),
        lambda: store.detail("key_a", "alb_no-such-album"),
    ):
        with pytest.raises(AlbumNotFound, match="no album"):
            call()
    assert store.list_albums("key_b") == []
    assert store.detail("key_a", token)["image_count"] == 2


def test_an_add_repeated_with_its_request_id_returns_the_first_ids_and_adds_nothing(store):
    token = store.create("key_a")["album_token"]
    first = store.add("key_a", token, labels(3), "same")
    again = store.add("key_a", token, labels(3), "same")
    assert again == first
    assert store.find_request("key_a", token, "same") == first
    assert store.find_request("key_a", token, "other") is None
    assert store.detail("key_a", token)["image_count"] == 3


def test_size_limits_refuse_whole_requests(store):
    token = store.create("key_a")["album_token"]
    store.add("key_a", token, labels(8), "r1")
    with pytest.raises(AlbumFull, match="holds 8 images; adding 3 would pass its limit of 10"):
        store.check_room("key_a", token, 3)
    with pytest.raises(AlbumFull):
        store.add("key_a", token, labels(3), "r2")
    assert store.detail("key_a", token)["image_count"] == 8
    store.create("key_a")
    with pytest.raises(TooManyAlbums, match="holds 2 albums, the limit is 2"):
        store.create("key_a")
    assert store.create("key_b")["album_token"]  # the limit is per key


def test_grouping_an_empty_album_is_refused(store):
    token = store.create("key_a")["album_token"]
    with pytest.raises(AlbumEmpty, match="holds no images"):
        store.records("key_a", token)


def test_create_with_a_request_id_is_idempotent_and_names_are_checked(store):
    first = store.create("key_a", request_id="c1")
    assert store.create("key_a", request_id="c1") == first
    assert len(store.list_albums("key_a")) == 1
    with pytest.raises(BadRequest, match="at most 64 characters"):
        store.create("key_a", "x" * 65)


def test_idle_albums_expire(store, clock):
    token = store.create("key_a")["album_token"]
    clock.now += 30
    store.detail("key_a", token)  # a request keeps it alive
    clock.now += 59
    assert store.reap() == 0
    clock.now += 2
    assert store.reap() == 1
    with pytest.raises(AlbumNotFound):
        store.detail("key_a", token)


def test_the_byte_cap_bounds_memory_and_configure_changes_limits(clock):
    store = AlbumStore(StoreLimits(max_store_bytes=2_000), clock=clock)
    token = store.create("key_a")["album_token"]
    store.add("key_a", token, np.zeros((4, 16), np.float32), "r1")  # 4 x (64 + 96) bytes
    with pytest.raises(AlbumStoreFull, match="cannot take"):
        store.add("key_a", token, np.zeros((16, 16), np.float32), "r2")
    assert store.stats()["bytes"] == 640
    with pytest.raises(ServingError, match=r"holds records of float32 \(16,\), got float32 \(8,\): the service's model changed") as info:
        store.add("key_a", token, np.zeros((1, 8), np.float32), "r3")
    assert info.type is ServingError  # a server fault (500), not one of the client's 4xx subclasses
    store.configure(StoreLimits(max_store_bytes=10_000))
    store.add("key_a", token, np.zeros((16, 16), np.float32), "r2")
    assert store.detail("key_a", token)["image_count"] == 20


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_images_per_album", 0), ("max_albums_per_key", -1), ("max_store_bytes", 1.5), ("album_ttl_s", 0)],
)
def test_store_limits_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        StoreLimits(**{field: value})
