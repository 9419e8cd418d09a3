"""The model registry's rows (issue 18): one per model this cloud serves, keyed by the bundle's model name (what
devices report). Checking a bundle and a teacher before a model is registered is cloud/registry.py's; this
keeps the rows."""

from __future__ import annotations

import json

from edgeadapt.cloud.store.db import Database, Row
from edgeadapt.cloud.store.records import ModelRecord, NotFound, StoreError


class ModelRepository:
    def __init__(self, db: Database):
        self.db = db

    @staticmethod
    def _model(row: Row) -> ModelRecord:
        return ModelRecord(model=row["model"], bundle=row["bundle"], teacher=row["teacher"],
                           teacher_weights=row["teacher_weights"],
                           teacher_kwargs=json.loads(row["teacher_kwargs"]) if row["teacher_kwargs"] else {},
                           student_model=row["student_model"], input_shape=json.loads(row["input_shape"]),
                           num_classes=int(row["num_classes"]), params_hash=row["params_hash"],
                           created=row["created"])

    def add(self, rec: ModelRecord, replace: bool = False) -> None:
        """Register a model; an existing one is refused unless ``replace`` (the configured model at each start:
        its bundle path and teacher may have changed, its parameters are checked by the caller)."""
        values = (rec.model, rec.bundle, rec.teacher, rec.teacher_weights, json.dumps(rec.teacher_kwargs or {}),
                  rec.student_model, json.dumps(list(rec.input_shape)), int(rec.num_classes), rec.params_hash,
                  rec.created)
        with self.db.transaction() as tx:
            tx.lock("models")
            old = tx.one("SELECT bundle FROM models WHERE model=?", (rec.model,))
            if old is not None and not replace:
                raise StoreError(f"model {rec.model!r} is already registered (bundle {old['bundle']})")
            tx.execute("INSERT INTO models(model, bundle, teacher, teacher_weights, teacher_kwargs, student_model, "
                       "input_shape, num_classes, params_hash, created) VALUES(?,?,?,?,?,?,?,?,?,?) "
                       "ON CONFLICT(model) DO UPDATE SET bundle=excluded.bundle, teacher=excluded.teacher, "
                       "teacher_weights=excluded.teacher_weights, teacher_kwargs=excluded.teacher_kwargs, "
                       "student_model=excluded.student_model", values)

    def get(self, model: str) -> ModelRecord:
        with self.db.reader() as tx:
            row = tx.one("SELECT * FROM models WHERE model=?", (model,))
        if row is None:
            known = [m.model for m in self.list()]
            raise NotFound(f"no model {model!r} registered" + (f" (registered: {', '.join(known)})" if known
                                                               else " (none is: `edgeadapt cloud models add`)"))
        return self._model(row)

    def list(self) -> list[ModelRecord]:
        with self.db.reader() as tx:
            return [self._model(r) for r in tx.all("SELECT * FROM models ORDER BY created, model")]

    def resolve(self, model: str | None) -> str:
        """The model a command means: ``model`` when registered; with none named, the only one registered (''
        while none is: a device added before the first `cloud serve` runs the first model registered)."""
        if model:
            return self.get(model).model
        known = [m.model for m in self.list()]
        if len(known) > 1:
            raise StoreError(f"this cloud serves {len(known)} models ({', '.join(known)}): name one with --model")
        return known[0] if known else ""

    def stats(self) -> dict[str, dict[str, int]]:
        """Per model: devices, versions, pending uploads (``cloud models``)."""
        out: dict[str, dict[str, int]] = {}
        with self.db.reader() as tx:
            for key, q in (("devices", "SELECT model, COUNT(*) AS n FROM devices WHERE revoked IS NULL GROUP BY model"),
                           ("versions", "SELECT model, COUNT(*) AS n FROM versions GROUP BY model"),
                           ("pending", "SELECT model, COUNT(*) AS n FROM samples WHERE split='train' AND consumed=0 "
                                       "GROUP BY model")):
                for r in tx.all(q):
                    out.setdefault(r["model"], {})[key] = int(r["n"])
        return out
