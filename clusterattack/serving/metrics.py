"""Serving metrics through Ray's metrics API, so Prometheus scrapes them with Ray's own.

Ray exports each metric with a ``ray_`` prefix on every node's metrics port. Replicas
count what they serve, reject and screen; the ledger actor publishes the budget left per
key, the query detector the matches and flags per key.
Tags carry key ids, never the keys themselves.
"""

from __future__ import annotations

import threading
from functools import lru_cache

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]

_lock = threading.Lock()


class ServingMetrics:
    """The counters and histogram of one replica, tagged with its application and mode."""

    def __init__(self, app: str, mode: str) -> None:
        self._tags = {"app": app, "mode": mode}
        self.images_served = Counter(
            "clusterattack_serve_images_served",
            description="Image-queries answered and charged to a budget.",
            tag_keys=("app", "mode"),
        )
        self.requests_served = Counter(
            "clusterattack_serve_requests_served",
            description="Requests answered (a request holds one or more images).",
            tag_keys=("app", "mode"),
        )
        self.requests_rejected = Counter(
            "clusterattack_serve_requests_rejected",
            description="Requests refused, by reason: budget, rate_limit, unauthorized, "
            "invalid_images, too_large, ...",
            tag_keys=("app", "mode", "reason"),
        )
        self.images_rejected = Counter(
            "clusterattack_serve_images_rejected",
            description="Images in requests refused for budget or rate limit.",
            tag_keys=("app", "mode", "reason"),
        )
        self.latency_s = Histogram(
            "clusterattack_serve_request_latency_s",
            description="Seconds from a request's arrival at the replica to its answer.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("app", "mode", "endpoint"),
        )

    def served(self, images: int, latency_s: float, endpoint: str) -> None:
        # Ray's Counter refuses inc(0); requests that carry no image (album reads) are served too.
        if images:
            self.images_served.inc(images, tags=self._tags)
        self.requests_served.inc(1, tags=self._tags)
        self.latency_s.observe(latency_s, tags={**self._tags, "endpoint": endpoint})

    def rejected(self, reason: str, latency_s: float, endpoint: str, images: int = 0) -> None:
        tags = {**self._tags, "reason": reason}
        self.requests_rejected.inc(1, tags=tags)
        if images:
            self.images_rejected.inc(images, tags=tags)
        self.latency_s.observe(latency_s, tags={**self._tags, "endpoint": endpoint})


@lru_cache(maxsize=1)
def _budget_gauges() -> tuple[Gauge, Gauge]:
    tag_keys = ("key_id", "key_name")
    remaining = Gauge(
        "clusterattack_budget_remaining",
        description="Image-queries left in the budget of an API key.",
        tag_keys=tag_keys,
    )
    used = Gauge(
        "clusterattack_budget_used",
        description="Image-queries charged to an API key.",
        tag_keys=tag_keys,
    )
    return remaining, used


def record_budget_status(status) -> None:
    """Publish a key's remaining and used budget (the ledger's ``on_change`` hook)."""
    if status.role != "attacker":
        return
    with _lock:
        remaining, used = _budget_gauges()
    tags = {"key_id": status.key_id, "key_name": status.name}
    remaining.set(0 if status.revoked else status.remaining, tags=tags)
    used.set(status.used, tags=tags)


class DetectionMetrics:
    """What a replica's query detection screened, tagged with its application and mode."""

    def __init__(self, app: str, mode: str) -> None:
        self._tags = {"app": app, "mode": mode}
        self.images_screened = Counter(
            "clusterattack_detection_images_screened",
            description="Images fingerprinted and matched by query detection, by outcome: "
            "matched (an earlier query of the key's scope shares enough hashes), unmatched, "
            "blocked (refused before matching: the key was flagged and the app blocks).",
            tag_keys=("app", "mode", "outcome"),
        )

    def screened(self, verdict) -> None:
        if verdict.replayed:
            return
        if verdict.blocked and not verdict.newly_flagged and verdict.matched == 0:
            self.images_screened.inc(verdict.images, tags={**self._tags, "outcome": "blocked"})
            return
        if verdict.matched:
            self.images_screened.inc(verdict.matched, tags={**self._tags, "outcome": "matched"})
        if verdict.images > verdict.matched:
            self.images_screened.inc(verdict.images - verdict.matched, tags={**self._tags, "outcome": "unmatched"})


@lru_cache(maxsize=1)
def _detection_metrics() -> tuple[Counter, Counter, Gauge, Gauge]:
    tag_keys = ("key_id", "key_name")
    matches = Counter(
        "clusterattack_detection_matches",
        description="Queries of an API key that matched an earlier query of its scope.",
        tag_keys=tag_keys,
    )
    flags = Counter(
        "clusterattack_detection_flags",
        description="Times an API key's scope was flagged by query detection.",
        tag_keys=tag_keys,
    )
    recent = Gauge(
        "clusterattack_detection_recent_matched",
        description="Matched queries among the last flag_window queries of an API key's scope "
        "(the scope is flagged at flag_after).",
        tag_keys=tag_keys,
    )
    flagged = Gauge(
        "clusterattack_detection_flagged",
        description="1 while an API key's scope is flagged by query detection, else 0.",
        tag_keys=tag_keys,
    )
    return matches, flags, recent, flagged


def record_detection_screen(key_id: str, key_name: str, matched: int, recent_matched: int, flagged: bool) -> None:
    """Publish one screened request of a key (the detector actor's ``on_screen`` hook)."""
    with _lock:
        matches, _, recent, flagged_gauge = _detection_metrics()
    tags = {"key_id": key_id, "key_name": key_name}
    if matched:
        matches.inc(matched, tags=tags)
    recent.set(recent_matched, tags=tags)
    flagged_gauge.set(1 if flagged else 0, tags=tags)


def record_detection_flag(key_id: str, key_name: str) -> None:
    """Count a new flag of a key (the detector actor's ``on_flag`` hook)."""
    with _lock:
        _, flags, _, _ = _detection_metrics()
    flags.inc(1, tags={"key_id": key_id, "key_name": key_name})
