"""The query detector's shared, persistent state: :class:`QueryDetector`, per-scope fingerprint windows, counts and flags.

It runs as one named, detached Ray actor beside the budget ledger
(:func:`~clusterattack.serving.detector.get_detector`), with its own sqlite file in WAL mode
next to the ledger's (``<ledger>.detection.sqlite``), read back when the actor restarts;
every replica of every app that shares the ledger screens through it, so a key's history is
the same whichever replica answers. It reads key ids and names from the ledger's file. A
scope is the key, or the owner an admin gave the key (keys issued to one account share one
history and one flag: spreading queries over them gains nothing). A scope is flagged when
``flag_after`` of its last ``flag_window`` queries matched (a rate: an honest user's
occasional repeat never adds up to it).

Memory: at most ``max_resident`` scopes stay in memory (least recently used leave; their
fingerprints stay on disk and are read back when they query again), so the indexes hold at
most ``max_resident * DetectionConfig.scope_bytes()`` bytes (32 MiB with the defaults);
on disk a scope keeps at most ``history`` rows of ``8 * top_k`` bytes. A retried request
(same request id) gets its first verdict and is recorded once, so a client's retries never
match themselves; request ids are remembered per scope (the last 4,096), in memory.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from clusterattack.serving.detection import (
    POLICIES,
    DetectionConfig,
    FingerprintIndex,
    FingerprintSpec,
)
from clusterattack.serving.errors import (
    Forbidden,
    NotFound,
    ServingError,
    Unauthorized,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DETECTION_SCHEMA",
    "KeyDetection",
    "QueryDetector",
    "Verdict",
    "detector_db_path",
]

_REQUEST_MEMORY = 4096

DETECTION_SCHEMA = """
CREATE TABLE IF NOT EXISTS detection_meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS detection_keys (
    key_id            TEXT PRIMARY KEY,
    owner             TEXT,
    queries           INTEGER NOT NULL DEFAULT 0,
    matched           INTEGER NOT NULL DEFAULT 0,
    first_match_query INTEGER,
    updated_at        REAL
);
CREATE TABLE IF NOT EXISTS detection_scopes (
    scope       TEXT PRIMARY KEY,
    next_row    INTEGER NOT NULL DEFAULT 0,
    queries     INTEGER NOT NULL DEFAULT 0,
    matched     INTEGER NOT NULL DEFAULT 0,
    flagged_at  REAL,
    flag_query  INTEGER,
    flag_key    TEXT,
    flag_reason TEXT
);
CREATE TABLE IF NOT EXISTS detection_fingerprints (
    scope   TEXT NOT NULL,
    row     INTEGER NOT NULL,
    hashes  BLOB NOT NULL,
    matched INTEGER NOT NULL,
    PRIMARY KEY (scope, row)
) WITHOUT ROWID;
"""


def detector_db_path(ledger_db_path: str) -> str:
    """The detector's sqlite file: beside the ledger's, ``<stem>.detection.sqlite``."""
    path = Path(ledger_db_path)
    return str(path.with_name(path.stem + ".detection.sqlite"))


@dataclass(frozen=True)
class Verdict:
    """What the detector decided about one request."""

    key_id: str
    images: int
    matched: int
    recent_matched: int
    flagged: bool
    newly_flagged: bool
    blocked: bool
    reason: str | None
    replayed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KeyDetection:
    """The detector's view of one key (the admin listing)."""

    key_id: str
    name: str
    owner: str | None
    scope: str
    queries: int
    matched: int
    first_match_query: int | None
    scope_queries: int
    recent_matched: int
    flagged: bool
    flagged_at: float | None
    flag_query: int | None
    flag_key: str | None
    reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class QueryDetector:
    """The shared, persistent detector state: per-scope fingerprint windows, counts, flags.

    Run as one Ray actor (``get_detector``); every method is one sqlite transaction, so a
    restarted actor continues where the old one stopped. See the module docstring.

    Args:
        path: its sqlite file (created with its folder). ledger_path: the ledger's file,
            read for key ids and names. config: the detector's parameters (``policy`` is
            ignored here: it is each deployment's). clock: wall-clock seconds (tests).
        on_flag / on_screen: metric hooks, called with (key_id, name) and
            (key_id, name, matched, recent_matched, flagged).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        ledger_path: str | os.PathLike[str],
        config: DetectionConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        on_flag: Callable[[str, str], None] | None = None,
        on_screen: Callable[[str, str, int, int, bool], None] | None = None,
    ) -> None:
        self.config = config or DetectionConfig()
        self._clock = clock
        self._on_flag = on_flag
        self._on_screen = on_screen
        self._lock = threading.RLock()
        self._path = Path(path).expanduser().resolve()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self._path), timeout=30.0, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.executescript(DETECTION_SCHEMA)
        self._ledger = sqlite3.connect(
            str(Path(ledger_path).expanduser().resolve()), timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._ledger.row_factory = sqlite3.Row
        self._ledger.execute("PRAGMA busy_timeout=30000")
        self._indexes: OrderedDict[str, FingerprintIndex] = OrderedDict()
        self._requests: dict[str, OrderedDict[str, Verdict]] = {}
        self._spec = self._load_spec()
        logger.info(
            "query detector at %s: %s, history %d, flag at %d matched of %d (index bound %d bytes per scope)",
            self._path, self._spec.public(), self.config.history, self.config.flag_after, self.config.flag_window,
            self.config.scope_bytes(),
        )

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

    def _load_spec(self) -> FingerprintSpec:
        """The salt (created once) and the fingerprint parameters; stored fingerprints made
        with other parameters cannot match new ones and are dropped."""
        with self._transaction() as conn:
            meta = {r["name"]: r["value"] for r in conn.execute("SELECT name, value FROM detection_meta")}
            salt = int(meta["salt"]) if "salt" in meta else secrets.randbits(64)
            spec = self.config.spec(salt)
            wanted = repr(sorted(spec.public().items()))
            if meta.get("spec") not in (None, wanted):
                count = conn.execute("SELECT COUNT(*) FROM detection_fingerprints").fetchone()[0]
                logger.warning(
                    "fingerprint parameters changed (%s -> %s): dropping %d stored fingerprints",
                    meta.get("spec"), wanted, count,
                )
                conn.execute("DELETE FROM detection_fingerprints")
                conn.execute("UPDATE detection_scopes SET next_row = 0")
            conn.execute("INSERT OR REPLACE INTO detection_meta VALUES ('salt', ?)", (str(salt),))
            conn.execute("INSERT OR REPLACE INTO detection_meta VALUES ('spec', ?)", (wanted,))
        return spec

    def _key(self, key_hash: str) -> sqlite3.Row:
        row = self._ledger.execute(
            "SELECT key_id, name, role, revoked FROM api_keys WHERE key_hash = ?", (key_hash,)
        ).fetchone()
        if row is None or row["revoked"]:
            raise Unauthorized("unknown or revoked API key")
        if row["role"] != "attacker":
            raise Forbidden("admin keys manage budgets; query victims with an attacker key")
        return row

    def _key_name(self, key_id: str) -> str:
        row = self._ledger.execute("SELECT name FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFound(f"no API key with id {key_id!r}")
        return row["name"]

    def _owner(self, conn: sqlite3.Connection, key_id: str) -> str | None:
        row = conn.execute("SELECT owner FROM detection_keys WHERE key_id = ?", (key_id,)).fetchone()
        return None if row is None else row["owner"]

    @staticmethod
    def _scope_of(key_id: str, owner: str | None) -> str:
        return f"owner:{owner}" if owner else f"key:{key_id}"

    def _index(self, conn: sqlite3.Connection, scope: str) -> FingerprintIndex:
        index = self._indexes.get(scope)
        if index is not None:
            self._indexes.move_to_end(scope)
            return index
        cfg = self.config
        index = cfg.index()
        state = conn.execute("SELECT next_row FROM detection_scopes WHERE scope = ?", (scope,)).fetchone()
        next_row = 0 if state is None else int(state["next_row"])
        stored = conn.execute(
            "SELECT row, hashes, matched FROM detection_fingerprints WHERE scope = ? AND row >= ? ORDER BY row",
            (scope, next_row - cfg.history),
        ).fetchall()
        contiguous = bool(stored) and int(stored[-1]["row"]) == next_row - 1 and (
            len(stored) == next_row - int(stored[0]["row"])
        )
        if contiguous and all(len(r["hashes"]) == 8 * cfg.top_k for r in stored):
            fps = np.stack([np.frombuffer(r["hashes"], np.uint64) for r in stored])
            index.load(int(stored[0]["row"]), fps, np.array([bool(r["matched"]) for r in stored]))
        else:
            if stored:
                logger.warning("stored fingerprints of %s are not a contiguous window: starting it empty", scope)
            index.next_row = next_row
        self._indexes[scope] = index
        while len(self._indexes) > cfg.max_resident:
            self._indexes.popitem(last=False)  # on disk; reloaded when the scope queries again
        return index

    def _scope_row(self, conn: sqlite3.Connection, scope: str) -> sqlite3.Row:
        conn.execute("INSERT OR IGNORE INTO detection_scopes (scope) VALUES (?)", (scope,))
        return conn.execute("SELECT * FROM detection_scopes WHERE scope = ?", (scope,)).fetchone()

    # ------------------------------------------------------------------ replicas
    def fingerprint_spec(self) -> FingerprintSpec:
        """The spec (with the salt) replicas fingerprint with; it never leaves the cluster."""
        return self._spec

    def screen(self, key_hash: str, request_id: str, fps: np.ndarray, policy: str) -> Verdict:
        """Match a request's fingerprints against its scope, record them, flag the scope at
        ``flag_after`` matches among its last ``flag_window`` queries; ``blocked`` under ``policy == "block"`` when the
        scope is (or now becomes) flagged. Raises Unauthorized or Forbidden for bad keys."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        fps = np.asarray(fps, np.uint64)
        if fps.ndim != 2 or fps.shape[1] != self._spec.top_k:
            raise ValueError(f"fingerprints must be N x {self._spec.top_k}, got shape {fps.shape}")
        key = self._key(key_hash)
        key_id, name = key["key_id"], key["name"]
        now = self._clock()
        cfg = self.config
        with self._transaction() as conn:
            owner = self._owner(conn, key_id)
            scope = self._scope_of(key_id, owner)
            seen = self._requests.setdefault(scope, OrderedDict())
            if request_id and request_id in seen:
                first = seen[request_id]
                state = self._scope_row(conn, scope)
                flagged = state["flagged_at"] is not None
                return replace(
                    first, replayed=True, flagged=flagged, newly_flagged=False,
                    blocked=first.blocked or (flagged and policy == "block"),
                )
            state = self._scope_row(conn, scope)
            index = self._index(conn, scope)
            if state["flagged_at"] is not None and policy == "block":
                recent_now = int(index.recent(1, cfg.flag_window)[0])
                return Verdict(key_id, len(fps), 0, recent_now, True, False, True, state["flag_reason"])
            # In parts whose every query still sees its whole flag window in the history.
            step = cfg.history - cfg.flag_window + 1
            parts, recent_parts, row_parts = [], [], []
            for start in range(0, len(fps), step):
                part = index.match(fps[start : start + step])
                parts.append(part.matched)
                row_parts.append(part.rows)
                recent_parts.append(index.recent(len(part.rows), cfg.flag_window))
            is_match = np.concatenate(parts) if parts else np.zeros(0, bool)
            rows = np.concatenate(row_parts) if row_parts else np.zeros(0, np.int64)
            recent = np.concatenate(recent_parts) if recent_parts else np.zeros(0, np.int64)
            matched = int(is_match.sum())
            queries = int(state["queries"]) + len(fps)
            flagged = state["flagged_at"] is not None
            crossed = recent >= cfg.flag_after
            newly = not flagged and bool(crossed.any())
            reason = state["flag_reason"]
            recent_now = int(recent[-1]) if len(recent) else int(index.recent(1, cfg.flag_window)[0])
            if newly:
                crossing = int(np.argmax(crossed))  # the query at which the rate crossed the threshold
                flag_query = int(state["queries"]) + crossing + 1
                reason = (
                    f"{int(recent[crossing])} of the last {cfg.flag_window} queries of "
                    f"{'owner ' + owner if owner else 'key ' + key_id} matched earlier ones "
                    f"(flag_after={cfg.flag_after})"
                )
                conn.execute(
                    "UPDATE detection_scopes SET flagged_at = ?, flag_query = ?, flag_key = ?, flag_reason = ? "
                    "WHERE scope = ?",
                    (now, flag_query, key_id, reason, scope),
                )
            conn.execute(
                "UPDATE detection_scopes SET next_row = ?, queries = ?, matched = matched + ? WHERE scope = ?",
                (index.next_row, queries, matched, scope),
            )
            conn.executemany(
                "INSERT OR REPLACE INTO detection_fingerprints VALUES (?, ?, ?, ?)",
                [(scope, int(row), fps[i].tobytes(), int(is_match[i])) for i, row in enumerate(rows)],
            )
            conn.execute(
                "DELETE FROM detection_fingerprints WHERE scope = ? AND row < ?",
                (scope, index.next_row - cfg.history),
            )
            key_row = conn.execute("SELECT queries, first_match_query FROM detection_keys WHERE key_id = ?", (key_id,)).fetchone()
            key_queries = (0 if key_row is None else int(key_row["queries"]))
            first_match = None if key_row is None else key_row["first_match_query"]
            if first_match is None and matched:
                first_match = key_queries + int(np.argmax(is_match)) + 1
            conn.execute(
                "INSERT INTO detection_keys (key_id, queries, matched, first_match_query, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key_id) DO UPDATE SET queries = excluded.queries, "
                "matched = matched + excluded.matched, first_match_query = excluded.first_match_query, "
                "updated_at = excluded.updated_at",
                (key_id, key_queries + len(fps), matched, first_match, now),
            )
        verdict = Verdict(
            key_id, len(fps), matched, recent_now, flagged or newly, newly,
            (flagged or newly) and policy == "block", reason,
        )
        if request_id:
            seen[request_id] = verdict
            while len(seen) > _REQUEST_MEMORY:
                seen.popitem(last=False)
        if newly:
            logger.warning("query detection flagged %s (%s): %s", key_id, name, reason)
            if self._on_flag is not None:
                self._on_flag(key_id, name)
        if self._on_screen is not None:
            self._on_screen(key_id, name, matched, recent_now, flagged or newly)
        return verdict

    def screen_many(self, calls: list[tuple]) -> list[Verdict | ServingError]:
        """``screen`` for each argument tuple, in order; a refused one is returned as its error."""
        out: list[Verdict | ServingError] = []
        for args in calls:
            try:
                out.append(self.screen(*args))
            except ServingError as exc:
                out.append(exc)
        return out

    # ------------------------------------------------------------------ admin
    def _status(self, conn: sqlite3.Connection, key_id: str, name: str) -> KeyDetection:
        key = conn.execute("SELECT * FROM detection_keys WHERE key_id = ?", (key_id,)).fetchone()
        owner = None if key is None else key["owner"]
        scope = self._scope_of(key_id, owner)
        state = conn.execute("SELECT * FROM detection_scopes WHERE scope = ?", (scope,)).fetchone()
        index = self._indexes.get(scope)
        if index is not None:
            recent = int(index.recent(1, self.config.flag_window)[0])
        elif state is not None:
            recent = int(
                conn.execute(
                    "SELECT COALESCE(SUM(matched), 0) FROM detection_fingerprints WHERE scope = ? AND row >= ?",
                    (scope, int(state["next_row"]) - self.config.flag_window),
                ).fetchone()[0]
            )
        else:
            recent = 0
        return KeyDetection(
            key_id=key_id,
            name=name,
            owner=owner,
            scope=scope,
            queries=0 if key is None else int(key["queries"]),
            matched=0 if key is None else int(key["matched"]),
            first_match_query=None if key is None else key["first_match_query"],
            scope_queries=0 if state is None else int(state["queries"]),
            recent_matched=recent,
            flagged=state is not None and state["flagged_at"] is not None,
            flagged_at=None if state is None else state["flagged_at"],
            flag_query=None if state is None else state["flag_query"],
            flag_key=None if state is None else state["flag_key"],
            reason=None if state is None else state["flag_reason"],
        )

    def key_status(self, key_id: str) -> KeyDetection:
        name = self._key_name(key_id)
        with self._lock:
            return self._status(self._conn, key_id, name)

    def list_keys(self, flagged_only: bool = False) -> list[KeyDetection]:
        """Every attacker key of the ledger with what the detector saw of it (flagged first)."""
        keys = self._ledger.execute(
            "SELECT key_id, name FROM api_keys WHERE role = 'attacker' ORDER BY created_at, rowid"
        ).fetchall()
        with self._lock:
            out = [self._status(self._conn, k["key_id"], k["name"]) for k in keys]
        if flagged_only:
            out = [s for s in out if s.flagged]
        return sorted(out, key=lambda s: not s.flagged)

    def set_owner(self, key_id: str, owner: str | None) -> KeyDetection:
        """Give a key an owner (keys of one owner share one history and one flag); None unlinks.

        The key's own fingerprints stay in its former scope; what it sends from now on is
        matched and counted in the owner's.
        """
        if owner is not None and (not isinstance(owner, str) or not 1 <= len(owner) <= 64):
            raise ValueError(f"owner must be a string of 1 to 64 characters or None, got {owner!r}")
        name = self._key_name(key_id)
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO detection_keys (key_id, owner) VALUES (?, ?) "
                "ON CONFLICT (key_id) DO UPDATE SET owner = excluded.owner",
                (key_id, owner),
            )
            status = self._status(conn, key_id, name)
        logger.info("detection owner of %s set to %r", key_id, owner)
        return status

    def clear(self, key_id: str) -> KeyDetection:
        """Unflag the key's scope and forget its fingerprints (an admin's decision)."""
        name = self._key_name(key_id)
        with self._transaction() as conn:
            scope = self._scope_of(key_id, self._owner(conn, key_id))
            conn.execute(
                "UPDATE detection_scopes SET flagged_at = NULL, flag_query = NULL, flag_key = NULL, "
                "flag_reason = NULL WHERE scope = ?",
                (scope,),
            )
            conn.execute("DELETE FROM detection_fingerprints WHERE scope = ?", (scope,))
            index = self._indexes.pop(scope, None)
            next_row = 0 if index is None else index.next_row
            if index is None:
                row = conn.execute("SELECT next_row FROM detection_scopes WHERE scope = ?", (scope,)).fetchone()
                next_row = 0 if row is None else int(row["next_row"])
            # Rows keep counting up, so the index starts empty at the same row number.
            conn.execute("UPDATE detection_scopes SET next_row = ? WHERE scope = ?", (next_row, scope))
            status = self._status(conn, key_id, name)
        if self._on_screen is not None:
            self._on_screen(key_id, name, 0, 0, False)
        logger.info("detection state of %s (%s) cleared by an admin", key_id, scope)
        return status

    def resident_bytes(self) -> int:
        """Bytes the resident indexes hold now (bounded by ``max_resident * scope_bytes()``)."""
        with self._lock:
            return sum(index.nbytes() for index in self._indexes.values())

    def resident_scopes(self) -> list[str]:
        with self._lock:
            return list(self._indexes)

    def db_path(self) -> str:
        return str(self._path)

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self._ledger.close()
