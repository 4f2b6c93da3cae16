"""Fingerprints of queried images and their matching: the pure core of query detection.

Query-based attacks ask many near-identical images: a per-image attack iterates around one
image, finite differences ask x +- sigma u, a surrogate's online queries ask a perturbed copy
of an image it asked clean. Blacklight (Li et al., USENIX Security 2022) catches them by
fingerprinting every query and flagging a client whose queries match earlier ones; this
is that idea for this platform's keys (no code of the authors'). The served side, the
shared detector actor, the replicas' gate and the policies, is ``serving.detector``.

Fingerprint (:func:`fingerprints`): the image's pixels, flattened C x H x W, are rounded to
``levels`` grey levels (0 and 1 at level centres, so clipped noise on background or
saturated pixels changes nothing); every run of ``window_rows`` image rows of consecutive
quantised pixels (step ``stride``) is hashed with a keyed 64-bit hash whose key (``salt``)
is a secret of the deployment; runs with too little contrast (fewer than ``min_contrast``
of their pixels off their most common level: background, flat areas, the edge of a stroke,
which distinct images of a data set share) are skipped; the ``top_k`` largest distinct
hashes are the fingerprint. A window's hash depends on its content only, so a near copy
shares the hashes of every window the change left alone, and a shifted copy those of every
window that moved whole. Two image rows per window is what the calibration measured
(``benchmarks/query_detection.py --only calibrate``): one row or fewer pixels is a stroke's
cross-section that distinct digits share, three rows lose NES-noised copies.

Matching (:class:`FingerprintIndex`): a query matches when it shares at least
``max(min_shared, ceil(match_fraction * min(|a|, |b|)))`` hashes with one of the
``history`` most recent fingerprints of its scope (earlier images of the same request
included); only the ``postings`` most recent earlier holders of each hash are counted.

Memory bound: an index holds at most ``history`` fingerprints as two sorted arrays of
(hash, row) pairs plus two per-row arrays, ``history * (16 * top_k + 3)`` bytes
(:meth:`DetectionConfig.scope_bytes`, 0.5 MiB with the defaults) whatever is sent to it;
a batch briefly needs about twice that while it is merged in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

__all__ = [
    "POLICIES",
    "DetectionConfig",
    "FingerprintIndex",
    "FingerprintSpec",
    "MatchResult",
    "fingerprints",
    "quantise",
]

POLICIES = ("off", "flag", "block")

# splitmix64's finaliser constants: the keyed window hash is mixed by them.
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_GOLDEN = 0x9E3779B97F4A7C15


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
        maximum is not None and value > maximum
    ):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name} must be an integer >= {minimum}{upper}, got {value!r}")


def _check_fraction(name: str, value: Any, low_open: bool = True) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and (
        (0 < value <= 1) if low_open else (0 <= value < 1)
    )
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


@dataclass(frozen=True)
class FingerprintSpec:
    """How an image becomes a fingerprint (see the module docstring); ``salt`` is the secret key.

    ``window_rows`` sets the window to that many image rows of pixels (``window_rows * W``
    of the flattened C x H x W image); ``min_contrast`` is the share of a window's pixels
    that must differ from its most common level for the window to count.
    """

    levels: int = 4
    window_rows: int = 2
    min_contrast: float = 0.1
    stride: int = 1
    top_k: int = 20
    salt: int = 0

    def __post_init__(self) -> None:
        _check_int("levels", self.levels, 2, 255)
        _check_int("window_rows", self.window_rows, 1)
        _check_fraction("min_contrast", self.min_contrast, low_open=False)
        _check_int("stride", self.stride, 1)
        _check_int("top_k", self.top_k, 1)
        _check_int("salt", self.salt, 0, 2**64 - 1)

    def public(self) -> dict[str, Any]:
        """The parameters without the secret (what a record or a log may show)."""
        return {
            "levels": self.levels,
            "window_rows": self.window_rows,
            "min_contrast": self.min_contrast,
            "stride": self.stride,
            "top_k": self.top_k,
        }


@dataclass(frozen=True)
class DetectionConfig:
    """Detection at one deployment: its ``policy`` and the detector's parameters.

    The policy is the deployment's own. The other fields configure the detector actor
    shared by every deployment on the ledger; the first deployment to start it sets them
    (a later one with other values is told so in its log and uses the actor's).

    Defaults, measured by ``benchmarks/query_detection.py --only calibrate`` on 8x8 digits and
    28x28 MNIST (its ``calibration`` table): with 4 levels, windows of two image rows with
    at least 10% contrast and a match at 40% of the hashes, 77-83% of NES-noised copies
    (sigma 0.02), 80-97% of SPSA's (0.01), 95-98% of Square's patch updates and 97-100% of
    exact or 1-pixel-shifted repeats match their original, and at most 1 of 400 distinct
    test images matches another; 20 hashes are what an 8x8 image can fill. A higher
    contrast floor leaves thin strokes (MNIST's 1s) without any hash: 7.5% of MNIST at 0.25.

    A scope is flagged when ``flag_after`` of its last ``flag_window`` queries matched (25
    of 100): a rate, not a count, so an honest user who re-uses a tenth of their photos
    (10 in 100) is never flagged however long they stay, while NES, SPSA and Square match
    70-97% of their queries and cross it within their first ~60-180. A match is searched
    among the last ``history`` queries (1,600: 0.5 MiB of index per scope).
    """

    policy: str = "off"
    levels: int = 4
    window_rows: int = 2
    min_contrast: float = 0.1
    stride: int = 1
    top_k: int = 20
    match_fraction: float = 0.4
    min_shared: int = 3
    flag_after: int = 25
    flag_window: int = 100
    history: int = 1600
    postings: int = 4
    max_resident: int = 64

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"detection policy must be one of {POLICIES}, got {self.policy!r}")
        self.spec()  # validates the fingerprint fields
        _check_fraction("match_fraction", self.match_fraction)
        _check_int("min_shared", self.min_shared, 1)
        _check_int("flag_after", self.flag_after, 1)
        _check_int("flag_window", self.flag_window, 1)
        _check_int("history", self.history, 1)
        _check_int("postings", self.postings, 1)
        _check_int("max_resident", self.max_resident, 1)
        if not self.flag_after <= self.flag_window <= self.history:
            raise ValueError(
                f"need flag_after <= flag_window <= history (matches are counted among the last "
                f"flag_window queries, which the history keeps), got {self.flag_after}, "
                f"{self.flag_window}, {self.history}"
            )

    @property
    def enabled(self) -> bool:
        return self.policy != "off"

    def spec(self, salt: int = 0) -> FingerprintSpec:
        return FingerprintSpec(self.levels, self.window_rows, self.min_contrast, self.stride, self.top_k, salt)

    def scope_bytes(self) -> int:
        """The most one scope's index holds in memory, in bytes (the stated bound)."""
        return self.history * (16 * self.top_k + 3)

    def index(self) -> FingerprintIndex:
        """An empty index with these matching parameters."""
        return FingerprintIndex(
            self.history, postings=self.postings, match_fraction=self.match_fraction, min_shared=self.min_shared
        )

    def with_policy(self, policy: str) -> DetectionConfig:
        return replace(self, policy=policy)


# ---------------------------------------------------------------------- fingerprints
def _mix(h: np.ndarray) -> np.ndarray:
    h = (h ^ (h >> _S30)) * _MIX1
    h = (h ^ (h >> _S27)) * _MIX2
    return h ^ (h >> _S31)


def quantise(images: np.ndarray, levels: int) -> np.ndarray:
    """Images N x ... in [0, 1] as N x D level indices 0..levels-1 (0 and 1 at level centres)."""
    flat = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    return np.rint(np.clip(flat, 0.0, 1.0) * (levels - 1)).astype(np.uint8)


def fingerprints(images: np.ndarray, spec: FingerprintSpec) -> np.ndarray:
    """Fingerprints N x top_k (uint64, largest first; 0 pads an image with fewer distinct hashes).

    ``images``: N x C x H x W floats in [0, 1] (any N x ... x W works). See the module
    docstring for the recipe. Window hashes are polynomial hashes modulo 2^64 computed
    from prefix sums (O(pixels) per image whatever the window), keyed by the salt and
    mixed by splitmix64's finaliser.
    """
    images = np.asarray(images)
    n = len(images)
    if n == 0:
        return np.zeros((0, spec.top_k), np.uint64)
    bins = quantise(images, spec.levels)
    pixels = bins.shape[1]
    window = max(1, min(spec.window_rows * int(images.shape[-1]), pixels))
    # Pixels per level in every window, from prefix counts: the window's contrast.
    most_common = np.zeros((n, pixels - window + 1), np.int32)
    for level in range(spec.levels):
        count = np.zeros((n, pixels + 1), np.int32)
        np.cumsum(bins == level, axis=1, out=count[:, 1:])
        most_common = np.maximum(most_common, count[:, window:] - count[:, :-window])
    varied = window - most_common
    informative = (varied > 0) & (varied >= spec.min_contrast * window)
    # Prefix polynomial hash modulo 2^64 (uint64 arithmetic wraps): window = P[i+w] - P[i] B^w.
    mask64 = 2**64 - 1
    base_int = (((spec.salt * 2 + 1) ^ _GOLDEN) | 1) & mask64
    base = np.uint64(base_int)
    prefix = np.zeros((n, pixels + 1), np.uint64)
    symbols = bins.astype(np.uint64) + np.uint64(1)
    for i in range(pixels):
        prefix[:, i + 1] = prefix[:, i] * base + symbols[:, i]
    power = np.uint64(pow(base_int, window, 2**64))
    h = prefix[:, window:] - prefix[:, :-window] * power
    h = _mix(h ^ np.uint64(spec.salt))
    h[h == 0] = 1  # 0 marks "no hash"
    h[~informative] = 0
    h = h[:, :: spec.stride]
    # Distinct hashes, largest first: sort, blank repeats, sort again.
    ordered = np.sort(h, axis=1)[:, ::-1]
    repeat = np.zeros(ordered.shape, bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    ordered[repeat] = 0
    ordered = np.sort(ordered, axis=1)[:, ::-1][:, : spec.top_k]
    if ordered.shape[1] < spec.top_k:
        ordered = np.pad(ordered, ((0, 0), (0, spec.top_k - ordered.shape[1])))
    return np.ascontiguousarray(ordered)


# ---------------------------------------------------------------------- matching
@dataclass
class MatchResult:
    """Per query of a batch: did it match, the most hashes it shared, and with which row (-1: none)."""

    matched: np.ndarray
    shared: np.ndarray
    best_row: np.ndarray
    rows: np.ndarray


class FingerprintIndex:
    """The recent fingerprints of one scope and the matching of new ones against them.

    Rows are numbered from 0 in arrival order; the index keeps the last ``history`` of
    them as (hash, row) pairs sorted by hash then row, so the rows that share a hash with a
    new fingerprint are the ones just before it in the sorted order. Only the ``postings``
    most recent earlier rows of each hash are counted (a near copy's hashes point to its
    latest relatives, so detection needs no more; an attacker's thousand copies of one
    image then cost no more to match than a few). Memory: see ``DetectionConfig.scope_bytes``.
    """

    def __init__(
        self,
        history: int,
        *,
        postings: int = 4,
        match_fraction: float = 0.4,
        min_shared: int = 3,
    ) -> None:
        self.history = int(history)
        self.postings = int(postings)
        self.match_fraction = float(match_fraction)
        self.min_shared = int(min_shared)
        self.next_row = 0
        self._values = np.empty(0, np.uint64)
        self._rows = np.empty(0, np.int64)
        self._sizes = np.zeros(self.history, np.int16)
        self._matched = np.zeros(self.history, bool)
        self.window_matched = 0

    # ------------------------------------------------------------------ state
    @property
    def window_rows(self) -> int:
        return min(self.next_row, self.history)

    def nbytes(self) -> int:
        """Bytes of the arrays this index holds now."""
        return int(self._values.nbytes + self._rows.nbytes + self._sizes.nbytes + self._matched.nbytes)

    def recent(self, last: int, window: int) -> np.ndarray:
        """For each of the ``last`` newest rows, the matched rows among the ``window`` rows ending at it."""
        if last + window - 1 > self.history:
            raise ValueError(f"last + window - 1 must be <= history={self.history}, got {last} + {window} - 1")
        rows = np.arange(self.next_row - last - window + 1, self.next_row)
        kept = rows >= max(0, self.next_row - self.history)
        flags = np.where(kept, self._matched[rows % self.history], False)
        running = np.concatenate([[0], np.cumsum(flags)])
        return running[window:] - running[:-window] if len(rows) else np.zeros(0, np.int64)

    def _evict_before(self, row: int) -> None:
        """Drop every row < ``row`` (they left the window)."""
        if self._rows.size and self._rows.min() < row:
            keep = self._rows >= row
            self._values, self._rows = self._values[keep], self._rows[keep]
        start, stop = max(0, self.next_row - self.history), max(0, min(row, self.next_row))
        if stop > start:
            slots = np.arange(start, stop) % self.history
            self.window_matched -= int(self._matched[slots].sum())
            self._matched[slots] = False
            self._sizes[slots] = 0

    def load(self, first_row: int, fps: np.ndarray, matched: np.ndarray) -> None:
        """Rebuild from stored rows ``first_row, first_row + 1, ...`` (no matching)."""
        fps = np.asarray(fps, np.uint64)
        matched = np.asarray(matched, bool)
        n = len(fps)
        if n > self.history:
            fps, matched, first_row = fps[-self.history :], matched[-self.history :], first_row + n - self.history
            n = self.history
        rows = first_row + np.arange(n)
        mask = fps != 0
        values = fps[mask]
        owners = np.repeat(rows, mask.sum(1))
        order = np.lexsort((owners, values))
        self._values, self._rows = values[order], owners[order]
        self.next_row = first_row + n
        self._sizes[:] = 0
        self._matched[:] = False
        slots = rows % self.history
        self._sizes[slots] = mask.sum(1)
        self._matched[slots] = matched
        self.window_matched = int(matched.sum())

    # ------------------------------------------------------------------ matching
    def match(self, fps: np.ndarray, *, add: bool = True) -> MatchResult:
        """Match each fingerprint (N x top_k) against the window and the earlier ones of the batch.

        With ``add`` the batch joins the index (evicting what leaves the window); without it
        the index is unchanged.
        """
        fps = np.asarray(fps, np.uint64)
        if fps.ndim != 2:
            raise ValueError(f"fingerprints must be N x top_k, got shape {fps.shape}")
        if len(fps) > self.history:
            if not add:
                raise ValueError(f"match without add takes at most history={self.history} fingerprints")
            parts = [self.match(fps[i : i + self.history]) for i in range(0, len(fps), self.history)]
            return MatchResult(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("matched", "shared", "best_row", "rows")))
        n = len(fps)
        first = self.next_row
        rows_new = first + np.arange(n, dtype=np.int64)
        mask = fps != 0
        lens = mask.sum(1)
        if add:
            # The window of the batch's last query: rows >= first + n - history.
            self._evict_before(first + n - self.history)
            values_old, rows_old = self._values, self._rows
        else:
            lo = first + n - self.history
            keep = self._rows >= lo
            values_old, rows_old = self._values[keep], self._rows[keep]
        qv = fps[mask]
        qr = np.repeat(rows_new, lens)
        order = np.lexsort((qr, qv))
        qv, qr = qv[order], qr[order]
        pos = np.searchsorted(values_old, qv, side="right")
        values = np.insert(values_old, pos, qv)
        rows = np.insert(rows_old, pos, qr)
        at = pos + np.arange(len(qv))
        pairs_q, pairs_r = [], []
        for d in range(1, self.postings + 1):
            prev = at - d
            ok = prev >= 0
            ok[ok] = values[prev[ok]] == qv[ok]
            pairs_q.append(qr[ok])
            pairs_r.append(rows[prev[ok]])
        pq = np.concatenate(pairs_q) - first
        pr = np.concatenate(pairs_r)
        matched = np.zeros(n, bool)
        shared = np.zeros(n, np.int64)
        best_row = np.full(n, -1, np.int64)
        if pq.size:
            lo = int(pr.min())
            span = first + n - lo
            combined, counts = np.unique(pq * span + (pr - lo), return_counts=True)
            q, r = combined // span, combined % span + lo
            size_r = np.where(r >= first, lens[np.clip(r - first, 0, n - 1)], self._sizes[r % self.history])
            need = np.maximum(self.min_shared, np.ceil(self.match_fraction * np.minimum(lens[q], size_r)))
            ok = counts >= need
            np.maximum.at(shared, q, counts)
            # Best row per query among the matching pairs: most shared, then most recent.
            hit = np.lexsort((r[ok], counts[ok], q[ok]))
            qs, rs = q[ok][hit], r[ok][hit]
            last = np.ones(len(qs), bool)
            last[:-1] = qs[1:] != qs[:-1]
            matched[qs[last]] = True
            best_row[qs[last]] = rs[last]
        if add:
            self._values, self._rows = values, rows
            slots = rows_new % self.history
            self._sizes[slots] = lens
            self._matched[slots] = matched
            self.window_matched += int(matched.sum())
            self.next_row = first + n
        return MatchResult(matched, shared, best_row, rows_new)


