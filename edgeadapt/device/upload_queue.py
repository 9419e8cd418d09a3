"""Persistent, byte-bounded upload queue (SQLite in the device state directory).

Every item is the JSON of one :class:`edgeadapt.core.wire.UploadSample`, with its id, creation time, kind
("adapt" or "novel"), size, attempt count and the earliest time it may be sent again. The database runs in
WAL mode with ``synchronous=FULL`` by default: a ``put`` that returned has been committed to the WAL and
survives a ``kill -9`` of the process (and, with FULL, a power cut). Counters live in a small table and
are updated in the same transaction as the items they count, so they survive restarts too.

One connection guarded by a lock: safe to use from several threads of one process. Times are wall-clock
seconds (``time.time()``) because ``next_attempt_at`` has to mean something after a restart.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from edgeadapt.core.fileperm import private_sqlite
from edgeadapt.core.wire import UploadSample

DropPolicy = Literal["drop_oldest", "drop_newest"]

COUNTERS = (
    "put",  # items stored
    "sent",  # acked by the cloud and deleted
    "rejected",  # refused by the cloud (4xx) and deleted
    "retries",  # nacks (failed sends scheduled again)
    "dropped_full",  # new items refused because the queue was full (drop_newest)
    "dropped_oldest",  # old items evicted to make room (drop_oldest)
    "dropped_too_large",  # single items larger than max_bytes
    "dropped_attempts",  # items dropped after max_attempts failed sends
    "duplicates",  # puts of an id already queued (ignored)
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS items_ready ON items (next_attempt_at, seq);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def backoff_delay(attempts: int, base_s: float = 1.0, cap_s: float = 60.0, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": min(cap, base * 2^(attempts-1)) * U[0.5, 1]."""
    r = (rng or random).uniform(0.5, 1.0)
    return min(cap_s, base_s * 2.0 ** max(0, attempts - 1)) * r


