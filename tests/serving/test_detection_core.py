"""Query detection without Ray: fingerprints, their matching, the detector's state and its bounds."""

from __future__ import annotations

import numpy as np
import pytest

from clusterattack.serving.detection import (
    DetectionConfig,
    FingerprintIndex,
    FingerprintSpec,
    fingerprints,
)
from clusterattack.serving.detector import QueryDetector, detector_db_path
from clusterattack.serving.errors import Unauthorized
from clusterattack.serving.ledger import BudgetLedger
from clusterattack.serving.ledger_records import hash_api_key

SPEC = FingerprintSpec(salt=12345)


def strokes(n: int, size: int = 28, seed: int = 0) -> np.ndarray:
    """n images N x 1 x size x size of three random anti-aliased strokes each: digit-like, all distinct."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        for _ in range(3):
            (y0, x0), (y1, x1) = rng.uniform(2, size - 2, (2, 2))
            while np.hypot(y1 - y0, x1 - x0) < size / 3:
                (y0, x0), (y1, x1) = rng.uniform(2, size - 2, (2, 2))
            t = np.clip(((yy - y0) * (y1 - y0) + (xx - x0) * (x1 - x0)) / ((y1 - y0) ** 2 + (x1 - x0) ** 2 + 1e-6), 0, 1)
            dist = np.hypot(yy - (y0 + t * (y1 - y0)), xx - (x0 + t * (x1 - x0)))
            out[i, 0] = np.maximum(out[i, 0], np.clip(2.5 - dist * 28 / size, 0, 1))
    return out


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return strokes(120)


def noisy(x: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    return np.clip(x + sigma * np.random.default_rng(seed).standard_normal(x.shape), 0, 1).astype(np.float32)


def test_fingerprints_are_deterministic_sized_and_keyed(images):
    a = fingerprints(images, SPEC)
    assert a.shape == (120, SPEC.top_k) and a.dtype == np.uint64
    assert np.array_equal(a, fingerprints(images.copy(), SPEC))
    assert ((a != 0).sum(1) >= SPEC.top_k // 2).all()  # stroke images fill most of a fingerprint
    # Distinct and largest first, zeros (no hash) last.
    for row in a:
        kept = row[row != 0]
        assert len(set(kept.tolist())) == len(kept) and (np.diff(kept.astype(np.float64)) <= 0).all()
    other_salt = fingerprints(images, FingerprintSpec(salt=999))
    assert not np.intersect1d(a[a != 0], other_salt[other_salt != 0]).size
    assert fingerprints(np.zeros((2, 1, 28, 28), np.float32), SPEC).max() == 0  # nothing to hash in a blank


def test_exact_and_near_repeats_match_and_distinct_images_do_not(images):
    index = FingerprintIndex(4096)
    first = index.match(fingerprints(images, SPEC))
    assert not first.matched.any()  # 120 distinct stroke images: no false match
    for name, repeat in {
        "exact": images[:40],
        "noise sigma 0.02 (NES)": noisy(images[:40], 0.02),
        "shifted by one pixel": np.roll(images[:40], 1, axis=3),
    }.items():
        again = index.match(fingerprints(repeat, SPEC), add=False)
        assert again.matched.mean() >= 0.75, name
        assert (again.best_row[again.matched] == np.arange(40)[again.matched]).all(), name
    unrelated = index.match(fingerprints(strokes(40, seed=7), SPEC), add=False)
    assert not unrelated.matched.any()


def test_matches_within_one_batch_and_window_eviction(images):
    index = FingerprintIndex(50)
    batch = np.concatenate([images[:1], images[:1], images[1:2]])
    result = index.match(fingerprints(batch, SPEC))
    assert result.matched.tolist() == [False, True, False] and result.best_row[1] == 0
    index.match(fingerprints(images[2:60], SPEC))  # pushes rows 0-10 out of the 50-row window
    assert index.window_rows == 50 and index.next_row == 61
    gone = index.match(fingerprints(images[:1], SPEC), add=False)
    assert not gone.matched.any()
    kept = index.match(fingerprints(images[30:31], SPEC), add=False)
    assert kept.matched.all()


def test_a_hostile_scope_cannot_grow_the_index_past_its_bound(images):
    cfg = DetectionConfig(history=64, flag_window=16, flag_after=5, top_k=20)
    index = cfg.index()
    rng = np.random.default_rng(0)
    for step in range(40):  # 40 x 64 = 2,560 queries, 40 windows' worth, many near-identical
        x = np.clip(images[rng.integers(0, 120, 64)] + 0.01 * rng.standard_normal((64, 1, 28, 28)), 0, 1)
        index.match(fingerprints(x.astype(np.float32), SPEC))
        assert index.nbytes() <= cfg.scope_bytes(), step
        assert index.window_rows <= cfg.history
    assert 0 <= index.window_matched <= cfg.history


def test_config_is_validated():
    with pytest.raises(ValueError, match="policy must be one of"):
        DetectionConfig(policy="ban")
    with pytest.raises(ValueError, match="match_fraction must lie in"):
        DetectionConfig(match_fraction=0)
    with pytest.raises(ValueError, match="need flag_after <= flag_window <= history"):
        DetectionConfig(flag_after=10, flag_window=8)
    with pytest.raises(ValueError, match="need flag_after <= flag_window <= history"):
        DetectionConfig(flag_window=200, history=100)
    with pytest.raises(ValueError, match="levels must be an integer >= 2"):
        FingerprintSpec(levels=1)


# ---------------------------------------------------------------------- the detector (no Ray)
@pytest.fixture
def ledger(tmp_path):
    led = BudgetLedger(tmp_path / "ledger.sqlite")
    yield led
    led.close()


def make_detector(ledger, **changes) -> QueryDetector:
    cfg = DetectionConfig(**{"flag_after": 5, "history": 300, **changes})
    return QueryDetector(detector_db_path(ledger.db_path()), ledger.db_path(), cfg)


def test_detector_flags_blocks_replays_and_survives_a_restart(ledger, images):
    key = ledger.create_key("attacker", budget=10_000)
    key_hash = hash_api_key(key.api_key)
    detector = make_detector(ledger)
    spec = detector.fingerprint_spec()
    clean = detector.screen(key_hash, "r1", fingerprints(images[:60], spec), "block")
    assert clean.matched == 0 and not clean.flagged and not clean.blocked
    near = detector.screen(key_hash, "r2", fingerprints(noisy(images[:8], 0.01), spec), "block")
    assert near.matched >= 6 and near.newly_flagged and near.blocked and "flag_after=5" in near.reason
    # A retry with the same request id is its first verdict, not a second set of matches.
    retry = detector.screen(key_hash, "r2", fingerprints(noisy(images[:8], 0.01), spec), "block")
    assert retry.replayed and retry.blocked and detector.key_status(key.key_id).queries == 68
    # Flagged and blocking: refused unrecorded; under "flag" recorded and let through.
    assert detector.screen(key_hash, "r3", fingerprints(images[60:70], spec), "block").blocked
    assert detector.key_status(key.key_id).queries == 68
    passed = detector.screen(key_hash, "r4", fingerprints(images[60:70], spec), "flag")
    assert passed.flagged and not passed.blocked
    status = detector.key_status(key.key_id)
    assert status.flagged and status.queries == 78 and status.first_match_query == 61
    assert 60 < status.flag_query <= 68
    detector.close()

    restarted = make_detector(ledger)
    assert restarted.fingerprint_spec() == spec  # the salt persists
    assert restarted.key_status(key.key_id) == status
    # The history came back too: a repeat of an image asked before the restart still matches.
    assert restarted.screen(key_hash, "r5", fingerprints(images[:3], spec), "flag").matched == 3
    cleared = restarted.clear(key.key_id)
    assert not cleared.flagged and cleared.recent_matched == 0
    assert restarted.screen(key_hash, "r6", fingerprints(images[:3], spec), "block").matched == 0
    restarted.close()


def test_keys_of_one_owner_share_a_history_and_a_flag(ledger, images):
    detector = make_detector(ledger)
    spec = detector.fingerprint_spec()
    a, b, c = (ledger.create_key(n, budget=1000) for n in "abc")
    for key in (a, b):
        detector.set_owner(key.key_id, "acme")
    detector.screen(hash_api_key(a.api_key), "a1", fingerprints(images[:10], spec), "flag")
    # Spreading near copies over a second key of the same owner still matches...
    shared = detector.screen(hash_api_key(b.api_key), "b1", fingerprints(images[:10], spec), "flag")
    assert shared.matched == 10 and shared.flagged
    assert detector.key_status(a.key_id).flagged and detector.key_status(a.key_id).scope == "owner:acme"
    # ...a key of no owner has a history of its own.
    assert detector.screen(hash_api_key(c.api_key), "c1", fingerprints(images[:10], spec), "flag").matched == 0
    listed = detector.list_keys()
    assert [s.key_id for s in listed[:2]] == [a.key_id, b.key_id] and not listed[2].flagged
    assert [s.key_id for s in detector.list_keys(flagged_only=True)] == [a.key_id, b.key_id]
    detector.close()


def test_unknown_keys_are_refused_and_resident_memory_is_bounded(ledger, images):
    detector = make_detector(ledger, history=32, flag_window=16, max_resident=3)
    spec = detector.fingerprint_spec()
    with pytest.raises(Unauthorized):
        detector.screen(hash_api_key("ca_not-a-key-at-all"), "x", fingerprints(images[:1], spec), "flag")
    keys = [ledger.create_key(f"k{i}", budget=1000) for i in range(6)]
    for round_ in range(3):
        for i, key in enumerate(keys):
            detector.screen(hash_api_key(key.api_key), f"{i}-{round_}", fingerprints(images[:40], spec), "flag")
            assert len(detector.resident_scopes()) <= 3
            assert detector.resident_bytes() <= 3 * detector.config.scope_bytes()
    # A scope read back from disk after leaving memory matches as before.
    again = detector.screen(hash_api_key(keys[0].api_key), "again", fingerprints(images[39:40], spec), "flag")
    assert again.matched == 1
    detector.close()


def test_a_key_is_flagged_by_its_rate_of_matches_not_their_count(ledger):
    detector = make_detector(ledger, flag_after=25, flag_window=100, history=1000)
    spec = detector.fingerprint_spec()
    honest = ledger.create_key("re-uses a tenth of its photos", budget=10**6)
    photos = strokes(900, seed=3)
    sent: list[np.ndarray] = []
    for i in range(900):  # 1,000 queries, one in ten a photo sent before: 100 matches in all
        batch = [photos[i]] + ([sent[i // 2]] if i % 9 == 8 else [])
        sent += batch[:1]
        detector.screen(hash_api_key(honest.api_key), f"h{i}", fingerprints(np.stack(batch), spec), "block")
    status = detector.key_status(honest.key_id)
    assert status.queries == 1000 and 100 <= status.matched <= 110 and not status.flagged  # a few stroke look-alikes
    # The same number of matches in a burst is an attack's rate.
    burst = detector.screen(hash_api_key(honest.api_key), "burst", fingerprints(photos[850:880], spec), "block")
    assert burst.newly_flagged and burst.blocked and 1000 < detector.key_status(honest.key_id).flag_query <= 1025
    detector.close()
