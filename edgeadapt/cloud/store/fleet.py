"""The fleet: meta (``model_name``: the first model registered, the default), devices and their tokens (each
registered for one model), heartbeats, domain signatures and groups of similar devices, rollouts. Devices, groups
and rollouts belong to a model (``Scope``); a token or a device name is unique across models."""

from __future__ import annotations

import hmac
import json
import math
import time

from edgeadapt.cloud.store.db import Database, Row, Scope, Transaction
from edgeadapt.cloud.store.records import (
    Device,
    DeviceGroup,
    NotFound,
    Rollout,
    StoreError,
    hash_token,
    new_token,
)


class FleetRepository:
    def __init__(self, db: Database, scope: Scope | None = None):
        self.db = db
        self.scope = scope or Scope(db)

    # -- meta (e.g. the model name this store belongs to)
    def get_meta(self, key: str) -> str | None:
        with self.db.reader() as tx:
            row = tx.one("SELECT value FROM meta WHERE key=?", (key,))
        return None if row is None else row["value"]

    def set_meta(self, key: str, value: str) -> None:
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                       (key, value))

    # -- devices
    @staticmethod
    def _device(row: Row) -> Device:
        sig = json.loads(row["signature"]) if row["signature"] else {}
        return Device(id=row["id"], name=row["name"], created=row["created"], revoked=row["revoked"],
                      last_seen=row["last_seen"], version=row["version"], status=row["status"],
                      counters=json.loads(row["counters"]) if row["counters"] else {}, expires=row["expires"],
                      problems=json.loads(row["problems"]) if row["problems"] else {},
                      heartbeat_at=row["heartbeat_at"], signature=sig.get("values"),
                      signature_at=row["signature_at"], signature_entropy=sig.get("entropy"),
                      group_id=row["group_id"], model=row["model"])

    def add_device(self, name: str, expires_in_s: float | None = None, model: str | None = None) -> str:
        """Register a device for ``model`` (default: this view's); returns its token (shown once, stored hashed),
        valid for ``expires_in_s`` seconds (None: until revoked)."""
        if expires_in_s is not None and not expires_in_s > 0:
            raise StoreError(f"expiry must be a positive number of seconds, not {expires_in_s!r}")
        if not name or len(name) > 64 or not all(ch.isalnum() or ch in "-_." for ch in name):
            raise StoreError(f"device name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")
        token = new_token()
        with self.db.transaction() as tx:
            tx.lock("devices")
            if tx.one("SELECT 1 AS found FROM devices WHERE name=?", (name,)):
                raise StoreError(f"device {name!r} already exists")
            now = time.time()
            tx.execute("INSERT INTO devices(name, token_hash, created, expires, model) VALUES(?, ?, ?, ?, ?)",
                       (name, hash_token(token), now, None if expires_in_s is None else now + expires_in_s,
                        self.scope.key() if model is None else model))
        return token

    def revoke_device(self, name: str) -> None:
        with self.db.transaction() as tx:
            cur = tx.execute("UPDATE devices SET revoked=? WHERE name=? AND revoked IS NULL", (time.time(), name))
            if cur.rowcount == 0 and not tx.one("SELECT 1 AS found FROM devices WHERE name=?", (name,)):
                raise NotFound(f"no device named {name!r}")

    def get_device(self, name: str) -> Device:
        with self.db.reader() as tx:
            row = tx.one("SELECT * FROM devices WHERE name=?", (name,))
        if row is None:
            raise NotFound(f"no device named {name!r}")
        return self._device(row)

    def list_devices(self) -> list[Device]:
        cond, args = self.scope.where()
        with self.db.reader() as tx:
            return [self._device(r) for r in tx.all(f"SELECT * FROM devices WHERE {cond} ORDER BY name", args)]

    def bind_unassigned_devices(self, model: str) -> int:
        """Devices added before any model was registered run the first one registered: -> how many were bound."""
        with self.db.transaction() as tx:
            return tx.execute("UPDATE devices SET model=? WHERE model=''", (model,)).rowcount

    def authenticate(self, token: str) -> Device | None:
        """The device holding this token, unless revoked or expired; else None."""
        if not token or len(token) > 256:
            return None
        digest = hash_token(token)
        with self.db.reader() as tx:
            row = tx.one("SELECT * FROM devices WHERE token_hash=?", (digest,))
        if row is None or not hmac.compare_digest(row["token_hash"], digest) or row["revoked"] is not None:
            return None
        if row["expires"] is not None and row["expires"] <= time.time():
            return None
        return self._device(row)

    def touch_device(self, device_id: int, version: int | None = None, status: str | None = None,
                     counters: dict | None = None, problems: dict | None = None, heartbeat: bool = False) -> None:
        """Note a request from the device (``last_seen``); a heartbeat also records its status and problems."""
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
        with self.db.transaction() as tx:
            tx.execute(f"UPDATE devices SET {', '.join(sets)} WHERE id=?", (*args, device_id))

    # -- domain signatures and groups (cloud/grouping.py decides; this keeps)
    def set_signature(self, device_id: int, values: list[float], entropy: float | None = None) -> None:
        """Keep a device's latest domain signature (the previous one is replaced)."""
        if not values or not all(math.isfinite(float(v)) for v in values):
            raise StoreError("a domain signature is a non-empty list of finite numbers")
        doc = json.dumps({"values": [float(v) for v in values], "entropy": entropy})
        with self.db.transaction() as tx:
            tx.execute("UPDATE devices SET signature=?, signature_at=? WHERE id=?", (doc, time.time(), device_id))

    def set_device_group(self, device_id: int, group_id: int | None) -> None:
        with self.db.transaction() as tx:
            tx.execute("UPDATE devices SET group_id=? WHERE id=?", (group_id, device_id))

    @staticmethod
    def _group(row: Row) -> DeviceGroup:
        return DeviceGroup(id=row["id"], created=row["created"], base_version=row["base_version"],
                           centroid=json.loads(row["centroid"]) if row["centroid"] else None, note=row["note"] or "",
                           dissolved=row["dissolved"])

    def add_group(self, base_version: int, centroid: list[float] | None, note: str = "") -> int:
        model = self.scope.key()
        with self.db.transaction() as tx:
            return tx.insert("INSERT INTO device_groups(created, base_version, centroid, note, model) "
                             "VALUES(?,?,?,?,?)", (time.time(), int(base_version),
                                                   None if centroid is None else json.dumps(centroid), note, model))

    def update_group(self, group_id: int, centroid: list[float] | None = None, dissolve: bool = False) -> None:
        sets, args = [], []
        if centroid is not None:
            sets.append("centroid=?")
            args.append(json.dumps([float(v) for v in centroid]))
        if dissolve:
            sets.append("dissolved=?")
            args.append(time.time())
        if not sets:
            return
        with self.db.transaction() as tx:
            cur = tx.execute(f"UPDATE device_groups SET {', '.join(sets)} WHERE id=?", (*args, int(group_id)))
            if cur.rowcount == 0:
                raise NotFound(f"no group {group_id}")

    def get_group(self, group_id: int) -> DeviceGroup:
        with self.db.reader() as tx:
            row = tx.one("SELECT * FROM device_groups WHERE id=?", (int(group_id),))
        if row is None:
            raise NotFound(f"no group {group_id}")
        return self._group(row)

    def list_groups(self, include_dissolved: bool = False) -> list[DeviceGroup]:
        cond, args = self.scope.where()
        q = f"SELECT * FROM device_groups WHERE {cond}" + ("" if include_dissolved else " AND dissolved IS NULL") + \
            " ORDER BY id"
        with self.db.reader() as tx:
            return [self._group(r) for r in tx.all(q, args)]

    # -- rollouts
    @staticmethod
    def check_scope(devices: list[str] | None, fraction: float | None, group_id: int | None = None) -> None:
        if devices is not None and fraction is not None:
            raise StoreError("a rollout names devices or a fraction, not both")
        if group_id is not None and (devices is not None or fraction is not None):
            raise StoreError("a rollout names a group or devices/a fraction, not both")
        if fraction is not None and not 0 < fraction <= 1:
            raise StoreError(f"rollout fraction must be in (0, 1], not {fraction}")

    @classmethod
    def insert_rollout(cls, tx: Transaction, version: int, devices: list[str] | None = None,
                       fraction: float | None = None, note: str = "", group_id: int | None = None, *,
                       model: str) -> int:
        cls.check_scope(devices, fraction, group_id)
        return tx.insert("INSERT INTO rollouts(version, devices, fraction, created, note, group_id, model) "
                         "VALUES(?,?,?,?,?,?,?)",
                         (int(version), None if devices is None else json.dumps(sorted(set(devices))), fraction,
                          time.time(), note, group_id, model))

    def add_rollout(self, version: int, devices: list[str] | None = None, fraction: float | None = None,
                    note: str = "", group_id: int | None = None) -> int:
        self.check_scope(devices, fraction, group_id)
        model = self.scope.key()
        with self.db.transaction() as tx:
            if not tx.one("SELECT 1 AS found FROM versions WHERE model=? AND version=?", (model, int(version))):
                raise NotFound(f"no version {version}" + (f" of model {model!r}" if model else ""))
            if group_id is not None and not tx.one("SELECT 1 AS found FROM device_groups WHERE id=? AND model=?",
                                                   (int(group_id), model)):
                raise NotFound(f"no group {group_id}" + (f" of model {model!r}" if model else ""))
            return self.insert_rollout(tx, version, devices, fraction, note, group_id, model=model)

    @staticmethod
    def _rollouts(tx: Transaction, cond: str, args: tuple) -> list[Rollout]:
        rows = tx.all(f"SELECT * FROM rollouts WHERE {cond} ORDER BY id", args)
        return [Rollout(id=r["id"], version=r["version"],
                        devices=None if r["devices"] is None else json.loads(r["devices"]),
                        fraction=r["fraction"], created=r["created"], note=r["note"] or "",
                        group_id=r["group_id"], model=r["model"]) for r in rows]

    def list_rollouts(self) -> list[Rollout]:
        cond, args = self.scope.where()
        with self.db.reader() as tx:
            return self._rollouts(tx, cond, args)

    def target_version(self, device_name: str, group_id: int | None = None) -> int | None:
        """The version the newest rollout of this view's model covering this device (a member of ``group_id``)
        assigns, or None (no rollout covers it)."""
        model = self.scope.key()
        with self.db.reader() as tx:
            rollouts = self._rollouts(tx, "model=?", (model,))
        for r in reversed(rollouts):
            if r.covers(device_name, group_id):
                return r.version
        return None
