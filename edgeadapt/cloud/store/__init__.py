"""The cloud store: repositories for samples, versions and the fleet over one transaction type, on one of two
back ends.

- ``SQLiteStore``: SQLite (WAL) + a blob directory, the embedded default (``<home>/store``).
- ``PostgresStore``: PostgreSQL (psycopg 3) + an S3-compatible object store (boto3), which several
  ``cloud serve`` replicas can share.

The repositories (``samples``, ``versions``, ``fleet``, ``models``) hold the SQL, written once for both back ends
(see ``db``); ``Store`` composes them, keeps the flat methods the service, trainer, server and CLI call, and owns
the one step that spans repositories, ``finish_round``. Several models share one store (the registry, issue 18):
``store.scoped(model)`` is the view of one model's samples, versions, lineages, rollouts and devices, and the
store itself reads every model's and numbers versions for the default one (``db.Scope``). Bulk data lives in blobs: uploaded inputs as ``.npy``
(uint8/float16, ``allow_pickle=False``), parameter versions as safetensors, built update packages. Nothing is
ever pickled.
"""

from __future__ import annotations

import copy
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import numpy as np

from edgeadapt.cloud.store.blobs import BlobStore, LocalBlobStore, S3BlobStore, npy_bytes, npy_load, open_blob_store
from edgeadapt.cloud.store.db import Database, PostgresDatabase, Scope, SQLiteDatabase, Transaction
from edgeadapt.cloud.store.fleet import FleetRepository
from edgeadapt.cloud.store.input_cache import InputCache
from edgeadapt.cloud.store.models import ModelRepository
from edgeadapt.cloud.store.records import (
    CandidateRecord,
    Device,
    DeviceGroup,
    ModelRecord,
    NewSample,
    NotFound,
    Rollout,
    RoundLost,
    StoredSample,
    StoreError,
    StoreUnavailable,
    VersionRecord,
    hash_token,
    in_fraction,
    new_token,
    token_matches,
)
from edgeadapt.cloud.store.samples import BATCH_RESPONSE_TTL_S, SampleRepository
from edgeadapt.cloud.store.versions import VersionRepository
from edgeadapt.core.fileperm import private_dir
from edgeadapt.core.tensorfile import ParamSet, params_hash

__all__ = ["BATCH_RESPONSE_TTL_S", "BlobStore", "CandidateRecord", "Database", "Device", "DeviceGroup", "FleetRepository",
           "LocalBlobStore", "ModelRecord", "ModelRepository", "NewSample", "NotFound", "PostgresDatabase", "PostgresStore", "Rollout", "RoundLost", "S3BlobStore",
           "SQLiteDatabase", "SQLiteStore", "SampleRepository", "Scope", "Store", "StoreError", "StoreUnavailable",
           "StoredSample", "Transaction", "VersionRecord", "VersionRepository", "hash_token", "in_fraction",
           "new_token", "npy_bytes", "npy_load", "open_blob_store", "open_store", "redact_url", "register_bundle",
           "token_matches"]


