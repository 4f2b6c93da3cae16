"""What the budget ledger stores: the sqlite schema, the key and reservation records it
answers with, and the checks on budgets and rates an admin sets.

The decisions themselves, one sqlite transaction each, are ``ledger.BudgetLedger``'s; this
module holds what they read and write."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clusterattack.serving.errors import BadRequest

ROLES = ("attacker", "admin")
#: The paper queries in batches of 256 images; a default burst below that would
#: make every paper-sized call impossible under any rate limit.
MIN_DEFAULT_BURST = 256.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash     TEXT PRIMARY KEY,
    key_id       TEXT UNIQUE NOT NULL,
    name         TEXT NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('attacker', 'admin')),
    budget_total INTEGER NOT NULL CHECK (budget_total >= 0),
    used         INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0),
    rate_per_s   REAL,
    burst        REAL NOT NULL,
    tokens       REAL NOT NULL,
    tokens_at    REAL NOT NULL,
    revoked      INTEGER NOT NULL DEFAULT 0,
    created_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    key_id     TEXT NOT NULL,
    request_id TEXT NOT NULL,
    digest     TEXT NOT NULL,
    images     INTEGER NOT NULL CHECK (images > 0),
    state      TEXT NOT NULL CHECK (state IN ('reserved', 'committed', 'refunded')),
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (key_id, request_id)
);
CREATE INDEX IF NOT EXISTS reservations_by_state ON reservations (state, updated_at);
"""


def hash_api_key(api_key: str) -> str:
    """The stored form of an API key (hex SHA-256); replicas send only this to the ledger."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def default_ledger_path() -> str:
    """``$CLUSTERATTACK_LEDGER_PATH`` or ``~/.clusterattack/ledger.sqlite``."""
    return os.environ.get(
        "CLUSTERATTACK_LEDGER_PATH", str(Path.home() / ".clusterattack" / "ledger.sqlite")
    )


@dataclass(frozen=True)
class KeyStatus:
    """What a key may still spend. ``rate_per_s`` None means no rate limit."""

    key_id: str
    name: str
    role: str
    budget_total: int
    used: int
    remaining: int
    rate_per_s: float | None
    burst: float
    tokens: float
    refill_s: float
    revoked: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class IssuedKey:
    """A key as created: the only time its plaintext ``api_key`` is ever visible."""

    key_id: str
    api_key: str
    name: str
    role: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Reservation:
    """An accepted charge. ``replayed`` is True when the request id was already charged."""

    key_id: str
    request_id: str
    images: int
    remaining: int
    replayed: bool


def check_budget(images: Any) -> None:
    if isinstance(images, bool) or not isinstance(images, int) or images < 0:
        raise BadRequest(f"a budget must be a non-negative integer of image-queries, got {images!r}")


def check_rate(rate_per_s: float | None, burst: float | None) -> tuple[float | None, float]:
    if rate_per_s is not None and not (math.isfinite(rate_per_s) and rate_per_s > 0):
        raise BadRequest(f"rate_per_s must be a positive finite number or None, got {rate_per_s!r}")
    if burst is not None and not (math.isfinite(burst) and burst >= 1):
        raise BadRequest(f"burst must be a finite number >= 1 image, got {burst!r}")
    default = MIN_DEFAULT_BURST if rate_per_s is None else max(float(rate_per_s), MIN_DEFAULT_BURST)
    return (None if rate_per_s is None else float(rate_per_s)), float(burst or default)
