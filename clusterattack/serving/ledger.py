"""The budget ledger: API keys, image-query budgets and token buckets, persisted in sqlite.

One object decides every charge, so accounting is exact across replicas and concurrent
requests: :class:`BudgetLedger`, run as one named Ray actor (``ledger_actor``) that all
replicas call. Each decision is one sqlite transaction (``BEGIN IMMEDIATE``, WAL), so the
file always holds whole reservations; a restarted ledger, controller or replica reloads
it, and two ledgers opened on one file by accident still cannot double-spend.

A request is charged in two steps. ``reserve`` takes all its images from the budget and
the rate bucket or none (429), recording the request id with a digest of the images;
``commit`` marks it served, ``refund`` returns the images when the model failed. A retry
with the same id and images is a replay, never charged again, whichever replica it
reaches; the same id with other images is a conflict. A reservation neither committed nor
refunded within ``reservation_ttl_s`` (replica died, no retry came) is refunded: a killed
replica neither loses images nor counts them twice.

Keys are stored as SHA-256 hashes: they are 256-bit random tokens, so a slow password
hash adds nothing; the plaintext exists only in the answer to ``create_key``. The schema,
the records and the checks on admin input are in ``ledger_records``."""

from __future__ import annotations

import logging
import math
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from clusterattack.serving.errors import (
    BadRequest,
    BudgetExceeded,
    Forbidden,
    NotFound,
    RateLimited,
    RequestConflict,
    ServingError,
    Unauthorized,
)
from clusterattack.serving.ledger_records import (
    ROLES,
    SCHEMA,
    IssuedKey,
    KeyStatus,
    Reservation,
    check_budget,
    check_rate,
    hash_api_key,
)

logger = logging.getLogger(__name__)


