"""Parameter versions and what is derived from them: training-round candidates, parameter sets a device may hold
(exact versions and lossy reconstructions: a device names the set it holds by its hash) and built update packages.

Parameters live in blobs (safetensors, content-addressed by their hash), rows name them; a blob is written
before the row that names it. Everything here is per model (``Scope``): each registered model numbers its own
versions from 0 (its bundle's parameters), and trains its own lineages."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np

from edgeadapt.cloud.store.blobs import BlobStore
from edgeadapt.cloud.store.db import Database, Row, Scope, Transaction
from edgeadapt.cloud.store.records import CandidateRecord, NotFound, RoundLost, StoreError, VersionRecord
from edgeadapt.core.tensorfile import ParamSet, params_from_bytes, params_hash, params_to_bytes

PARAMS_CACHE_MAX = 64


class VersionRepository:
    def __init__(self, db: Database, blobs: BlobStore, scope: Scope | None = None,
                 params_cache: dict[str, ParamSet] | None = None):
        self.db = db
        self.blobs = blobs
        self.scope = scope or Scope(db)
        #: blob key -> parameters (blobs never change once written; shared by every model's view)
        self.params_cache: dict[str, ParamSet] = {} if params_cache is None else params_cache

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
                       version: int | None = None, group_id: int | None = None, *, model: str) -> int:
        """Inside ``tx``: the number (``model``'s next) is taken there, under a lock (other processes, e.g. `cloud
        push --revert` or another replica, may add versions too)."""
        tx.lock("versions")
        if version is None:
            latest = tx.one("SELECT MAX(version) AS latest FROM versions WHERE model=?", (model,))["latest"]
            version = 0 if latest is None else latest + 1
        elif tx.one("SELECT 1 AS found FROM versions WHERE model=? AND version=?", (model, int(version))):
            raise StoreError(f"version {version} already exists" + (f" for model {model!r}" if model else ""))
        now = time.time()
        tx.execute("INSERT INTO versions(model, version, params_hash, parent, created, note, metrics, blob, group_id) "
                   "VALUES(?,?,?,?,?,?,?,?,?)", (model, int(version), phash, parent, now, note,
                                                 json.dumps(metrics or {}, default=float), key, group_id))
        tx.execute("INSERT INTO param_sets(model, params_hash, version, blob, created) VALUES(?,?,?,?,?) "
                   "ON CONFLICT(model, params_hash) DO NOTHING", (model, phash, int(version), key, now))
        return int(version)

    def add(self, params: ParamSet, parent: int | None, note: str = "", metrics: dict | None = None,
            version: int | None = None, group_id: int | None = None) -> int:
        phash, key = self.put_params_blob(params)
        model = self.scope.key()
        with self.db.transaction() as tx:
            return self.insert_version(tx, phash, key, parent, note, metrics, version, group_id, model=model)

    @staticmethod
    def _version(row: Row) -> VersionRecord:
        return VersionRecord(version=row["version"], params_hash=row["params_hash"], parent=row["parent"],
                             created=row["created"], note=row["note"] or "",
                             metrics=json.loads(row["metrics"]) if row["metrics"] else {}, group_id=row["group_id"],
                             model=row["model"])

    def _row(self, version: int, columns: str = "*") -> Row:
        model = self.scope.key()
        with self.db.reader() as tx:
            row = tx.one(f"SELECT {columns} FROM versions WHERE model=? AND version=?", (model, int(version)))
        if row is None:
            raise NotFound(f"no version {version}" + (f" of model {model!r}" if model else ""))
        return row

    def get(self, version: int) -> VersionRecord:
        return self._version(self._row(version))

    def params(self, version: int) -> ParamSet:
        return self.load_params_blob(self._row(version, "blob")["blob"])

    def latest(self) -> int | None:
        model = self.scope.key()
        with self.db.reader() as tx:
            return tx.one("SELECT MAX(version) AS latest FROM versions WHERE model=?", (model,))["latest"]

    def latest_in_lineage(self, group_id: int | None) -> int | None:
        """The newest version of a group's lineage (None: of the global one), or None when it has none yet."""
        q = "SELECT MAX(version) AS latest FROM versions WHERE model=? AND " + ("group_id IS NULL" if group_id is None
                                                                                else "group_id=?")
        args = (self.scope.key(),) + (() if group_id is None else (int(group_id),))
        with self.db.reader() as tx:
            return tx.one(q, args)["latest"]

    def list(self) -> list[VersionRecord]:
        cond, args = self.scope.where()
        with self.db.reader() as tx:
            return [self._version(r) for r in tx.all(f"SELECT * FROM versions WHERE {cond} ORDER BY model, version",
                                                      args)]

    # -- training rounds: one worker at a time per lineage, across replicas
    def claim_round(self, lineage: str, holder: str, ttl_s: float) -> bool:
        """Take (or renew) the lease on ``lineage``'s next round for ``ttl_s`` seconds; False while another worker
        holds an unexpired one. One statement, so two workers racing for it cannot both win."""
        now = time.time()
        model = self.scope.key()
        with self.db.transaction() as tx:
            tx.lock("round_leases")  # against a fencing check in flight (PostgreSQL: held until commit)
            tx.execute("INSERT INTO round_leases(model, lineage, holder, expires) VALUES(?,?,?,?) "
                       "ON CONFLICT(model, lineage) DO UPDATE SET holder=excluded.holder, expires=excluded.expires "
                       "WHERE round_leases.holder=? OR round_leases.expires<?",
                       (model, lineage, holder, now + ttl_s, holder, now))
            row = tx.one("SELECT holder FROM round_leases WHERE model=? AND lineage=?", (model, lineage))
        return row is not None and row["holder"] == holder

    def release_round(self, lineage: str, holder: str) -> None:
        model = self.scope.key()
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM round_leases WHERE model=? AND lineage=? AND holder=?", (model, lineage, holder))

    @staticmethod
    def check_round_lease(tx: Transaction, lineage: str, holder: str, *, model: str) -> None:
        """Inside the transaction that records a round: refuse it (``RoundLost``) unless ``holder`` still holds the
        lease (expired but not taken over is still its own)."""
        tx.lock("round_leases")
        row = tx.one("SELECT holder FROM round_leases WHERE model=? AND lineage=?", (model, lineage))
        if row is None or row["holder"] != holder:
            raise RoundLost(f"the round lease on {lineage} is held by {row['holder'] if row else 'nobody'}, not "
                            f"{holder}: another worker trains these uploads")

    # -- candidates
    @staticmethod
    def insert_candidate(tx: Transaction, base_version: int, status: str, version: int | None, params_hash_: str,
                         reason: str, metrics: dict, *, model: str) -> int:
        return tx.insert("INSERT INTO candidates(created, base_version, status, version, params_hash, reason, "
                         "metrics, model) VALUES(?,?,?,?,?,?,?,?)",
                         (time.time(), base_version, status, version, params_hash_, reason,
                          json.dumps(metrics, default=float), model))

    def add_candidate(self, base_version: int, status: str, version: int | None, params_hash_: str, reason: str,
                      metrics: dict) -> int:
        model = self.scope.key()
        with self.db.transaction() as tx:
            return self.insert_candidate(tx, base_version, status, version, params_hash_, reason, metrics, model=model)

    def list_candidates(self) -> list[CandidateRecord]:
        cond, args = self.scope.where()
        with self.db.reader() as tx:
            rows = tx.all(f"SELECT * FROM candidates WHERE {cond} ORDER BY id", args)
        return [CandidateRecord(id=r["id"], created=r["created"], base_version=r["base_version"], status=r["status"],
                                version=r["version"], params_hash=r["params_hash"] or "", reason=r["reason"] or "",
                                metrics=json.loads(r["metrics"]) if r["metrics"] else {}, model=r["model"])
                for r in rows]

    # -- parameter sets a device may hold
    def put_param_set(self, version: int, params: ParamSet) -> str:
        phash = params_hash(params)
        model = self.scope.key()
        with self.db.reader() as tx:
            if tx.one("SELECT 1 AS found FROM param_sets WHERE model=? AND params_hash=?", (model, phash)):
                return phash
        key = f"params/recon-v{version}-{phash[:24]}.safetensors"
        self.blobs.put(key, params_to_bytes({k: np.asarray(v, np.float32) for k, v in params.items()}))
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO param_sets(model, params_hash, version, blob, created) VALUES(?,?,?,?,?) "
                       "ON CONFLICT(model, params_hash) DO NOTHING", (model, phash, int(version), key, time.time()))
        return phash

    def get_param_set(self, phash: str) -> tuple[int, ParamSet] | None:
        model = self.scope.key()
        with self.db.reader() as tx:
            row = tx.one("SELECT version, blob FROM param_sets WHERE model=? AND params_hash=?", (model, phash))
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
