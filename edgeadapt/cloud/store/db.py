"""The metadata database behind one ``Transaction`` type, so the repositories write their SQL once.

SQL is written in the subset SQLite (>= 3.35) and PostgreSQL agree on: ``?`` placeholders (a PostgreSQL
transaction turns them into psycopg's ``%s``), ``INSERT ... ON CONFLICT``, ``RETURNING``, window functions. What
differs is kept here and small: column types in the schema, how a write transaction starts and serializes
(SQLite ``BEGIN IMMEDIATE`` under a process lock; PostgreSQL advisory transaction locks for the few
read-then-write steps, such as numbering versions), connections (SQLite: one per thread; PostgreSQL: a small
pool), and in-place migrations of old SQLite files.
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edgeadapt.cloud.store.records import StoreError, StoreUnavailable
from edgeadapt.core.fileperm import private_sqlite

# {serial}: an auto-numbered primary key; {real}: a double; {bytes}: a binary column.
# Columns added after a table first shipped (``ADDED``) are also added in place to an existing database.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models(model TEXT PRIMARY KEY, bundle TEXT NOT NULL, teacher TEXT, teacher_weights TEXT,
  teacher_kwargs TEXT, student_model TEXT, input_shape TEXT NOT NULL, num_classes INTEGER NOT NULL,
  params_hash TEXT NOT NULL, created {real} NOT NULL);
CREATE TABLE IF NOT EXISTS devices(
  id {serial}, name TEXT UNIQUE NOT NULL, token_hash TEXT UNIQUE NOT NULL,
  created {real} NOT NULL, revoked {real}, last_seen {real}, version INTEGER, status TEXT, counters TEXT,
  expires {real}, problems TEXT, heartbeat_at {real}, signature TEXT, signature_at {real}, group_id INTEGER,
  model TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS samples(
  seq {serial}, device_id INTEGER NOT NULL, sample_id TEXT NOT NULL,
  received {real} NOT NULL, split TEXT NOT NULL, consumed INTEGER NOT NULL DEFAULT 0, novel INTEGER NOT NULL,
  param_version INTEGER, entropy {real}, ood_score {real}, logits {bytes}, blob TEXT NOT NULL, row INTEGER NOT NULL,
  model TEXT NOT NULL DEFAULT '', UNIQUE(device_id, sample_id));
CREATE INDEX IF NOT EXISTS samples_split ON samples(split, consumed, seq);
CREATE TABLE IF NOT EXISTS batches(device_id INTEGER NOT NULL, body_sha TEXT NOT NULL, response TEXT NOT NULL,
  created {real} NOT NULL, PRIMARY KEY(device_id, body_sha));
CREATE TABLE IF NOT EXISTS versions(model TEXT NOT NULL DEFAULT '', version INTEGER NOT NULL,
  params_hash TEXT NOT NULL, parent INTEGER, created {real} NOT NULL, note TEXT, metrics TEXT, blob TEXT NOT NULL,
  group_id INTEGER, PRIMARY KEY(model, version));
CREATE TABLE IF NOT EXISTS candidates(id {serial}, created {real} NOT NULL,
  base_version INTEGER, status TEXT NOT NULL, version INTEGER, params_hash TEXT, reason TEXT, metrics TEXT,
  model TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS param_sets(model TEXT NOT NULL DEFAULT '', params_hash TEXT NOT NULL,
  version INTEGER NOT NULL, blob TEXT NOT NULL, created {real} NOT NULL, PRIMARY KEY(model, params_hash));
CREATE TABLE IF NOT EXISTS rollouts(id {serial}, version INTEGER NOT NULL,
  devices TEXT, fraction {real}, created {real} NOT NULL, note TEXT, group_id INTEGER, model TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS device_groups(id {serial}, created {real} NOT NULL, base_version INTEGER NOT NULL,
  centroid TEXT, note TEXT, dissolved {real}, model TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS packages(key TEXT PRIMARY KEY, blob TEXT NOT NULL, info TEXT NOT NULL,
  created {real} NOT NULL);
CREATE TABLE IF NOT EXISTS round_leases(model TEXT NOT NULL DEFAULT '', lineage TEXT NOT NULL, holder TEXT NOT NULL,
  expires {real} NOT NULL, PRIMARY KEY(model, lineage));
"""
#: run once the columns below exist (an index on a column an old database is still missing would fail)
INDEXES = """
CREATE INDEX IF NOT EXISTS samples_model ON samples(model, split, consumed, seq);
CREATE INDEX IF NOT EXISTS devices_model ON devices(model);
"""

