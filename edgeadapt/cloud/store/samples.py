"""Uploaded samples: stored once per (device, sample id), inputs as uint8/float16 arrays in blobs, and the
answers to upload batches kept for idempotent retries. A sample is its device's model's (``Scope``): a model's
view reads only its own."""

from __future__ import annotations

import time
import uuid

import numpy as np

from edgeadapt.cloud.store.blobs import BlobStore, npy_bytes, npy_load
from edgeadapt.cloud.store.db import Database, Row, Scope, Transaction, in_chunks
from edgeadapt.cloud.store.input_cache import InputCache
from edgeadapt.cloud.store.records import NewSample, StoredSample, StoreError

BATCH_RESPONSE_TTL_S = 7 * 86400


class SampleRepository:
    def __init__(self, db: Database, blobs: BlobStore, scope: Scope | None = None,
                 input_cache: InputCache | None = None):
        self.db = db
        self.blobs = blobs
        self.scope = scope or Scope(db)
        #: blob key -> its array, bounded in bytes (the trainer resizes it; one for every model's view)
        self.input_cache = input_cache or InputCache()

    def add(self, device_id: int, samples: list[NewSample]) -> tuple[list[str], list[str]]:
        """Store the samples not stored yet; -> (new ids, duplicate ids)."""
        if not samples:
            return [], []
        seen: dict[str, NewSample] = {}  # de-duplicated within the batch (first occurrence wins)
        in_batch_dups: list[str] = []
        for s in samples:
            if s.sample_id in seen:
                in_batch_dups.append(s.sample_id)
            else:
                seen[s.sample_id] = s
        ids = list(seen)
        existing: set[str] = set()
        with self.db.reader() as tx:
            for marks, part in in_chunks(ids):
                existing.update(r["sample_id"] for r in tx.all(
                    f"SELECT sample_id FROM samples WHERE device_id=? AND sample_id IN ({marks})", (device_id, *part)))
        fresh = [s for s in seen.values() if s.sample_id not in existing]
        # one blob per (dtype, shape) group, written before the rows that point into it
        groups: dict[tuple, list[NewSample]] = {}
        for s in fresh:
            groups.setdefault((str(s.input.dtype), tuple(s.input.shape)), []).append(s)
        placed: dict[str, tuple[str, int]] = {}
        for members in groups.values():
            key = f"inputs/{time.strftime('%Y%m%d', time.gmtime())}/{uuid.uuid4().hex}.npy"
            self.blobs.put(key, npy_bytes(np.stack([m.input for m in members])))
            for row, m in enumerate(members):
                placed[m.sample_id] = (key, row)
        new_ids: list[str] = []
        now = time.time()
        with self.db.reader() as tx:  # the device's model (a sample of an unknown device: this view's)
            owner = tx.one("SELECT model FROM devices WHERE id=?", (device_id,))
        model = owner["model"] if owner is not None else self.scope.key()
        with self.db.transaction() as tx:
            for s in fresh:
                key, row = placed[s.sample_id]
                cur = tx.execute(
                    "INSERT INTO samples(device_id, sample_id, received, split, novel, param_version, entropy, "
                    "ood_score, logits, blob, row, model) VALUES(?,?,?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT(device_id, sample_id) DO NOTHING",
                    (device_id, s.sample_id, now, s.split, int(s.novel), int(s.param_version), float(s.entropy),
                     float(s.ood_score), np.asarray(s.logits, np.float32).tobytes(), key, row, model))
                if cur.rowcount:
                    new_ids.append(s.sample_id)
        new_set = set(new_ids)
        return new_ids, [i for i in ids if i not in new_set] + in_batch_dups

    @staticmethod
    def _sample(row: Row) -> StoredSample:
        return StoredSample(seq=row["seq"], device_id=row["device_id"], sample_id=row["sample_id"],
                            split=row["split"], novel=bool(row["novel"]), param_version=row["param_version"],
                            entropy=row["entropy"], ood_score=row["ood_score"], blob=row["blob"], row=row["row"],
                            received=row["received"])

    def count(self, split: str | None = None, consumed: bool | None = None) -> int:
        cond, scoped = self.scope.where()
        q, args = f"SELECT COUNT(*) AS n FROM samples WHERE {cond}", list(scoped)
        if split is not None:
            q += " AND split=?"
            args.append(split)
        if consumed is not None:
            q += " AND consumed=?"
            args.append(int(consumed))
        with self.db.reader() as tx:
            return int(tx.one(q, args)["n"])

    def pending(self) -> list[StoredSample]:
        """Training-split samples not trained on yet, oldest first."""
        cond, args = self.scope.where()
        with self.db.reader() as tx:
            return [self._sample(r) for r in
                    tx.all(f"SELECT * FROM samples WHERE {cond} AND split='train' AND consumed=0 ORDER BY seq", args)]

    def oldest_pending_time(self) -> float | None:
        cond, args = self.scope.where()
        with self.db.reader() as tx:
            return tx.one(f"SELECT MIN(received) AS oldest FROM samples WHERE {cond} AND split='train' AND "
                          "consumed=0", args)["oldest"]

    @staticmethod
    def mark_consumed_in(tx: Transaction, seqs: list[int], split: str | None = None) -> None:
        """Inside ``tx``: the uploads are trained on (or, with ``split``, moved there and never trained on)."""
        sets, extra = ("consumed=1", ()) if split is None else ("consumed=1, split=?", (split,))
        for marks, part in in_chunks([int(s) for s in seqs]):
            tx.execute(f"UPDATE samples SET {sets} WHERE seq IN ({marks})", (*extra, *part))

    def mark_consumed(self, seqs: list[int]) -> None:
        with self.db.transaction() as tx:
            self.mark_consumed_in(tx, seqs)

    def recent(self, split: str, limit: int, consumed: bool | None = None) -> list[StoredSample]:
        """The most recent samples of a split, returned oldest first."""
        cond, scoped = self.scope.where()
        q, args = f"SELECT * FROM samples WHERE {cond} AND split=?", [*scoped, split]
        if consumed is not None:
            q += " AND consumed=?"
            args.append(int(consumed))
        q += f" ORDER BY seq DESC LIMIT {int(limit)}"
        with self.db.reader() as tx:
            return [self._sample(r) for r in reversed(tx.all(q, args))]

    def recent_per_device(self, split: str, limit_per_device: int) -> list[StoredSample]:
        """Each device's ``limit_per_device`` most recent samples of a split, all returned oldest first (the gate
        draws a holdout no device dominates from these; see ``trainer.cap_device_share``)."""
        cond, args = self.scope.where()
        q = ("SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY device_id ORDER BY seq DESC) AS rn "
             f"FROM samples WHERE {cond} AND split=?) AS ranked WHERE rn <= ? ORDER BY seq")
        with self.db.reader() as tx:
            return [self._sample(r) for r in tx.all(q, (*args, split, int(limit_per_device)))]

    def load_inputs(self, samples: list[StoredSample]) -> list[np.ndarray]:
        """The samples' inputs, from the byte-bounded cache or their blobs (each blob read once per call). The
        rows are copies, so what a caller keeps never pins a whole blob in memory."""
        out = []
        fresh: dict[str, np.ndarray] = {}
        for s in samples:
            arr = fresh.get(s.blob)
            if arr is None:
                arr = self.input_cache.get(s.blob)
            if arr is None:
                arr = npy_load(self.blobs.get(s.blob))
                if arr.dtype not in (np.uint8, np.float16):
                    raise StoreError(f"blob {s.blob}: unexpected dtype {arr.dtype}")
                fresh[s.blob] = arr
                self.input_cache.put(s.blob, arr)
            out.append(arr[s.row].copy())
        return out

    # -- idempotent upload batches
    def get_batch_response(self, device_id: int, body_sha: str) -> str | None:
        with self.db.reader() as tx:
            row = tx.one("SELECT response, created FROM batches WHERE device_id=? AND body_sha=?",
                         (device_id, body_sha))
        if row is None or row["created"] < time.time() - BATCH_RESPONSE_TTL_S:
            return None
        return row["response"]

    def put_batch_response(self, device_id: int, body_sha: str, response: str) -> None:
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO batches(device_id, body_sha, response, created) VALUES(?,?,?,?) "
                       "ON CONFLICT(device_id, body_sha) DO NOTHING", (device_id, body_sha, response, time.time()))
            tx.execute("DELETE FROM batches WHERE created < ?", (time.time() - BATCH_RESPONSE_TTL_S,))