class Store:
    """Everything the cloud keeps: ``samples``, ``versions`` (candidates, parameter sets, packages), ``fleet``
    (meta, devices, heartbeats, rollouts) and ``models`` (the registry), over one database and one blob store.
    ``model``: the one model this view reads and writes (None: the whole store; see ``db.Scope``)."""

    def __init__(self, db: Database, blobs: BlobStore, model: str | None = None):
        self.db = db
        self.blobs = blobs
        self.models = ModelRepository(db)
        self._bind(model, InputCache(), {})

    def _bind(self, model: str | None, input_cache: InputCache, params_cache: dict) -> None:
        self.scope = Scope(self.db, model)
        self.samples = SampleRepository(self.db, self.blobs, self.scope, input_cache)
        self.versions = VersionRepository(self.db, self.blobs, self.scope, params_cache)
        self.fleet = FleetRepository(self.db, self.scope)

    @property
    def model(self) -> str | None:
        return self.scope.model

    def scoped(self, model: str) -> Store:
        """The view of one model: its samples, versions, lineages, rollouts and devices only (the same database,
        blobs and caches; closing either closes both)."""
        view = copy.copy(self)
        view._bind(model, self.samples.input_cache, self.versions.params_cache)
        return view

    def describe(self) -> str:
        """Where this store keeps things, for logs (no passwords)."""
        return f"{self.db.kind} metadata, blobs in {getattr(self.blobs, 'url', None) or self.blobs.root}"

    def _tx(self):
        """A write transaction on the store's database (tests and repairs that edit rows directly)."""
        return self.db.transaction()

    @property
    def _input_cache(self) -> InputCache:
        return self.samples.input_cache

    # -- the step that spans repositories
    def finish_round(self, base_version: int, params_hash_: str, metrics: dict, consumed: list[int],
                     params: ParamSet | None = None, reason: str = "", note: str = "",
                     rollout: bool = False, capped: list[int] | None = None,
                     group_id: int | None = None, lease: tuple[str, str] | None = None) -> tuple[int, int | None]:
        """Record a training round's outcome in one transaction: publish ``params`` as a new version (rolled out to
        all devices when ``rollout``; with ``group_id``: into that group's lineage, rolled out to its members) or, with ``params=None``, a rejected candidate; and mark the uploads it
        trained on consumed. ``capped``: uploads the round left out because their device exceeded its share (moved
        to the split ``capped``: never trained on, never replayed). A crash never leaves uploads marked consumed by
        a round that left no record, or a version without its rollout. ``lease`` (lineage, holder): recorded only
        while that worker still holds the round's lease, else ``RoundLost`` and nothing is written.
        -> (candidate id, new version or None)."""
        blob = self.versions.put_params_blob(params) if params is not None else None
        model = self.scope.key()
        with self.db.transaction() as tx:
            if lease is not None:
                self.versions.check_round_lease(tx, *lease, model=model)
            version = None
            if blob is not None:
                version = self.versions.insert_version(tx, blob[0], blob[1], base_version, note, metrics,
                                                       group_id=group_id, model=model)
                if rollout:
                    self.fleet.insert_rollout(tx, version, note="auto", group_id=group_id, model=model)
            cid = self.versions.insert_candidate(tx, base_version, "published" if blob is not None else "rejected",
                                                 version, params_hash_, reason, metrics, model=model)
            self.samples.mark_consumed_in(tx, consumed)
            self.samples.mark_consumed_in(tx, capped or [], split="capped")
            return cid, version

    def claim_round(self, lineage: str, holder: str, ttl_s: float) -> bool:
        return self.versions.claim_round(lineage, holder, ttl_s)

    def release_round(self, lineage: str, holder: str) -> None:
        self.versions.release_round(lineage, holder)

    # -- samples
    def add_samples(self, device_id: int, samples: list[NewSample]) -> tuple[list[str], list[str]]:
        """Store the samples not stored yet; -> (new ids, duplicate ids)."""
        return self.samples.add(device_id, samples)

    def count_samples(self, split: str | None = None, consumed: bool | None = None) -> int:
        return self.samples.count(split, consumed)

    def pending_samples(self) -> list[StoredSample]:
        return self.samples.pending()

    def mark_consumed(self, seqs: list[int]) -> None:
        self.samples.mark_consumed(seqs)

    def recent_samples(self, split: str, limit: int, consumed: bool | None = None) -> list[StoredSample]:
        return self.samples.recent(split, limit, consumed)

    def recent_samples_per_device(self, split: str, limit_per_device: int) -> list[StoredSample]:
        return self.samples.recent_per_device(split, limit_per_device)

    def load_inputs(self, samples: list[StoredSample]) -> list[np.ndarray]:
        return self.samples.load_inputs(samples)

    def oldest_pending_time(self) -> float | None:
        return self.samples.oldest_pending_time()

    def get_batch_response(self, device_id: int, body_sha: str) -> str | None:
        return self.samples.get_batch_response(device_id, body_sha)

    def put_batch_response(self, device_id: int, body_sha: str, response: str) -> None:
        self.samples.put_batch_response(device_id, body_sha, response)

    # -- fleet
    def get_meta(self, key: str) -> str | None:
        return self.fleet.get_meta(key)

    def set_meta(self, key: str, value: str) -> None:
        self.fleet.set_meta(key, value)

    def add_device(self, name: str, expires_in_s: float | None = None, model: str | None = None) -> str:
        """Register a device for ``model``: this view's; for the whole store, the only model registered (an error
        when several are and none is named; '' before any is, bound to the first one registered)."""
        if model is not None:
            model = self.models.get(model).model
        elif self.model is None:
            model = self.models.resolve(None)
        return self.fleet.add_device(name, expires_in_s, model)

    def revoke_device(self, name: str) -> None:
        self.fleet.revoke_device(name)

    def get_device(self, name: str) -> Device:
        return self.fleet.get_device(name)

    def list_devices(self) -> list[Device]:
        return self.fleet.list_devices()

    def authenticate(self, token: str) -> Device | None:
        return self.fleet.authenticate(token)

    def touch_device(self, device_id: int, version: int | None = None, status: str | None = None,
                     counters: dict | None = None, problems: dict | None = None, heartbeat: bool = False) -> None:
        self.fleet.touch_device(device_id, version, status, counters, problems, heartbeat)

    def add_rollout(self, version: int, devices: list[str] | None = None, fraction: float | None = None,
                    note: str = "", group_id: int | None = None) -> int:
        return self.fleet.add_rollout(version, devices, fraction, note, group_id)

    def list_rollouts(self) -> list[Rollout]:
        return self.fleet.list_rollouts()

    def target_version(self, device_name: str, group_id: int | None = None) -> int | None:
        return self.fleet.target_version(device_name, group_id)

    # -- versions
    def add_version(self, params: ParamSet, parent: int | None, note: str = "", metrics: dict | None = None,
                    version: int | None = None, group_id: int | None = None) -> int:
        return self.versions.add(params, parent, note, metrics, version, group_id)

    def get_version(self, version: int) -> VersionRecord:
        return self.versions.get(version)

    def get_params(self, version: int) -> ParamSet:
        return self.versions.params(version)

    def latest_version(self) -> int | None:
        return self.versions.latest()

    def list_versions(self) -> list[VersionRecord]:
        return self.versions.list()

    def add_candidate(self, base_version: int, status: str, version: int | None, params_hash_: str, reason: str,
                      metrics: dict) -> int:
        return self.versions.add_candidate(base_version, status, version, params_hash_, reason, metrics)

    def list_candidates(self) -> list[CandidateRecord]:
        return self.versions.list_candidates()

    def put_param_set(self, version: int, params: ParamSet) -> str:
        return self.versions.put_param_set(version, params)

    def get_param_set(self, phash: str) -> tuple[int, ParamSet] | None:
        return self.versions.get_param_set(phash)

    def get_package(self, key: str) -> tuple[bytes, dict] | None:
        return self.versions.get_package(key)

    def put_package(self, key: str, data: bytes, info: dict) -> None:
        self.versions.put_package(key, data, info)

    def close(self) -> None:
        self.db.close()
        self.blobs.close()


