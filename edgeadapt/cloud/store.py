"""Cloud storage behind an interface: samples (``SampleStore``) and everything else (``Store``).

The default ``SQLiteStore`` keeps metadata in SQLite (WAL, so CLI commands can open it while the server
runs) and bulk data in a ``BlobStore`` (a local directory by default; the interface is what an S3-compatible
implementation would fill): uploaded inputs as ``.npy`` (uint8/float16, written and read with
``allow_pickle=False``), parameter versions as safetensors, built update packages. Nothing is ever pickled.

Tokens (devices, admin) are 32 random bytes, url-safe base64; only their sha256 is stored, compared with
``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import secrets
import sqlite3
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeadapt.core.fileperm import private_dir, private_sqlite
from edgeadapt.core.tensorfile import ParamSet, params_from_bytes, params_hash, params_to_bytes


class StoreError(ValueError):
    """A store operation was refused (the message says why)."""


class NotFound(StoreError):
    pass


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, digest: str) -> bool:
    return hmac.compare_digest(hash_token(token), digest)


# ------------------------------------------------------------------------------------------------ records
@dataclass
class Device:
    id: int
    name: str
    created: float
    revoked: float | None = None
    last_seen: float | None = None
    expires: float | None = None  # unix time after which the token is refused (None: never)
    version: int | None = None
    status: str | None = None
    counters: dict = field(default_factory=dict)
    problems: dict = field(default_factory=dict)  # the degraded reasons of its last heartbeat (cleaned strings)
    heartbeat_at: float | None = None  # when its last heartbeat arrived (last_seen: any request)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class NewSample:
    """One upload as the ingest endpoint hands it to the store."""

    sample_id: str
    input: np.ndarray
    logits: np.ndarray
    entropy: float
    ood_score: float
    novel: bool
    param_version: int
    split: str = "train"  # train | holdout | novel


@dataclass
class StoredSample:
    seq: int
    device_id: int
    sample_id: str
    split: str
    novel: bool
    param_version: int
    entropy: float
    ood_score: float
    blob: str
    row: int
    received: float


@dataclass
class VersionRecord:
    version: int
    params_hash: str
    parent: int | None
    created: float
    note: str
    metrics: dict


@dataclass
class CandidateRecord:
    id: int
    created: float
    base_version: int
    status: str  # published | rejected
    version: int | None
    params_hash: str
    reason: str
    metrics: dict


@dataclass
class Rollout:
    id: int
    version: int
    devices: list[str] | None
    fraction: float | None
    created: float
    note: str

    @property
    def scope(self) -> str:
        if self.devices is not None:
            return "devices: " + ",".join(self.devices)
        if self.fraction is not None and self.fraction < 1:
            return f"fraction {self.fraction:g}"
        return "all"

    def covers(self, device_name: str) -> bool:
        if self.devices is not None:
            return device_name in self.devices
        if self.fraction is None or self.fraction >= 1:
            return True
        return in_fraction(self.version, device_name, self.fraction)


def in_fraction(version: int, device_name: str, fraction: float) -> bool:
    """Deterministic membership: a staged rollout of one version grows monotonically with the fraction."""
    h = int.from_bytes(hashlib.sha256(f"{version}:{device_name}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


# ------------------------------------------------------------------------------------------------ blobs
class BlobStore(ABC):
    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...


class LocalBlobStore(BlobStore):
    def __init__(self, root: str | Path):
        try:
            self.root = private_dir(root)
        except OSError:  # broken (e.g. a file in its place): reads of the metadata (`cloud devices`) still work,
            self.root = Path(root)  # blob writes fail, and the cloud's health says why

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"illegal blob key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"blob {key} not found") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# ------------------------------------------------------------------------------------------------ interfaces
class SampleStore(ABC):
    """Uploaded samples: stored once per (device, sample id), inputs as uint8/float16 arrays."""

    @abstractmethod
    def add_samples(self, device_id: int, samples: list[NewSample]) -> tuple[list[str], list[str]]:
        """Store the samples not stored yet; -> (new ids, duplicate ids)."""

    @abstractmethod
    def count_samples(self, split: str | None = None, consumed: bool | None = None) -> int: ...

    @abstractmethod
    def pending_samples(self) -> list[StoredSample]:
        """Training-split samples not trained on yet, oldest first."""

    @abstractmethod
    def mark_consumed(self, seqs: list[int]) -> None: ...

    @abstractmethod
    def recent_samples(self, split: str, limit: int, consumed: bool | None = None) -> list[StoredSample]:
        """The most recent samples of a split, returned oldest first."""

    def recent_samples_per_device(self, split: str, limit_per_device: int) -> list[StoredSample]:
        """Each device's ``limit_per_device`` most recent samples of a split, all returned oldest first (the gate
        draws a holdout no device dominates from these; see ``trainer.cap_device_share``)."""
        out: dict[int, list[StoredSample]] = {}
        for smp in reversed(self.recent_samples(split, 1 << 30)):
            mine = out.setdefault(smp.device_id, [])
            if len(mine) < limit_per_device:
                mine.append(smp)
        return sorted((x for xs in out.values() for x in xs), key=lambda x: x.seq)

    @abstractmethod
    def load_inputs(self, samples: list[StoredSample]) -> list[np.ndarray]: ...

    @abstractmethod
    def oldest_pending_time(self) -> float | None: ...

    @abstractmethod
    def get_batch_response(self, device_id: int, body_sha: str) -> str | None: ...

    @abstractmethod
    def put_batch_response(self, device_id: int, body_sha: str, response: str) -> None: ...


class Store(SampleStore):
    """Devices, versions, candidates, rollouts, packages: the whole cloud state."""

    # meta
    @abstractmethod
    def get_meta(self, key: str) -> str | None: ...

    @abstractmethod
    def set_meta(self, key: str, value: str) -> None: ...

    # devices
    @abstractmethod
    def add_device(self, name: str, expires_in_s: float | None = None) -> str:
        """Register a device; returns its token (shown once, stored hashed), valid for ``expires_in_s`` seconds
        (None: until revoked)."""

    @abstractmethod
    def revoke_device(self, name: str) -> None: ...

    @abstractmethod
    def get_device(self, name: str) -> Device: ...

    @abstractmethod
    def list_devices(self) -> list[Device]: ...

    @abstractmethod
    def authenticate(self, token: str) -> Device | None:
        """The device holding this token, unless revoked or expired; else None."""

    @abstractmethod
    def touch_device(self, device_id: int, version: int | None = None, status: str | None = None,
                     counters: dict | None = None, problems: dict | None = None, heartbeat: bool = False) -> None:
        """Note a request from the device (``last_seen``); a heartbeat also records its status and problems."""

    # versions
    @abstractmethod
    def add_version(self, params: ParamSet, parent: int | None, note: str = "", metrics: dict | None = None,
                    version: int | None = None) -> int: ...

    @abstractmethod
    def get_version(self, version: int) -> VersionRecord: ...

    @abstractmethod
    def get_params(self, version: int) -> ParamSet: ...

    @abstractmethod
    def latest_version(self) -> int | None: ...

    @abstractmethod
    def list_versions(self) -> list[VersionRecord]: ...

    @abstractmethod
    def add_candidate(self, base_version: int, status: str, version: int | None, params_hash_: str, reason: str,
                      metrics: dict) -> int: ...

    @abstractmethod
    def list_candidates(self) -> list[CandidateRecord]: ...

    def finish_round(self, base_version: int, params_hash_: str, metrics: dict, consumed: list[int],
                     params: ParamSet | None = None, reason: str = "", note: str = "",
                     rollout: bool = False, capped: list[int] | None = None) -> tuple[int, int | None]:
        """Record a training round's outcome: publish ``params`` as a new version (rolled out to all devices when
        ``rollout``) or, with ``params=None``, a rejected candidate; and mark the uploads it trained on consumed.
        ``capped``: uploads the round left out because their device exceeded its share (moved to the split
        ``capped``: never trained on, never replayed). -> (candidate id, new version or None). Implementations
        should make this one transaction, so that a crash never leaves uploads marked consumed by a round that
        left no record (or a version without its rollout); this default is not atomic."""
        version = None
        if params is not None:
            version = self.add_version(params, parent=base_version, note=note, metrics=metrics)
            if rollout:
                self.add_rollout(version, note="auto")
        cid = self.add_candidate(base_version, "published" if params is not None else "rejected", version,
                                 params_hash_, reason, metrics)
        self.mark_consumed(consumed)
        self.mark_capped(capped or [])
        return cid, version

    def mark_capped(self, seqs: list[int]) -> None:  # pragma: no cover - SQLiteStore does it in finish_round
        raise NotImplementedError

    # parameter sets a device may hold (exact versions and lossy reconstructions)
    @abstractmethod
    def put_param_set(self, version: int, params: ParamSet) -> str: ...

    @abstractmethod
    def get_param_set(self, phash: str) -> tuple[int, ParamSet] | None: ...

    @abstractmethod
    def record_served(self, device_id: int, version: int, phash: str) -> None: ...

    @abstractmethod
    def served_hash(self, device_id: int, version: int) -> str | None: ...

    # rollouts
    @abstractmethod
    def add_rollout(self, version: int, devices: list[str] | None = None, fraction: float | None = None,
                    note: str = "") -> int: ...

    @abstractmethod
    def list_rollouts(self) -> list[Rollout]: ...

    def target_version(self, device_name: str) -> int | None:
        """The version the newest rollout covering this device assigns, or None (no rollout covers it)."""
        for r in sorted(self.list_rollouts(), key=lambda r: r.id, reverse=True):
            if r.covers(device_name):
                return r.version
        return None

    # packages
    @abstractmethod
    def get_package(self, key: str) -> tuple[bytes, dict] | None: ...

    @abstractmethod
    def put_package(self, key: str, data: bytes, info: dict) -> None: ...

    def close(self) -> None:  # pragma: no cover - default no-op
        pass


# ------------------------------------------------------------------------------------------------ SQLite
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices(
  id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL, token_hash TEXT UNIQUE NOT NULL,
  created REAL NOT NULL, revoked REAL, last_seen REAL, version INTEGER, status TEXT, counters TEXT, expires REAL,
  problems TEXT, heartbeat_at REAL);
CREATE TABLE IF NOT EXISTS samples(
  seq INTEGER PRIMARY KEY AUTOINCREMENT, device_id INTEGER NOT NULL, sample_id TEXT NOT NULL,
  received REAL NOT NULL, split TEXT NOT NULL, consumed INTEGER NOT NULL DEFAULT 0, novel INTEGER NOT NULL,
  param_version INTEGER, entropy REAL, ood_score REAL, logits BLOB, blob TEXT NOT NULL, row INTEGER NOT NULL,
  UNIQUE(device_id, sample_id));
CREATE INDEX IF NOT EXISTS samples_split ON samples(split, consumed, seq);
CREATE TABLE IF NOT EXISTS batches(device_id INTEGER NOT NULL, body_sha TEXT NOT NULL, response TEXT NOT NULL,
  created REAL NOT NULL, PRIMARY KEY(device_id, body_sha));
CREATE TABLE IF NOT EXISTS versions(version INTEGER PRIMARY KEY, params_hash TEXT NOT NULL, parent INTEGER,
  created REAL NOT NULL, note TEXT, metrics TEXT, blob TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates(id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL,
  base_version INTEGER, status TEXT NOT NULL, version INTEGER, params_hash TEXT, reason TEXT, metrics TEXT);
CREATE TABLE IF NOT EXISTS param_sets(params_hash TEXT PRIMARY KEY, version INTEGER NOT NULL, blob TEXT NOT NULL,
  created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS served(device_id INTEGER NOT NULL, version INTEGER NOT NULL, params_hash TEXT NOT NULL,
  created REAL NOT NULL, PRIMARY KEY(device_id, version));
CREATE TABLE IF NOT EXISTS rollouts(id INTEGER PRIMARY KEY AUTOINCREMENT, version INTEGER NOT NULL,
  devices TEXT, fraction REAL, created REAL NOT NULL, note TEXT);
CREATE TABLE IF NOT EXISTS packages(key TEXT PRIMARY KEY, blob TEXT NOT NULL, info TEXT NOT NULL,
  created REAL NOT NULL);
"""