ADDED = {"devices": (("expires", "{real}"), ("problems", "TEXT"), ("heartbeat_at", "{real}"), ("signature", "TEXT"),
                     ("signature_at", "{real}"), ("group_id", "INTEGER")),
         "versions": (("group_id", "INTEGER"),), "rollouts": (("group_id", "INTEGER"),)}
#: the model registry (issue 18): the tables that gained a ``model`` column, and those whose primary key gained it
#: (``REKEYED``: rebuilt on SQLite, re-keyed on PostgreSQL). A store made before keeps its rows under the model it
#: served (its ``meta.model_name``).
MODEL_COLUMN = ("devices", "samples", "versions", "candidates", "param_sets", "rollouts", "device_groups",
                "round_leases")
REKEYED = {"versions": "model, version", "param_sets": "model, params_hash", "round_leases": "model, lineage"}
MODEL_OF_OLD_ROWS = "COALESCE((SELECT value FROM meta WHERE key='model_name'), '')"
IDLE_PING_AFTER_S = 5.0  # a pooled PostgreSQL connection idle longer than this is checked before use
Row = Any  # a mapping from column name to value (sqlite3.Row, or psycopg's dict row)


class Transaction:
    """One unit of work on one connection. Statements use ``?`` placeholders whatever the back end; rows are read
    by column name (name aggregates: ``SELECT MAX(version) AS latest``)."""

    def __init__(self, conn: Any, paramstyle: str, locker=None):
        self.conn = conn
        self._pyformat = paramstyle == "pyformat"
        self._locker = locker

    def sql(self, statement: str) -> str:
        """The statement in the driver's placeholder style."""
        return statement.replace("%", "%%").replace("?", "%s") if self._pyformat else statement

    def execute(self, statement: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement -> the driver's cursor (``rowcount``, ``fetchall``)."""
        return self.conn.execute(self.sql(statement), tuple(params))

    def one(self, statement: str, params: Sequence[Any] = ()) -> Row | None:
        return self.execute(statement, params).fetchone()

    def all(self, statement: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(self.execute(statement, params).fetchall())

    def insert(self, statement: str, params: Sequence[Any] = (), key: str = "id") -> int:
        """An INSERT -> the number the database gave the new row."""
        return int(self.one(f"{statement} RETURNING {key}", params)[key])

    def lock(self, name: str) -> None:
        """Serialize this transaction with every other one taking the same lock, until it ends (read-then-write
        steps such as numbering a version). SQLite write transactions are serial already."""
        if self._locker is not None:
            self._locker(self, name)


class Scope:
    """Which model's rows a store view reads and writes (the model registry, issue 18).

    ``model`` set: every read and write is that model's. ``model`` None, the store as a whole: listings and counts
    cover every model, and what is numbered or keyed per model (versions, lineages, rollouts, parameter sets) is
    the default model's: the first one registered (``meta.model_name``), '' before any is."""

    def __init__(self, db: Database, model: str | None = None):
        self.db = db
        self.model = model

    def key(self) -> str:
        """The model a keyed read or a write is for."""
        if self.model is not None:
            return self.model
        with self.db.reader() as tx:
            row = tx.one("SELECT value FROM meta WHERE key='model_name'")
        return "" if row is None else row["value"]

    def where(self, column: str = "model") -> tuple[str, tuple]:
        """A condition (and its argument) limiting a listing to this view's model; nothing for the whole store."""
        return ("1=1", ()) if self.model is None else (f"{column}=?", (self.model,))


def in_chunks(values: Sequence[Any], size: int = 500) -> Iterator[tuple[str, list[Any]]]:
    """``(placeholders, part)`` for an ``IN (...)`` over a long list, a bounded number of parameters at a time."""
    for i in range(0, len(values), size):
        part = list(values[i : i + size])
        yield ",".join("?" * len(part)), part


class Database(ABC):
    """Where the metadata lives. ``transaction()`` for writes (atomic, serialized where needed), ``reader()`` for
    reads that need no transaction."""

    kind: str

    @abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[Transaction]: ...

    @abstractmethod
    def reader(self) -> contextlib.AbstractContextManager[Transaction]: ...

    @abstractmethod
    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------ SQLite
class SQLiteDatabase(Database):
    """One file in WAL mode (CLI commands can open it while the server runs); one connection per thread, writes
    serialized by a process lock and ``BEGIN IMMEDIATE`` across processes."""

    kind = "sqlite"

    def __init__(self, path: str | Path):
        self.path = private_sqlite(Path(path))  # 0600 (devices, token hashes, statuses)
        self._local = threading.local()
        self.write_lock = threading.RLock()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        with self.write_lock:
            c = self.connection()
            c.executescript(SCHEMA.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL", bytes="BLOB"))
            self._migrate(c)
            self._add_model_columns(c)
            c.executescript(INDEXES)

    @staticmethod
    def _migrate(c: sqlite3.Connection) -> None:
        """A store made before a column in ``ADDED`` existed (token expiry, heartbeat problems, domain signatures
        and groups): its columns added in place."""
        for table, cols in ADDED.items():
            for col, kind in cols:
                if col in {r[1] for r in c.execute(f"PRAGMA table_info({table})")}:
                    continue
                try:
                    c.execute(f"ALTER TABLE {table} ADD COLUMN {col} {kind.format(real='REAL')}")
                except sqlite3.OperationalError:  # another process added it first
                    if col not in {r[1] for r in c.execute(f"PRAGMA table_info({table})")}:
                        raise

    @staticmethod
    def _add_model_columns(c: sqlite3.Connection) -> None:
        """A store made before the model registry: a ``model`` column on every table in ``MODEL_COLUMN``, holding
        the model it served; the tables whose primary key gained it are rebuilt (SQLite cannot alter a key)."""
        def missing() -> list[str]:
            return [t for t in MODEL_COLUMN if "model" not in {r[1] for r in c.execute(f"PRAGMA table_info({t})")}]

        if not missing():
            return
        creates = {t: stmt for t in REKEYED for stmt in
                   SCHEMA.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL", bytes="BLOB").split(";")
                   if stmt.strip().startswith(f"CREATE TABLE IF NOT EXISTS {t}(")}
        c.execute("BEGIN IMMEDIATE")
        try:
            for table in missing():  # again, under the write lock: another process may have migrated meanwhile
                if table not in REKEYED:
                    c.execute(f"ALTER TABLE {table} ADD COLUMN model TEXT NOT NULL DEFAULT ''")
                    c.execute(f"UPDATE {table} SET model={MODEL_OF_OLD_ROWS}")
                    continue
                cols = ", ".join(r[1] for r in c.execute(f"PRAGMA table_info({table})"))
                c.execute(f"ALTER TABLE {table} RENAME TO {table}_before_models")
                c.execute(creates[table])
                c.execute(f"INSERT INTO {table}({cols}, model) SELECT {cols}, {MODEL_OF_OLD_ROWS} "
                          f"FROM {table}_before_models")
                c.execute(f"DROP TABLE {table}_before_models")
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (autocommit; transactions are explicit)."""
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")
            c.execute("PRAGMA busy_timeout=30000")
            c.row_factory = sqlite3.Row
            self._local.conn = c
            with self._conns_lock:
                self._conns.append(c)
        return c

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self.write_lock:
            c = self.connection()
            c.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(c, "qmark")
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:  # never leave this thread's connection inside a failed transaction
                    try:
                        c.execute("ROLLBACK")
                    except sqlite3.Error:  # the first error is the one worth reporting
                        pass
                raise

    @contextlib.contextmanager
    def reader(self) -> Iterator[Transaction]:
        yield Transaction(self.connection(), "qmark")

    def close(self) -> None:
        with self._conns_lock:
            for c in self._conns:
                try:
                    c.close()
                except sqlite3.Error:
                    pass
            self._conns.clear()
        self._local = threading.local()


# ------------------------------------------------------------------------------------------------ PostgreSQL
def _advisory_lock(tx: Transaction, name: str) -> None:
    tx.execute("SELECT pg_advisory_xact_lock(?)", (zlib.crc32(f"edgeadapt:{name}".encode()),))


class PostgresDatabase(Database):
    """PostgreSQL through psycopg 3: a pool of at most ``pool_size`` connections, each transaction on one of them.
    Several cloud processes may share the database; the schema is created under an advisory lock so two starting
    at once do not race. A lost connection raises ``StoreUnavailable`` (503) and is dropped from the pool."""

    kind = "postgresql"

    def __init__(self, url: str, pool_size: int = 8, connect_timeout_s: float = 10.0):
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:  # pragma: no cover - the cloud extra installs it
            raise StoreError("a postgresql:// database needs psycopg 3: pip install 'psycopg[binary]'") from exc
        self.url = url
        self.pool_size = pool_size
        self.connect_timeout_s = connect_timeout_s
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._closed = False
        with self.transaction() as tx:
            tx.lock("schema")
            for statement in SCHEMA.format(serial="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                                           real="DOUBLE PRECISION", bytes="BYTEA").split(";"):
                if statement.strip():
                    tx.execute(statement)
            for table, cols in ADDED.items():  # a database made by an older release
                for col, kind in cols:
                    tx.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {col} "
                               f"{kind.format(real='DOUBLE PRECISION')}")
            have = {(r["table_name"], r["column_name"]) for r in tx.all(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema=current_schema()")}
            for table in MODEL_COLUMN:  # made before the model registry: its rows are the model it served
                if (table, "model") in have:
                    continue
                tx.execute(f"ALTER TABLE {table} ADD COLUMN model TEXT NOT NULL DEFAULT ''")
                tx.execute(f"UPDATE {table} SET model={MODEL_OF_OLD_ROWS}")
                if table in REKEYED:
                    tx.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_pkey")
                    tx.execute(f"ALTER TABLE {table} ADD PRIMARY KEY ({REKEYED[table]})")
            for statement in INDEXES.split(";"):
                if statement.strip():
                    tx.execute(statement)

    def _connect(self):
        import psycopg
        from psycopg.rows import dict_row

        try:
            return psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                                   connect_timeout=int(self.connect_timeout_s))
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"database: {exc}".strip()) from exc

    @contextlib.contextmanager
    def _borrow(self) -> Iterator[Any]:
        import psycopg

        if self._closed:
            raise StoreError("the store is closed")
        if not self._slots.acquire(timeout=60):
            raise StoreUnavailable(f"database: all {self.pool_size} connections busy for 60 s")
        conn = None
        try:
            conn = self._idle_connection() or self._connect()
            try:
                yield conn
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                conn.close()
                conn = None
                raise StoreUnavailable(f"database: {exc}".strip()) from exc
        finally:
            if conn is not None:
                if conn.closed or conn.broken or self._closed:
                    conn.close()
                else:
                    self._idle.put((time.monotonic(), conn))
            self._slots.release()

    def _idle_connection(self) -> Any | None:
        """A pooled connection that still works, or None. One idle for a while is pinged first: after a database
        restart every pooled connection is dead, and a request should not be the one to find out."""
        import psycopg

        while True:
            try:
                since, conn = self._idle.get_nowait()
            except queue.Empty:
                return None
            if time.monotonic() - since < IDLE_PING_AFTER_S:
                return conn
            try:
                conn.execute("SELECT 1")
                return conn
            except psycopg.Error:
                conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._borrow() as conn, conn.transaction():
            yield Transaction(conn, "pyformat", _advisory_lock)

    @contextlib.contextmanager
    def reader(self) -> Iterator[Transaction]:
        with self._borrow() as conn:
            yield Transaction(conn, "pyformat", _advisory_lock)

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait()[1].close()
            except queue.Empty:
                break