class UploadQueue:
    def __init__(
        self,
        path: str | Path,
        max_bytes: int,
        drop_policy: DropPolicy = "drop_oldest",
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        max_attempts: int | None = None,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        if drop_policy not in ("drop_oldest", "drop_newest"):
            raise ValueError("drop_policy must be 'drop_oldest' or 'drop_newest'")
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be FULL or NORMAL")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.drop_policy = drop_policy
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_attempts = max_attempts
        self._rng = random.Random()
        self._lock = threading.RLock()
        private_sqlite(self.path)  # 0600, and so its -wal/-shm: the queue holds users' input images
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.executescript(_SCHEMA)
        self._conn.executemany("INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", [(c,) for c in COUNTERS])
        row = self._conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM items").fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])
        # The uploader sends one batch at a time: the last peek is in flight. An item of it that drop_oldest evicts
        # before the cloud's answer still reaches the cloud; its ack moves it from dropped_oldest to sent.
        self._in_flight: set[str] = set()
        self._evicted_in_flight: set[str] = set()

    # ------------------------------------------------------------------ helpers
    def _bump(self, name: str, n: int = 1) -> None:
        if n:
            self._conn.execute("UPDATE counters SET value = value + ? WHERE name = ?", (n, name))

    def _delete(self, ids: list[str]) -> tuple[int, int]:
        """Delete ids; returns (items, bytes) actually removed. Caller holds the lock, inside a transaction."""
        n = b = 0
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            row = self._conn.execute(
                f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM items WHERE id IN ({marks})", chunk
            ).fetchone()
            self._conn.execute(f"DELETE FROM items WHERE id IN ({marks})", chunk)
            n, b = n + int(row[0]), b + int(row[1])
        self._count -= n
        self._bytes -= b
        return n, b

    def _tx(self):
        return _Tx(self)

    # ------------------------------------------------------------------ API
    def put(self, sample: UploadSample, now: float | None = None) -> bool:
        """Store one sample; True if it was stored (False: duplicate id, too large, or full under drop_newest)."""
        return self.put_many([sample], now) == 1

    def put_many(self, samples: Iterable[UploadSample], now: float | None = None) -> int:
        """Store samples in one transaction (one fsync); returns how many were stored."""
        now = time.time() if now is None else now
        rows = []
        for s in samples:
            payload = s.model_dump_json().encode()
            rows.append((s.id, "novel" if s.novel else "adapt", payload))
        stored = 0
        with self._tx():
            for sid, kind, payload in rows:
                size = len(payload)
                if size > self.max_bytes:
                    self._bump("dropped_too_large")
                    continue
                if self._conn.execute("SELECT 1 FROM items WHERE id = ?", (sid,)).fetchone():
                    self._bump("duplicates")
                    continue
                if self._bytes + size > self.max_bytes:
                    if self.drop_policy == "drop_newest":
                        self._bump("dropped_full")
                        continue
                    evicted = self._evict_oldest(self._bytes + size - self.max_bytes)
                    self._bump("dropped_oldest", evicted)
                self._conn.execute(
                    "INSERT INTO items (id, created, kind, payload, size, attempts, next_attempt_at)"
                    " VALUES (?, ?, ?, ?, ?, 0, ?)",
                    (sid, now, kind, payload, size, now),
                )
                self._count += 1
                self._bytes += size
                stored += 1
            self._bump("put", stored)
        return stored

    def _evict_oldest(self, need_bytes: int) -> int:
        victims: list[str] = []
        freed = 0
        for sid, size in self._conn.execute("SELECT id, size FROM items ORDER BY seq"):
            if freed >= need_bytes:
                break
            victims.append(sid)
            freed += int(size)
        self._evicted_in_flight.update(self._in_flight.intersection(victims))
        return self._delete(victims)[0]

    def peek_raw(self, max_items: int, now: float | None = None) -> list[tuple[str, bytes]]:
        """Up to ``max_items`` items ready to send (next_attempt_at <= now), oldest first, as (id, JSON bytes)."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, payload FROM items WHERE next_attempt_at <= ? ORDER BY seq LIMIT ?",
                (now, int(max_items)),
            ).fetchall()
            self._in_flight = {r[0] for r in rows}
            self._evicted_in_flight = set()
        return [(r[0], bytes(r[1])) for r in rows]

    def peek_batch(self, max_items: int, now: float | None = None) -> list[tuple[str, UploadSample]]:
        """Like ``peek_raw`` but parsed. Items stay queued until ``ack``/``nack``/``drop``."""
        return [(i, UploadSample.model_validate_json(p)) for i, p in self.peek_raw(max_items, now)]

    def ack(self, ids: Iterable[str]) -> int:
        """Delivered: delete and count as sent. Items of the batch in flight that drop_oldest evicted meanwhile were
        delivered too: they are counted as sent instead of dropped (and included in the return value)."""
        ids = list(ids)
        with self._tx():
            late = self._evicted_in_flight.intersection(ids)
            if late:  # an eviction whose transaction rolled back left the item queued: that one is sent below
                marks = ",".join("?" * len(late))
                late -= {r[0] for r in self._conn.execute(f"SELECT id FROM items WHERE id IN ({marks})", list(late))}
            n, _ = self._delete(ids)
            self._bump("sent", n + len(late))
            self._bump("dropped_oldest", -len(late))
            self._evicted_in_flight -= late
        return n + len(late)

    def drop(self, ids: Iterable[str], reason: str = "rejected") -> int:
        """Give up on items (e.g. the cloud rejected them with a 4xx); counted under ``reason``."""
        if reason not in COUNTERS:
            raise ValueError(f"unknown counter {reason!r}")
        ids = list(ids)
        with self._tx():
            n, _ = self._delete(ids)
            self._bump(reason, n)
        return n

    def nack(self, ids: Iterable[str], now: float | None = None) -> int:
        """Failed send: attempts += 1, next try after an exponential backoff with jitter (base..cap seconds)."""
        now = time.time() if now is None else now
        ids = list(ids)
        n = 0
        with self._tx():
            for sid in ids:
                row = self._conn.execute("SELECT attempts FROM items WHERE id = ?", (sid,)).fetchone()
                if row is None:
                    continue
                attempts = int(row[0]) + 1
                if self.max_attempts is not None and attempts >= self.max_attempts:
                    self._delete([sid])
                    self._bump("dropped_attempts")
                    continue
                delay = backoff_delay(attempts, self.backoff_base_s, self.backoff_cap_s, self._rng)
                self._conn.execute(
                    "UPDATE items SET attempts = ?, next_attempt_at = ? WHERE id = ?", (attempts, now + delay, sid)
                )
                n += 1
            self._bump("retries", n)
        return n

    def retry_now(self, now: float | None = None) -> int:
        """Make every backed-off item ready at once (attempt counts kept): once the cloud answers again, a long
        outage's backoff (up to ``backoff_cap_s``) must not hold the backlog back. Returns how many were due later."""
        now = time.time() if now is None else now
        with self._tx():
            cur = self._conn.execute("UPDATE items SET next_attempt_at = ? WHERE next_attempt_at > ?", (now, now))
        return int(cur.rowcount)

    def next_ready_at(self) -> float | None:
        """Earliest next_attempt_at of any queued item (None when empty)."""
        with self._lock:
            row = self._conn.execute("SELECT MIN(next_attempt_at) FROM items").fetchone()
        return None if row[0] is None else float(row[0])

    def counters(self) -> dict[str, int]:
        with self._lock:
            out = {name: int(v) for name, v in self._conn.execute("SELECT name, value FROM counters")}
            by_kind = dict(self._conn.execute("SELECT kind, COUNT(*) FROM items GROUP BY kind").fetchall())
            out["queued"] = self._count
            out["queued_bytes"] = self._bytes
        out["queued_adapt"] = int(by_kind.get("adapt", 0))
        out["queued_novel"] = int(by_kind.get("novel", 0))
        return out

    def __len__(self) -> int:
        return self._count

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> UploadQueue:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Tx:
    """Lock + BEGIN IMMEDIATE ... COMMIT (ROLLBACK and restore the cached totals on error)."""

    def __init__(self, q: UploadQueue) -> None:
        self.q = q

    def __enter__(self) -> None:
        self.q._lock.acquire()
        self.saved = (self.q._count, self.q._bytes)
        try:
            self.q._conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.q._lock.release()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.q._conn.execute("COMMIT")
            else:
                self.q._conn.execute("ROLLBACK")
                self.q._count, self.q._bytes = self.saved
        finally:
            self.q._lock.release()