BATCH_RESPONSE_TTL_S = 7 * 86400


class SQLiteStore(Store):
    """SQLite (WAL) metadata + a blob store (``<root>/blobs`` by default)."""

    def __init__(self, root: str | Path, blobs: BlobStore | None = None):
        self.root = private_dir(root)  # 0700; the database 0600 (devices, token hashes, statuses)
        self.db_path = private_sqlite(self.root / "cloud.db")
        self.blobs = blobs or LocalBlobStore(self.root / "blobs")
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._input_cache: dict[str, np.ndarray] = {}
        self._params_cache: dict[str, ParamSet] = {}
        with self._write_lock:
            self._conn().executescript(SCHEMA)
            # a store made before token expiry (and heartbeat problems) existed: its columns added in place
            for col, kind in (("expires", "REAL"), ("problems", "TEXT"), ("heartbeat_at", "REAL")):
                if col in {r[1] for r in self._conn().execute("PRAGMA table_info(devices)")}:
                    continue
                try:
                    self._conn().execute(f"ALTER TABLE devices ADD COLUMN {col} {kind}")
                except sqlite3.OperationalError:  # another process added it first
                    if col not in {r[1] for r in self._conn().execute("PRAGMA table_info(devices)")}:
                        raise

    # -- connections
    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")
            c.execute("PRAGMA busy_timeout=30000")
            c.row_factory = sqlite3.Row
            self._local.conn = c
            with self._conns_lock:
                self._conns.append(c)
        return c

    def _tx(self):
        store = self

        class _Tx:
            def __enter__(self_inner):
                store._write_lock.acquire()
                self_inner.c = store._conn()
                self_inner.c.execute("BEGIN IMMEDIATE")
                return self_inner.c

            def __exit__(self_inner, et, ev, tb):
                try:
                    self_inner.c.execute("COMMIT" if et is None else "ROLLBACK")
                finally:
                    store._write_lock.release()
                return False

        return _Tx()

    def close(self) -> None:
        with self._conns_lock:
            for c in self._conns:
                try:
                    c.close()
                except sqlite3.Error:
                    pass
            self._conns.clear()
        self._local = threading.local()

    # -- meta
    def get_meta(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                      (key, value))

    # -- devices
    @staticmethod
    def _device(row: sqlite3.Row) -> Device:
        return Device(id=row["id"], name=row["name"], created=row["created"], revoked=row["revoked"],
                      last_seen=row["last_seen"], version=row["version"], status=row["status"],
                      counters=json.loads(row["counters"]) if row["counters"] else {}, expires=row["expires"],
                      problems=json.loads(row["problems"]) if row["problems"] else {},
                      heartbeat_at=row["heartbeat_at"])

    def add_device(self, name: str, expires_in_s: float | None = None) -> str:
        if expires_in_s is not None and not expires_in_s > 0:
            raise StoreError(f"expiry must be a positive number of seconds, not {expires_in_s!r}")
        if not name or len(name) > 64 or not all(ch.isalnum() or ch in "-_." for ch in name):
            raise StoreError(f"device name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")
        token = new_token()
        with self._tx() as c:
            if c.execute("SELECT 1 FROM devices WHERE name=?", (name,)).fetchone():
                raise StoreError(f"device {name!r} already exists")
            now = time.time()
            c.execute("INSERT INTO devices(name, token_hash, created, expires) VALUES(?, ?, ?, ?)",
                      (name, hash_token(token), now, None if expires_in_s is None else now + expires_in_s))
        return token

    def revoke_device(self, name: str) -> None:
        with self._tx() as c:
            cur = c.execute("UPDATE devices SET revoked=? WHERE name=? AND revoked IS NULL", (time.time(), name))
            if cur.rowcount == 0 and not c.execute("SELECT 1 FROM devices WHERE name=?", (name,)).fetchone():
                raise NotFound(f"no device named {name!r}")

    def get_device(self, name: str) -> Device:
        row = self._conn().execute("SELECT * FROM devices WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no device named {name!r}")
        return self._device(row)

    def list_devices(self) -> list[Device]:
        return [self._device(r) for r in self._conn().execute("SELECT * FROM devices ORDER BY name")]

    def authenticate(self, token: str) -> Device | None:
        if not token or len(token) > 256:
            return None
        digest = hash_token(token)
        row = self._conn().execute("SELECT * FROM devices WHERE token_hash=?", (digest,)).fetchone()
        if row is None or not hmac.compare_digest(row["token_hash"], digest) or row["revoked"] is not None:
            return None
        if row["expires"] is not None and row["expires"] <= time.time():
            return None
        return self._device(row)

    def touch_device(self, device_id: int, version: int | None = None, status: str | None = None,
                     counters: dict | None = None, problems: dict | None = None, heartbeat: bool = False) -> None:
        now = time.time()
        sets, args = ["last_seen=?"], [now]
        if heartbeat:
            sets.append("heartbeat_at=?")
            args.append(now)
        if problems is not None:
            sets.append("problems=?")
            args.append(json.dumps(problems))
        if version is not None:
            sets.append("version=?")
            args.append(int(version))
        if status is not None:
            sets.append("status=?")
            args.append(status[:200])
        if counters is not None:
            sets.append("counters=?")
            args.append(json.dumps(counters))
        with self._tx() as c:
            c.execute(f"UPDATE devices SET {', '.join(sets)} WHERE id=?", (*args, device_id))

    # -- samples
    def add_samples(self, device_id: int, samples: list[NewSample]) -> tuple[list[str], list[str]]:
        if not samples:
            return [], []
        # de-duplicate within the batch (first occurrence wins)
        seen: dict[str, NewSample] = {}
        in_batch_dups: list[str] = []
        for s in samples:
            if s.sample_id in seen:
                in_batch_dups.append(s.sample_id)
            else:
                seen[s.sample_id] = s
        with self._write_lock:
            c = self._conn()
            ids = list(seen)
            existing: set[str] = set()
            for i in range(0, len(ids), 500):
                part = ids[i : i + 500]
                q = f"SELECT sample_id FROM samples WHERE device_id=? AND sample_id IN ({','.join('?' * len(part))})"
                existing.update(r[0] for r in c.execute(q, (device_id, *part)))
            fresh = [s for s in seen.values() if s.sample_id not in existing]
            # one blob per (dtype, shape) group, written before the rows that point into it
            groups: dict[tuple, list[NewSample]] = {}
            for s in fresh:
                groups.setdefault((str(s.input.dtype), tuple(s.input.shape)), []).append(s)
            placed: dict[str, tuple[str, int]] = {}
            for (_, _), members in groups.items():
                key = f"inputs/{time.strftime('%Y%m%d', time.gmtime())}/{uuid.uuid4().hex}.npy"
                self.blobs.put(key, npy_bytes(np.stack([m.input for m in members])))
                for row, m in enumerate(members):
                    placed[m.sample_id] = (key, row)
            new_ids: list[str] = []
            now = time.time()
            with self._tx() as c:
                for s in fresh:
                    key, row = placed[s.sample_id]
                    cur = c.execute(
                        "INSERT OR IGNORE INTO samples(device_id, sample_id, received, split, novel, param_version, "
                        "entropy, ood_score, logits, blob, row) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
                        (device_id, s.sample_id, now, s.split, int(s.novel), int(s.param_version), float(s.entropy),
                         float(s.ood_score), np.asarray(s.logits, np.float32).tobytes(), key, row))
                    if cur.rowcount:
                        new_ids.append(s.sample_id)
        new_set = set(new_ids)
        dups = [i for i in ids if i not in new_set] + in_batch_dups
        return new_ids, dups

    @staticmethod
    def _sample(row: sqlite3.Row) -> StoredSample:
        return StoredSample(seq=row["seq"], device_id=row["device_id"], sample_id=row["sample_id"],
                            split=row["split"], novel=bool(row["novel"]), param_version=row["param_version"],
                            entropy=row["entropy"], ood_score=row["ood_score"], blob=row["blob"], row=row["row"],
                            received=row["received"])

    def count_samples(self, split: str | None = None, consumed: bool | None = None) -> int:
        q, args = "SELECT COUNT(*) FROM samples WHERE 1=1", []
        if split is not None:
            q += " AND split=?"
            args.append(split)
        if consumed is not None:
            q += " AND consumed=?"
            args.append(int(consumed))
        return int(self._conn().execute(q, args).fetchone()[0])

    def pending_samples(self) -> list[StoredSample]:
        q = "SELECT * FROM samples WHERE split='train' AND consumed=0 ORDER BY seq"
        return [self._sample(r) for r in self._conn().execute(q)]

    def oldest_pending_time(self) -> float | None:
        row = self._conn().execute("SELECT MIN(received) FROM samples WHERE split='train' AND consumed=0").fetchone()
        return None if row is None else row[0]

    def mark_consumed(self, seqs: list[int]) -> None:
        with self._tx() as c:
            for i in range(0, len(seqs), 500):
                part = seqs[i : i + 500]
                c.execute(f"UPDATE samples SET consumed=1 WHERE seq IN ({','.join('?' * len(part))})", part)

    def recent_samples(self, split: str, limit: int, consumed: bool | None = None) -> list[StoredSample]:
        q, args = "SELECT * FROM samples WHERE split=?", [split]
        if consumed is not None:
            q += " AND consumed=?"
            args.append(int(consumed))
        q += f" ORDER BY seq DESC LIMIT {int(limit)}"
        return [self._sample(r) for r in reversed(self._conn().execute(q, args).fetchall())]

    def recent_samples_per_device(self, split: str, limit_per_device: int) -> list[StoredSample]:
        q = ("SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY device_id ORDER BY seq DESC) AS rn "
             "FROM samples WHERE split=?) WHERE rn <= ? ORDER BY seq")
        return [self._sample(r) for r in self._conn().execute(q, (split, int(limit_per_device)))]

    def load_inputs(self, samples: list[StoredSample]) -> list[np.ndarray]:
        out = []
        for s in samples:
            arr = self._input_cache.get(s.blob)
            if arr is None:
                arr = npy_load(self.blobs.get(s.blob))
                if arr.dtype not in (np.uint8, np.float16):
                    raise StoreError(f"blob {s.blob}: unexpected dtype {arr.dtype}")
                if len(self._input_cache) > 4096:
                    self._input_cache.clear()
                self._input_cache[s.blob] = arr
            out.append(arr[s.row])
        return out

    def get_batch_response(self, device_id: int, body_sha: str) -> str | None:
        row = self._conn().execute("SELECT response, created FROM batches WHERE device_id=? AND body_sha=?",
                                   (device_id, body_sha)).fetchone()
        if row is None or row[1] < time.time() - BATCH_RESPONSE_TTL_S:
            return None
        return row[0]

    def put_batch_response(self, device_id: int, body_sha: str, response: str) -> None:
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO batches(device_id, body_sha, response, created) VALUES(?,?,?,?)",
                      (device_id, body_sha, response, time.time()))
            c.execute("DELETE FROM batches WHERE created < ?", (time.time() - BATCH_RESPONSE_TTL_S,))

    # -- versions
    def _load_params_blob(self, key: str) -> ParamSet:
        params = self._params_cache.get(key)
        if params is None:
            params = params_from_bytes(self.blobs.get(key))
            if len(self._params_cache) > 64:
                self._params_cache.clear()
            self._params_cache[key] = params
        return {k: v.copy() for k, v in params.items()}

    def _put_params_blob(self, params: ParamSet) -> tuple[str, str]:
        """Write a version's parameters (content-addressed, before any row names them) -> (hash, blob key)."""
        phash = params_hash(params)
        key = f"params/{phash[:32]}.safetensors"
        self.blobs.put(key, params_to_bytes({k: np.asarray(v, np.float32) for k, v in params.items()}))
        return phash, key

    @staticmethod
    def _insert_version(c: sqlite3.Connection, phash: str, key: str, parent: int | None, note: str,
                        metrics: dict | None, version: int | None) -> int:
        """Inside a write transaction: the number is taken there (other processes, e.g. `cloud push --revert`,
        may add versions too)."""
        if version is None:
            latest = c.execute("SELECT MAX(version) FROM versions").fetchone()[0]
            version = 0 if latest is None else latest + 1
        elif c.execute("SELECT 1 FROM versions WHERE version=?", (version,)).fetchone():
            raise StoreError(f"version {version} already exists")
        c.execute("INSERT INTO versions(version, params_hash, parent, created, note, metrics, blob) "
                  "VALUES(?,?,?,?,?,?,?)",
                  (version, phash, parent, time.time(), note, json.dumps(metrics or {}, default=float), key))
        c.execute("INSERT OR IGNORE INTO param_sets(params_hash, version, blob, created) VALUES(?,?,?,?)",
                  (phash, version, key, time.time()))
        return version

    def add_version(self, params: ParamSet, parent: int | None, note: str = "", metrics: dict | None = None,
                    version: int | None = None) -> int:
        phash, key = self._put_params_blob(params)
        with self._write_lock, self._tx() as c:
            return self._insert_version(c, phash, key, parent, note, metrics, version)

    def finish_round(self, base_version: int, params_hash_: str, metrics: dict, consumed: list[int],
                     params: ParamSet | None = None, reason: str = "", note: str = "",
                     rollout: bool = False, capped: list[int] | None = None) -> tuple[int, int | None]:
        """One transaction: version + its rollout + candidate record + uploads marked consumed or capped (see
        Store)."""
        blob = self._put_params_blob(params) if params is not None else None
        with self._write_lock, self._tx() as c:
            version = None
            if blob is not None:
                version = self._insert_version(c, blob[0], blob[1], base_version, note, metrics, None)
                if rollout:
                    c.execute("INSERT INTO rollouts(version, devices, fraction, created, note) VALUES(?,?,?,?,?)",
                              (version, None, None, time.time(), "auto"))
            cur = c.execute("INSERT INTO candidates(created, base_version, status, version, params_hash, reason, "
                            "metrics) VALUES(?,?,?,?,?,?,?)",
                            (time.time(), base_version, "published" if blob is not None else "rejected", version,
                             params_hash_, reason, json.dumps(metrics, default=float)))
            for i in range(0, len(consumed), 500):
                part = consumed[i : i + 500]
                c.execute(f"UPDATE samples SET consumed=1 WHERE seq IN ({','.join('?' * len(part))})", part)
            capped = capped or []
            for i in range(0, len(capped), 500):
                part = capped[i : i + 500]
                c.execute(f"UPDATE samples SET consumed=1, split='capped' WHERE seq IN ({','.join('?' * len(part))})",
                          part)
            return int(cur.lastrowid), version

    @staticmethod
    def _version(row: sqlite3.Row) -> VersionRecord:
        return VersionRecord(version=row["version"], params_hash=row["params_hash"], parent=row["parent"],
                             created=row["created"], note=row["note"] or "",
                             metrics=json.loads(row["metrics"]) if row["metrics"] else {})

    def get_version(self, version: int) -> VersionRecord:
        row = self._conn().execute("SELECT * FROM versions WHERE version=?", (int(version),)).fetchone()
        if row is None:
            raise NotFound(f"no version {version}")
        return self._version(row)

    def get_params(self, version: int) -> ParamSet:
        row = self._conn().execute("SELECT blob FROM versions WHERE version=?", (int(version),)).fetchone()
        if row is None:
            raise NotFound(f"no version {version}")
        return self._load_params_blob(row[0])

    def latest_version(self) -> int | None:
        row = self._conn().execute("SELECT MAX(version) FROM versions").fetchone()
        return None if row is None else row[0]

    def list_versions(self) -> list[VersionRecord]:
        return [self._version(r) for r in self._conn().execute("SELECT * FROM versions ORDER BY version")]

    def add_candidate(self, base_version: int, status: str, version: int | None, params_hash_: str, reason: str,
                      metrics: dict) -> int:
        with self._tx() as c:
            cur = c.execute("INSERT INTO candidates(created, base_version, status, version, params_hash, reason, "
                            "metrics) VALUES(?,?,?,?,?,?,?)",
                            (time.time(), base_version, status, version, params_hash_, reason,
                             json.dumps(metrics, default=float)))
            return int(cur.lastrowid)

    def list_candidates(self) -> list[CandidateRecord]:
        return [CandidateRecord(id=r["id"], created=r["created"], base_version=r["base_version"], status=r["status"],
                                version=r["version"], params_hash=r["params_hash"] or "", reason=r["reason"] or "",
                                metrics=json.loads(r["metrics"]) if r["metrics"] else {})
                for r in self._conn().execute("SELECT * FROM candidates ORDER BY id")]

    # -- param sets
    def put_param_set(self, version: int, params: ParamSet) -> str:
        phash = params_hash(params)
        if self._conn().execute("SELECT 1 FROM param_sets WHERE params_hash=?", (phash,)).fetchone():
            return phash
        key = f"params/recon-v{version}-{phash[:24]}.safetensors"
        self.blobs.put(key, params_to_bytes({k: np.asarray(v, np.float32) for k, v in params.items()}))
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO param_sets(params_hash, version, blob, created) VALUES(?,?,?,?)",
                      (phash, int(version), key, time.time()))
        return phash

    def get_param_set(self, phash: str) -> tuple[int, ParamSet] | None:
        row = self._conn().execute("SELECT version, blob FROM param_sets WHERE params_hash=?", (phash,)).fetchone()
        if row is None:
            return None
        return int(row[0]), self._load_params_blob(row[1])

    def record_served(self, device_id: int, version: int, phash: str) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO served(device_id, version, params_hash, created) VALUES(?,?,?,?) "
                      "ON CONFLICT(device_id, version) DO UPDATE SET params_hash=excluded.params_hash, "
                      "created=excluded.created", (device_id, int(version), phash, time.time()))

    def served_hash(self, device_id: int, version: int) -> str | None:
        row = self._conn().execute("SELECT params_hash FROM served WHERE device_id=? AND version=?",
                                   (device_id, int(version))).fetchone()
        return None if row is None else row[0]

    # -- rollouts
    def add_rollout(self, version: int, devices: list[str] | None = None, fraction: float | None = None,
                    note: str = "") -> int:
        if devices is not None and fraction is not None:
            raise StoreError("a rollout names devices or a fraction, not both")
        if fraction is not None and not 0 < fraction <= 1:
            raise StoreError(f"rollout fraction must be in (0, 1], not {fraction}")
        self.get_version(version)  # must exist
        with self._tx() as c:
            cur = c.execute("INSERT INTO rollouts(version, devices, fraction, created, note) VALUES(?,?,?,?,?)",
                            (int(version), None if devices is None else json.dumps(sorted(set(devices))), fraction,
                             time.time(), note))
            return int(cur.lastrowid)

    def list_rollouts(self) -> list[Rollout]:
        return [Rollout(id=r["id"], version=r["version"],
                        devices=None if r["devices"] is None else json.loads(r["devices"]),
                        fraction=r["fraction"], created=r["created"], note=r["note"] or "")
                for r in self._conn().execute("SELECT * FROM rollouts ORDER BY id")]

    # -- packages
    def get_package(self, key: str) -> tuple[bytes, dict] | None:
        row = self._conn().execute("SELECT blob, info FROM packages WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        try:
            return self.blobs.get(row[0]), json.loads(row[1])
        except NotFound:
            return None

    def put_package(self, key: str, data: bytes, info: dict) -> None:
        blob = f"packages/{hashlib.sha256(key.encode()).hexdigest()[:32]}.eaup"
        self.blobs.put(blob, data)
        with self._tx() as c:
            c.execute("INSERT INTO packages(key, blob, info, created) VALUES(?,?,?,?) ON CONFLICT(key) DO UPDATE "
                      "SET blob=excluded.blob, info=excluded.info", (key, blob, json.dumps(info), time.time()))


def register_bundle(store: Store, bundle_dir: str | Path):
    """Tie a store to one bundle: record its model name and register its params as version 0 (idempotent).

    Refuses a bundle of another model, or whose version-0 parameters differ from what the store holds."""
    from edgeadapt.core import bundle as B
    from edgeadapt.core.tensorfile import load_params

    manifest = B.read_manifest(bundle_dir)
    params0 = load_params(Path(bundle_dir) / B.PARAMS)
    known = store.get_meta("model_name")
    if known is not None and known != manifest.model_name:
        raise StoreError(f"this store belongs to model {known!r}; bundle {bundle_dir} is {manifest.model_name!r}")
    if store.latest_version() is None:
        store.add_version(params0, parent=None, note="bundle (source)", version=0)
        store.set_meta("model_name", manifest.model_name)
    else:
        have = store.get_version(0).params_hash
        if have != params_hash(params0):
            raise StoreError(f"bundle {bundle_dir}: its parameters differ from version 0 in this store (a different "
                             "export?); use a fresh cloud home or store_dir")
        if known is None:
            store.set_meta("model_name", manifest.model_name)
    return manifest