class SQLiteStore(Store):
    """The embedded default: ``<root>/cloud.db`` (SQLite, WAL) + a blob store (``<root>/blobs`` by default)."""

    def __init__(self, root: str | Path, blobs: BlobStore | None = None):
        self.root = private_dir(root)  # 0700; the database 0600 (devices, token hashes, statuses)
        self.db_path = self.root / "cloud.db"
        super().__init__(SQLiteDatabase(self.db_path), blobs or LocalBlobStore(self.root / "blobs"))

    def _conn(self):
        """This thread's SQLite connection (tests that read rows directly)."""
        return self.db.connection()


class PostgresStore(Store):
    """PostgreSQL at ``url`` (``postgresql://user:pass@host:port/dbname``) + a shared blob store (S3-compatible
    for several replicas)."""

    def __init__(self, url: str, blobs: BlobStore, pool_size: int = 8):
        self.url = url
        super().__init__(PostgresDatabase(url, pool_size=pool_size), blobs)

    def describe(self) -> str:
        return f"postgresql {redact_url(self.url)}, blobs in {getattr(self.blobs, 'url', None) or self.blobs.root}"


def redact_url(url: str) -> str:
    """The URL without its password (for logs and health)."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
    return urlunparse(parsed._replace(netloc=netloc))


def open_store(store_dir: str | Path, database_url: str | None = None, blob_url: str | None = None,
               blob_endpoint_url: str | None = None) -> Store:
    """The store a cloud config names: SQLite in ``store_dir`` unless ``database_url`` is ``postgresql://...``;
    blobs under ``blob_url`` (``s3://bucket/prefix`` or a directory), by default ``<store_dir>/blobs``."""
    blobs = open_blob_store(blob_url, blob_endpoint_url) if blob_url else None
    if not database_url:
        return SQLiteStore(store_dir, blobs)
    if urlparse(database_url).scheme not in ("postgresql", "postgres"):
        raise StoreError(f"database URL {redact_url(database_url)!r}: only postgresql:// is supported (leave it unset "
                         "for the embedded SQLite store)")
    return PostgresStore(database_url, blobs or LocalBlobStore(Path(store_dir) / "blobs"))


def register_bundle(store: Store, bundle_dir: str | Path, teacher: str | None = None,
                    teacher_weights: str | None = None, teacher_kwargs: dict | None = None,
                    student_model: str | None = None, new: bool = False):
    """Register a bundle's model (idempotent unless ``new``): its row in the registry (keyed by the bundle's model
    name, as devices report it) and its parameters as the model's version 0. Teacher fields left None keep what
    the registry holds. The first model registered is the store's default (``meta.model_name``); devices added
    before it run it.

    Refuses a bundle whose version-0 parameters differ from what the store holds for that model, and (``new``) a
    model already registered. -> the bundle's manifest."""
    import time

    from edgeadapt.core import bundle as B
    from edgeadapt.core.tensorfile import load_params

    manifest = B.read_manifest(bundle_dir)
    model = manifest.model_name
    if store.model is not None and store.model != model:
        raise StoreError(f"bundle {bundle_dir} is model {model!r}, not {store.model!r}")
    known = {m.model: m for m in store.models.list()}
    if new and model in known:
        raise StoreError(f"model {model!r} is already registered (bundle {known[model].bundle})")
    view = store.scoped(model)
    params0 = load_params(Path(bundle_dir) / B.PARAMS)
    if view.latest_version() is None:
        try:
            view.add_version(params0, parent=None, note="bundle (source)", version=0)
        except StoreError:  # another replica registered it first: checked below like any existing version 0
            if view.latest_version() is None:
                raise
    have = view.get_version(0).params_hash
    if have != params_hash(params0):
        raise StoreError(f"bundle {bundle_dir}: its parameters differ from version 0 of model {model!r} in this "
                         "store (a different export under the same model name?); use a fresh cloud home or "
                         "store_dir, or export it under another model name")
    old = known.get(model)

    def keep(value, field: str):
        return value if value is not None else getattr(old, field) if old is not None else None

    store.models.add(ModelRecord(model=model, bundle=str(Path(bundle_dir).expanduser().resolve()),
                                 teacher=keep(teacher, "teacher"), teacher_weights=keep(teacher_weights,
                                                                                        "teacher_weights"),
                                 teacher_kwargs=keep(teacher_kwargs, "teacher_kwargs") or {},
                                 student_model=keep(student_model, "student_model"),
                                 input_shape=list(manifest.input.shape), num_classes=manifest.num_classes,
                                 params_hash=have, created=old.created if old is not None else time.time()),
                     replace=not new)
    if store.get_meta("model_name") is None:
        store.set_meta("model_name", model)
        store.fleet.bind_unassigned_devices(model)
    return manifest