class BudgetLedger:
    """Exact, persistent budgets and rate limits per API key (see the module docstring).

    Args:
        path: sqlite file; created with its parent folder when missing.
        reservation_ttl_s: a reservation neither committed nor refunded after this long
            is refunded (its replica died and no retry came).
        retain_s: settled reservations older than this are forgotten; a retry of one of
            them is charged again.
        synchronous: sqlite ``synchronous`` pragma. ``NORMAL`` survives any process being
            killed (what replica, controller and ledger restarts are); ``FULL`` also
            survives power loss at about 0.5 ms more per transaction.
        clock: wall-clock seconds; wall time, not monotonic, because token buckets must
            refill across process restarts. Injected by tests.
        on_change: called with the new :class:`KeyStatus` after each committed change
            (the actor exports it as the budget-remaining gauge).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        reservation_ttl_s: float = 600.0,
        retain_s: float = 7 * 86400.0,
        synchronous: str = "NORMAL",
        clock: Callable[[], float] = time.time,
        on_change: Callable[[KeyStatus], None] | None = None,
    ) -> None:
        if not reservation_ttl_s > 0:
            raise ValueError(f"reservation_ttl_s must be > 0 seconds, got {reservation_ttl_s!r}")
        if not retain_s >= reservation_ttl_s:
            raise ValueError(
                f"retain_s ({retain_s!r}) must be >= reservation_ttl_s ({reservation_ttl_s!r})"
            )
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        self._path = Path(path).expanduser().resolve()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._ttl_s = float(reservation_ttl_s)
        self._retain_s = float(retain_s)
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.RLock()
        self._last_reap = -math.inf
        # Autocommit mode: transactions are opened explicitly with BEGIN IMMEDIATE, which
        # takes the write lock up front so concurrent reservations serialise, never interleave.
        self._conn = sqlite3.connect(
            str(self._path), timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.executescript(SCHEMA)
        if on_change is not None:
            for status in self.list_keys():
                on_change(status)
        logger.info("budget ledger at %s: %d keys", self._path, len(self.list_keys()))

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _notify(self, status: KeyStatus | None) -> None:
        if self._on_change is not None and status is not None:
            self._on_change(status)

    def _tokens(self, row: sqlite3.Row, now: float) -> float:
        if row["rate_per_s"] is None:
            return math.inf
        # Clamp: a wall clock stepped backwards must not drain the bucket.
        elapsed = max(0.0, now - row["tokens_at"])
        return min(row["burst"], row["tokens"] + elapsed * row["rate_per_s"])

    def _status(self, row: sqlite3.Row, now: float) -> KeyStatus:
        tokens = self._tokens(row, now)
        rate = row["rate_per_s"]
        finite_tokens = row["burst"] if rate is None else tokens
        return KeyStatus(
            key_id=row["key_id"],
            name=row["name"],
            role=row["role"],
            budget_total=row["budget_total"],
            used=row["used"],
            remaining=row["budget_total"] - row["used"],
            rate_per_s=rate,
            burst=row["burst"],
            tokens=finite_tokens,
            refill_s=0.0 if rate is None else (row["burst"] - tokens) / rate,
            revoked=bool(row["revoked"]),
        )

    def _row_by_hash(self, conn: sqlite3.Connection, key_hash: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM api_keys WHERE key_hash = ?", (key_hash,)).fetchone()
        if row is None or row["revoked"]:
            raise Unauthorized("unknown or revoked API key")
        return row

    def _row_by_id(self, conn: sqlite3.Connection, key_id: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFound(f"no API key with id {key_id!r}")
        return row

    def _reread(self, conn: sqlite3.Connection, key_id: str, now: float) -> KeyStatus:
        return self._status(self._row_by_id(conn, key_id), now)

    # ------------------------------------------------------------------ attacker side
    def authenticate(self, key_hash: str, role: str | None = "attacker") -> KeyStatus:
        """The status of a live key of ``role`` (any role if None); 401 or 403 otherwise."""
        with self._lock:
            row = self._row_by_hash(self._conn, key_hash)
            if role is not None and row["role"] != role:
                raise Forbidden(f"this endpoint needs an {role} key, got an {row['role']} key")
            return self._status(row, self._clock())

    def status(self, key_hash: str) -> KeyStatus:
        """The budget of the attacker key with this hash."""
        return self.authenticate(key_hash, "attacker")

    def reserve(self, key_hash: str, images: int, request_id: str, digest: str) -> Reservation:
        """Charge ``images`` image-queries to the key, all or nothing.

        Raises Unauthorized, Forbidden (admin key), BudgetExceeded, RateLimited (nothing
        charged) or RequestConflict (the id was used for other images).
        """
        if isinstance(images, bool) or not isinstance(images, int) or images < 1:
            raise BadRequest(f"a reservation needs a positive number of images, got {images!r}")
        if not request_id:
            raise BadRequest("a reservation needs a non-empty request id")
        now = self._clock()
        if now - self._last_reap >= self._ttl_s / 4:
            self.reap()
        with self._transaction() as conn:
            row = self._row_by_hash(conn, key_hash)
            if row["role"] != "attacker":
                raise Forbidden("admin keys manage budgets; query victims with an attacker key")
            key_id = row["key_id"]
            remaining = row["budget_total"] - row["used"]
            previous = conn.execute(
                "SELECT * FROM reservations WHERE key_id = ? AND request_id = ?",
                (key_id, request_id),
            ).fetchone()
            if previous is not None:
                if previous["digest"] != digest or previous["images"] != images:
                    raise RequestConflict(
                        f"request id {request_id!r} was already used for {previous['images']} "
                        f"other images; use a fresh id for new images"
                    )
                if previous["state"] != "refunded":
                    return Reservation(key_id, request_id, images, remaining, replayed=True)
            if images > remaining:
                raise BudgetExceeded(
                    f"budget exceeded: {images} image-queries requested, {remaining} of "
                    f"{row['budget_total']} remain for key {key_id}",
                    requested=images,
                    remaining=remaining,
                )
            tokens = self._tokens(row, now)
            if images > tokens:
                if images > row["burst"]:
                    raise RateLimited(
                        f"rate limit: {images} images in one request exceed the burst of "
                        f"{row['burst']:g} image-queries of key {key_id}; split the request",
                        requested=images,
                        remaining=remaining,
                    )
                wait_s = (images - tokens) / row["rate_per_s"]
                raise RateLimited(
                    f"rate limit: {images} image-queries requested, {math.floor(tokens)} "
                    f"available at {row['rate_per_s']:g}/s; retry in {wait_s:.3f} s "
                    f"({remaining} image-queries of the budget remain)",
                    requested=images,
                    remaining=remaining,
                    retry_after_s=wait_s,
                )
            new_tokens = row["tokens"] if row["rate_per_s"] is None else tokens - images
            conn.execute(
                "UPDATE api_keys SET used = used + ?, tokens = ?, tokens_at = ? WHERE key_id = ?",
                (images, new_tokens, now, key_id),
            )
            conn.execute(
                "INSERT INTO reservations VALUES (?, ?, ?, ?, 'reserved', ?, ?) "
                "ON CONFLICT (key_id, request_id) DO UPDATE SET "
                "state = 'reserved', updated_at = excluded.updated_at",
                (key_id, request_id, digest, images, now, now),
            )
            status = self._reread(conn, key_id, now)
        self._notify(status)
        return Reservation(key_id, request_id, images, status.remaining, replayed=False)

    def commit(self, key_hash: str, request_id: str) -> Reservation:
        """Mark a reservation served; idempotent.

        A reservation that was already refunded by the reaper (its request outlived
        ``reservation_ttl_s``) is charged again if the budget allows, BudgetExceeded
        otherwise, so an answer never leaves without its images being counted once.
        """
        now = self._clock()
        with self._transaction() as conn:
            row = self._row_by_hash(conn, key_hash)
            key_id = row["key_id"]
            res = conn.execute(
                "SELECT * FROM reservations WHERE key_id = ? AND request_id = ?",
                (key_id, request_id),
            ).fetchone()
            if res is None:
                raise ServingError(f"no reservation {request_id!r} for key {key_id} to commit")
            images = res["images"]
            if res["state"] == "refunded":
                remaining = row["budget_total"] - row["used"]
                if images > remaining:
                    raise BudgetExceeded(
                        f"budget exceeded: request {request_id!r} outlived its reservation "
                        f"and its {images} image-queries no longer fit in the {remaining} remaining",
                        requested=images,
                        remaining=remaining,
                    )
                conn.execute(
                    "UPDATE api_keys SET used = used + ? WHERE key_id = ?", (images, key_id)
                )
            if res["state"] != "committed":
                conn.execute(
                    "UPDATE reservations SET state = 'committed', updated_at = ? "
                    "WHERE key_id = ? AND request_id = ?",
                    (now, key_id, request_id),
                )
            status = self._reread(conn, key_id, now)
        self._notify(status)
        return Reservation(key_id, request_id, images, status.remaining, replayed=False)

    def reserve_many(self, calls: list[tuple]) -> list[Reservation | ServingError]:
        """``reserve`` for each argument tuple, in order, each in its own transaction.

        One actor call for all the reservations a replica has waiting: the decisions and
        their order are those of the same calls made one by one, and a refused one is
        returned as its error (not raised) so the others still count.
        """
        return [self._captured(self.reserve, args) for args in calls]

    def commit_many(self, calls: list[tuple]) -> list[Reservation | ServingError]:
        """``commit`` for each argument tuple, in order (see ``reserve_many``)."""
        return [self._captured(self.commit, args) for args in calls]

    @staticmethod
    def _captured(method, args: tuple) -> Reservation | ServingError:
        try:
            return method(*args)
        except ServingError as exc:
            return exc

    def refund(self, key_hash: str, request_id: str) -> bool:
        """Give back the images of a reservation whose request failed; False if not reserved.

        Rate tokens are not given back: the attempt did consume service capacity.
        """
        now = self._clock()
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT key_id FROM api_keys WHERE key_hash = ?", (key_hash,)
            ).fetchone()
            if row is None:
                return False
            refunded = self._refund_locked(conn, row["key_id"], request_id, now)
            status = self._reread(conn, row["key_id"], now) if refunded else None
        self._notify(status)
        return refunded

    def _refund_locked(
        self, conn: sqlite3.Connection, key_id: str, request_id: str, now: float
    ) -> bool:
        res = conn.execute(
            "SELECT images, state FROM reservations WHERE key_id = ? AND request_id = ?",
            (key_id, request_id),
        ).fetchone()
        if res is None or res["state"] != "reserved":
            return False
        conn.execute(
            "UPDATE reservations SET state = 'refunded', updated_at = ? "
            "WHERE key_id = ? AND request_id = ?",
            (now, key_id, request_id),
        )
        # MAX guards a reset between reserve and refund, after which used may be below images.
        conn.execute(
            "UPDATE api_keys SET used = MAX(0, used - ?) WHERE key_id = ?", (res["images"], key_id)
        )
        return True

    def reap(self) -> int:
        """Refund stale reservations and forget old settled ones; returns how many were refunded."""
        now = self._clock()
        self._last_reap = now
        with self._transaction() as conn:
            stale = conn.execute(
                "SELECT key_id, request_id FROM reservations WHERE state = 'reserved' "
                "AND updated_at < ?",
                (now - self._ttl_s,),
            ).fetchall()
            for res in stale:
                self._refund_locked(conn, res["key_id"], res["request_id"], now)
            conn.execute(
                "DELETE FROM reservations WHERE state != 'reserved' AND updated_at < ?",
                (now - self._retain_s,),
            )
            touched = {res["key_id"] for res in stale}
            statuses = [self._reread(conn, key_id, now) for key_id in sorted(touched)]
        for status in statuses:
            self._notify(status)
        if stale:
            logger.warning("refunded %d reservations older than %.0f s", len(stale), self._ttl_s)
        return len(stale)

    # ------------------------------------------------------------------ admin side
    def create_key(
        self,
        name: str,
        *,
        budget: int = 0,
        rate_per_s: float | None = None,
        burst: float | None = None,
        role: str = "attacker",
        api_key: str | None = None,
    ) -> IssuedKey:
        """Issue a key with a budget of image-queries and an optional rate limit.

        ``burst`` (the bucket size) defaults to one second of ``rate_per_s`` but at least
        256 images. ``api_key`` imports a given secret (e.g. an admin key from the
        environment) instead of generating one.
        """
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            raise BadRequest(f"key name must be a string of 1 to 64 characters, got {name!r}")
        if role not in ROLES:
            raise BadRequest(f"role must be one of {ROLES}, got {role!r}")
        check_budget(budget)
        rate, bucket = check_rate(rate_per_s, burst)
        if api_key is not None and len(api_key) < 16:
            raise BadRequest(f"an imported API key needs at least 16 characters, got {len(api_key)}")
        secret = api_key or "ca_" + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(6)
        now = self._clock()
        with self._transaction() as conn:
            if conn.execute(
                "SELECT 1 FROM api_keys WHERE key_hash = ?", (hash_api_key(secret),)
            ).fetchone():
                raise RequestConflict("this API key already exists in the ledger")
            conn.execute(
                "INSERT INTO api_keys (key_hash, key_id, name, role, budget_total, used, "
                "rate_per_s, burst, tokens, tokens_at, revoked, created_at) "
                "VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?, 0, ?)",
                (hash_api_key(secret), key_id, name, role, budget, rate, bucket, bucket, now, now),
            )
            status = self._reread(conn, key_id, now)
        self._notify(status)
        logger.info("created %s key %s (%s) with budget %d", role, key_id, name, budget)
        return IssuedKey(key_id=key_id, api_key=secret, name=name, role=role)

    def grant(self, key_id: str, images: int) -> KeyStatus:
        """Add ``images`` image-queries to the key's total budget."""
        check_budget(images)
        return self._admin_update(key_id, "budget_total = budget_total + ?", (images,))

    def reset(self, key_id: str, budget: int | None = None) -> KeyStatus:
        """Zero what the key has used, refill its bucket and optionally set a new total."""
        now = self._clock()
        if budget is None:
            return self._admin_update(
                key_id, "used = 0, tokens = burst, tokens_at = ?", (now,)
            )
        check_budget(budget)
        return self._admin_update(
            key_id, "used = 0, budget_total = ?, tokens = burst, tokens_at = ?", (budget, now)
        )

    def revoke(self, key_id: str) -> KeyStatus:
        """Disable the key for good: every later request with it gets 401."""
        return self._admin_update(key_id, "revoked = 1", ())

    def set_rate(self, key_id: str, rate_per_s: float | None, burst: float | None = None) -> KeyStatus:
        """Change the key's rate limit (None removes it); the bucket starts full."""
        rate, bucket = check_rate(rate_per_s, burst)
        return self._admin_update(
            key_id,
            "rate_per_s = ?, burst = ?, tokens = ?, tokens_at = ?",
            (rate, bucket, bucket, self._clock()),
        )

    def _admin_update(self, key_id: str, assignments: str, params: tuple) -> KeyStatus:
        now = self._clock()
        with self._transaction() as conn:
            self._row_by_id(conn, key_id)
            conn.execute(f"UPDATE api_keys SET {assignments} WHERE key_id = ?", (*params, key_id))
            status = self._reread(conn, key_id, now)
        self._notify(status)
        logger.info("admin update of %s: %s", key_id, assignments)
        return status

    def key_status(self, key_id: str) -> KeyStatus:
        """The status of any key by id (admin view)."""
        with self._lock:
            return self._status(self._row_by_id(self._conn, key_id), self._clock())

    def list_keys(self) -> list[KeyStatus]:
        """Every key, admin and revoked ones included, oldest first."""
        now = self._clock()
        with self._lock:
            rows = self._conn.execute("SELECT * FROM api_keys ORDER BY created_at, rowid").fetchall()
        return [self._status(row, now) for row in rows]

    def audit(self, key_id: str) -> dict[str, int]:
        """Images per reservation state for a key, and ``used``; committed + reserved == used."""
        with self._lock:
            row = self._row_by_id(self._conn, key_id)
            counts = dict.fromkeys(("reserved", "committed", "refunded"), 0)
            for state, images in self._conn.execute(
                "SELECT state, SUM(images) FROM reservations WHERE key_id = ? GROUP BY state",
                (key_id,),
            ):
                counts[state] = int(images)
        return {**counts, "used": int(row["used"])}

    def db_path(self) -> str:
        return str(self._path)

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        with self._lock:
            self._conn.close()
