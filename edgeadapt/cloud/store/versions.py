"""Parameter versions and what is derived from them: training-round candidates, parameter sets a device may hold
(exact versions and lossy reconstructions: a device names the set it holds by its hash) and built update packages.

Parameters live in blobs (safetensors, content-addressed by their hash), rows name them; a blob is written
before the row that names it."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np

from edgeadapt.cloud.store.blobs import BlobStore
from edgeadapt.cloud.store.db import Database, Row, Transaction
from edgeadapt.cloud.store.records import CandidateRecord, NotFound, RoundLost, StoreError, VersionRecord
from edgeadapt.core.tensorfile import ParamSet, params_from_bytes, params_hash, params_to_bytes

PARAMS_CACHE_MAX = 64


class VersionRepository:
    def __init__(self, db: Database, blobs: BlobStore):
        self.db = db
        self.blobs = blobs
        self.params_cache: dict[str, ParamSet] = {}  # blob key -> parameters (blobs never change once written)

    # -- parameter blobs
    def load_params_blob(self, key: str) -> ParamSet:
        params = self.params_cache.get(key)
        if params is None:
            params = params_from_bytes(self.blobs.get(key))
            if len(self.params_cache) > PARAMS_CACHE_MAX:
                self.params_cache.clear()
            self.params_cache[key] = params
        return {k: v.copy() for k, v in params.items()}

    def put_params_blob(self, params: ParamSet) -> tuple[str, str]:
        """Write a version's parameters (content-addressed, before any row names them) -> (hash, blob key)."""
        phash = params_hash(params)
        key = f"params/{phash[:32]}.safetensors"
        self.blobs.put(key, params_to_bytes({k: np.asarray(v, np.float32) for k, v in params.items()}))
        return phash, key

    # -- versions
    @staticmethod
    def insert_version(tx: Transaction, phash: str, key: str, parent: int | None, note: str, metrics: dict | None,
                       version: int | None = None, group_id: int | None = None) -> int:
        """Inside ``tx``: the number is taken there, under a lock (other processes, e.g. `cloud push --revert` or
        another replica, may add versions too)."""
        tx.lock("versions")
        if version is None:
            latest = tx.one("SELECT MAX(version) AS latest FROM versions")["latest"]
            version = 0 if latest is None else latest + 1
        elif tx.one("SELECT 1 AS found FROM versions WHERE version=?", (int(version),)):
            raise StoreError(f"version {version} already exists")
        now = time.time()
        tx.execute("INSERT INTO versions(version, params_hash, parent, created, note, metrics, blob, group_id) "
                   "VALUES(?,?,?,?,?,?,?,?)",
                   (int(version), phash, parent, now, note, json.dumps(metrics or {}, default=float), key, group_id))
        tx.execute("INSERT INTO param_sets(params_hash, version, blob, created) VALUES(?,?,?,?) "
                   "ON CONFLICT(params_hash) DO NOTHING", (phash, int(version), key, now))
        return int(version)

    def add(self, params: ParamSet, parent: int | None, note: str = "", metrics: dict | None = None,
            version: int | None = None, group_id: int | None = None) -> int:
        phash, key = self.put_params_blob(params)
        with self.db.transaction() as tx:
            return self.insert_version(tx, phash, key, parent, note, metrics, version, group_id)

    @staticmethod
    def _version(row: Row) -> VersionRecord:
        return VersionRecord(version=row["version"], params_hash=row["params_hash"], parent=row["parent"],
                             created=row["created"], note=row["note"] or "",
                             metrics=json.loads(row["metrics"]) if row["metrics"] else {}, group_id=row["group_id"])

    def get(self, version: int) -> VersionRecord:
        with self.db.reader() as tx:
            row = tx.one("SELECT * FROM versions WHERE version=?", (int(version),))
        if row is None:
            raise NotFound(f"no version {version}")
        return self._version(row)

    def params(self, version: int) -> ParamSet:
        with self.db.reader() as tx:
            row = tx.one("SELECT blob FROM versions WHERE version=?", (int(version),))
        if row is None:
            raise NotFound(f"no version {version}")
        return self.load_params_blob(row["blob"])

    def latest(self) -> int | None:
        with self.db.reader() as tx:
            return tx.one("SELECT MAX(version) AS latest FROM versions")["latest"]

    def latest_in_lineage(self, group_id: int | None) -> int | None:
        """The newest version of a group's lineage (None: of the global one), or None when it has none yet."""
        q = "SELECT MAX(version) AS latest FROM versions WHERE " + ("group_id IS NULL" if group_id is None
                                                                    else "group_id=?")
        with self.db.reader() as tx:
            return tx.one(q, () if group_id is None else (int(group_id),))["latest"]

    def list(self) -> list[VersionRecord]:
        with self.db.reader() as tx:
            return [self._version(r) for r in tx.all("SELECT * FROM versions ORDER BY version")]

    # -- training rounds: one worker at a time per lineage, across replicas
    def claim_round(self, lineage: str, holder: str, ttl_s: float) -> bool:
        """Take (or renew) the lease on ``lineage``'s next round for ``ttl_s`` seconds; False while another worker
        holds an unexpired one. One statement, so two workers racing for it cannot both win."""
        now = time.time()
        with self.db.transaction() as tx:
            tx.lock("round_leases")  # against a fencing check in flight (PostgreSQL: held until commit)
            tx.execute("INSERT INTO round_leases(lineage, holder, expires) VALUES(?,?,?) ON CONFLICT(lineage) DO "
                       "UPDATE SET holder=excluded.holder, expires=excluded.expires "
                       "WHERE round_leases.holder=? OR round_leases.expires<?",
                       (lineage, holder, now + ttl_s, holder, now))
            row = tx.one("SELECT holder FROM round_leases WHERE lineage=?", (lineage,))
        return row is not None and row["holder"] == holder

    def release_round(self, lineage: str, holder: str) -> None:
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM round_leases WHERE lineage=? AND holder=?", (lineage, holder))

    @staticmethod
    def check_round_lease(tx: Transaction, lineage: str, holder: str) -> None:
        """Inside the transaction that records a round: refuse it (``RoundLost``) unless ``holder`` still holds the
        lease (expired but not taken over is still its own)."""
        tx.lock("round_leases")
        row = tx.one("SELECT holder FROM round_leases WHERE lineage=?", (lineage,))
        if row is None or row["holder"] != holder:
            raise RoundLost(f"the round lease on {lineage} is held by {row['holder'] if row else 'nobody'}, not "
                            f"{holder}: another worker trains these uploads")

    # -- candidates
    @staticmethod
    def insert_candidate(tx: Transaction, base_version: int, status: str, version: int | None, params_hash_: str,
                         reason: str, metrics: dict) -> int:
        return tx.insert("INSERT INTO candidates(created, base_version, status, version, params_hash, reason, "
                         "metrics) VALUES(?,?,?,?,?,?,?)",
                         (time.time(), base_version, status, version, params_hash_, reason,
                          json.dumps(metrics, default=float)))

    def add_candidate(self, base_version: int, status: str, version: int | None, params_hash_: str, reason: str,
                      metrics: dict) -> int:
        with self.db.transaction() as tx:
            return self.insert_candidate(tx, base_version, status, version, params_hash_, reason, metrics)

    def list_candidates(self) -> list[CandidateRecord]:
        with self.db.reader() as tx:
            rows = tx.all("SELECT * FROM candidates ORDER BY id")
        return [CandidateRecord(id=r["id"], created=r["created"], base_version=r["base_version"], status=r["status"],
                                version=r["version"], params_hash=r["params_hash"] or "", reason=r["reason"] or "",
                                metrics=json.loads(r["metrics"]) if r["metrics"] else {}) for r in rows]

    # -- parameter sets a device may hold
    def put_param_set(self, version: int, params: ParamSet) -> str:
        phash = params_hash(params)
        with self.db.reader() as tx:
            if tx.one("SELECT 1 AS found FROM param_sets WHERE params_hash=?", (phash,)):
                return phash
        key = f"params/recon-v{version}-{phash[:24]}.safetensors"
        self.blobs.put(key, params_to_bytes({k: np.asarray(v, np.float32) for k, v in params.items()}))
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO param_sets(params_hash, version, blob, created) VALUES(?,?,?,?) "
                       "ON CONFLICT(params_hash) DO NOTHING", (phash, int(version), key, time.time()))
        return phash

    def get_param_set(self, phash: str) -> tuple[int, ParamSet] | None:
        with self.db.reader() as tx:
            row = tx.one("SELECT version, blob FROM param_sets WHERE params_hash=?", (phash,))
        if row is None:
            return None
        return int(row["version"]), self.load_params_blob(row["blob"])

    # -- packages
    def get_package(self, key: str) -> tuple[bytes, dict] | None:
        with self.db.reader() as tx:
            row = tx.one("SELECT blob, info FROM packages WHERE key=?", (key,))
        if row is None:
            return None
        try:
            return self.blobs.get(row["blob"]), json.loads(row["info"])
        except NotFound:
            return None

    def put_package(self, key: str, data: bytes, info: dict) -> None:
        blob = f"packages/{hashlib.sha256(key.encode()).hexdigest()[:32]}.eaup"
        self.blobs.put(blob, data)
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO packages(key, blob, info, created) VALUES(?,?,?,?) ON CONFLICT(key) DO UPDATE "
                       "SET blob=excluded.blob, info=excluded.info", (key, blob, json.dumps(info), time.time()))
