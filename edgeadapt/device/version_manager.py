"""The one owner of the parameter version a device runs: switch, restore, previous, the block list and events.

Every change of the version in use goes through ``VersionManager``, under the version store's lock: a verified
update (``take``), the watch's automatic rollback (``roll_back``), an operator's rollback over the admin API or
the offline CLI (``switch_by_hand``), and the choice at start (``restore``). So every path gets the same rules:

- a version rolled back (by the watch, or left by an operator going back) is put on the **block list**
  (``<state_dir>/blocked_versions.json``) and never re-applied from the cloud; an operator switching to a blocked
  version by hand takes it off;
- a rollback by hand also **pins** the device (``VersionStore.pin``, ``versions/pin.json``): the versions it left
  are not taken again until the cloud offers one newer than all of them, when the pin is cleared;
- every change is an **event** (``applied``, ``unpinned``, ``rolled_back``, ``manual_rollback``; the updater
  records its own through ``record`` too), counted in the ``edgeadapt_updates`` metric by kind and kept, the last
  100, for ``/v1/status``.

Without an engine (the offline ``edgeadapt device rollback``) a switch only records the version in use, the pin
and the block list on disk; the daemon runs it at its next start.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Protocol

from edgeadapt.core.jsonsafe import json_safe
from edgeadapt.core.tensorfile import ParamSet
from edgeadapt.device.versions import VersionStore, VersionStoreError, atomic_write

log = logging.getLogger("edgeadapt.device.version_manager")

MAX_EVENTS = 100


class RollbackRefused(Exception):
    """A switch by hand that cannot be done (no such version on disk, nothing older): the caller answers 409."""


class Engine(Protocol):
    """What the manager needs of the serving engine: the version it runs and a way to swap parameters in."""

    param_version: int

    def apply_params(self, params: ParamSet, version: int) -> None: ...


class SwitchListener(Protocol):
    """Told about a switch by hand, under the lock, before and after it (the updater ends a watch in progress,
    which would otherwise decide about a version no longer in use, and forgets what it refused)."""

    def before_manual_switch(self, reason: str) -> None: ...

    def after_manual_switch(self, result: dict) -> None: ...


def _report_error(key: str, message: str) -> None:
    log.error("%s: %s", key, message)


class VersionManager:
    def __init__(self, store: VersionStore, engine: Engine | None = None, metrics=None,
                 on_error: Callable[[str, str], None] | None = None):
        self.store = store
        self.engine = engine
        self.metrics = metrics  # DeviceMetrics or None: param_version and updates{outcome}
        self._on_error = on_error or _report_error  # the daemon's health (``DeviceDaemon._error``)
        #: the store's lock: updates, automatic and manual rollbacks all change the version in use under it
        self.lock = store.lock
        self.listener: SwitchListener | None = None
        self.events: list[dict] = []
        self._blocked_path = store.dir.parent / "blocked_versions.json"
        self.blocked: set[int] = set(self._load_blocked())
        self.pin: dict | None = store.read_pin()

    # -- what is in use ----------------------------------------------------------------------------
    def current(self) -> int:
        """The version in use: the engine's, or without one the pointer on disk."""
        return self.engine.param_version if self.engine is not None else self.store.current()

    def previous(self, version: int | None = None) -> int:
        """The newest version on disk older than ``version`` (default: the one in use). Raises RollbackRefused."""
        cur = self.current() if version is None else version
        older = [v for v in self.store.versions() if v < cur]
        if not older:
            raise RollbackRefused(f"no version older than {cur} on disk")
        return older[-1]

    def _run(self, version: int, params: ParamSet) -> None:
        if self.engine is not None:
            self.engine.apply_params(params, version)
        if self.metrics is not None:
            self.metrics.param_version.set(version)

    # -- events ------------------------------------------------------------------------------------
    def record(self, kind: str, **detail) -> dict:
        """One event: kept (the last ``MAX_EVENTS``), counted by kind in ``edgeadapt_updates``, logged."""
        event = json_safe({"at": time.time(), "event": kind, **detail})
        self.events.append(event)
        del self.events[:-MAX_EVENTS]
        if self.metrics is not None:
            self.metrics.updates.labels(kind).inc()
        log.info("update %s: %s", kind, detail)
        return event

    # -- block list --------------------------------------------------------------------------------
    def _load_blocked(self) -> list[int]:
        try:
            vs = json.loads(self._blocked_path.read_text())
        except (OSError, ValueError):
            return []
        return [v for v in vs if type(v) is int] if isinstance(vs, list) else []

    def _save_blocked(self) -> None:
        try:
            atomic_write(self._blocked_path, json.dumps(sorted(self.blocked)))
        except OSError as exc:  # the version switch itself stands; only a restart would forget the block
            log.error("cannot persist blocked versions: %s", exc)

    def block(self, version: int) -> None:
        """Never take ``version`` from the cloud again (it was rolled back)."""
        with self.lock:
            if version not in self.blocked:
                self.blocked.add(int(version))
                self._save_blocked()

    def unblock(self, version: int) -> None:
        with self.lock:
            if version in self.blocked:
                self.blocked.discard(version)
                self._save_blocked()

    def refusal(self, target: int | None) -> str | None:
        """"pinned" or "blocked" when a package for ``target`` must not be taken, else None. The pin is named
        first: it is the operator's decision in force, and it ends when the cloud offers something newer."""
        if target is None:
            return None
        pin = self.pin
        if pin and target <= int(pin.get("through", 0)):
            return "pinned"
        if target in self.blocked:
            return "blocked"
        return None

    # -- switches ----------------------------------------------------------------------------------
    def take(self, version: int, params: ParamSet, base: int, mode: str | None) -> None:
        """Run a verified update: stored first (for a restart), then swapped in and recorded as the version in use.
        A pin ends here: whatever passed ``refusal`` is newer than every version the operator left."""
        with self.lock:
            try:
                self.store.save(version, params)
            except OSError as exc:
                self._on_error("versions", f"cannot store version {version}: {exc}")
            self._run(version, params)
            try:
                self.store.set_current(version, reason="update")
            except OSError as exc:
                self._on_error("versions", f"cannot record the version in use: {exc}")
            self.record("applied", version=version, base=base, mode=mode)
            if self.pin:
                self.record("unpinned", version=version, pin=self.pin)
                self.pin = None
                self.store.clear_pin()

    def roll_back(self, to: int, reason: str, bad_version: int | None = None) -> int:
        """Leave a version found worse: run ``to`` (version 0 when ``to`` is damaged on disk: the bad version must
        go even then) and block ``bad_version``. Returns the version now in use."""
        with self.lock:
            try:
                params = self.store.load(to)
            except VersionStoreError as exc:
                self._on_error("versions", f"{exc}; rolling back to the bundle's version 0 instead")
                reason, to, params = f"{reason}; {exc}", 0, self.store.load(0)
            self._run(to, params)
            self.store.set_current(to, reason=f"rollback: {reason}")
            if bad_version is not None:
                self.block(bad_version)
            self.record("rolled_back", version=bad_version, to=to, reason=reason)
            return to

    def switch_by_hand(self, to: int | None, reason: str = "manual rollback") -> dict:
        """An operator's switch to version ``to`` (default: ``previous()``): the version left is blocked when it
        is newer, ``to`` is unblocked (the operator chose it), and the device is pinned below the versions left.
        -> {"from", "to", "pinned_through"}. Raises RollbackRefused."""
        with self.lock:
            if self.listener is not None:
                self.listener.before_manual_switch(reason)
            cur = self.current()
            if to is None:
                to = self.previous(cur)
            try:
                params = self.store.load(to)
            except VersionStoreError as exc:
                raise RollbackRefused(str(exc)) from exc
            self._run(to, params)
            self.store.set_current(to, reason=f"{reason} from {cur}")
            self.pin = self.store.pin(to, cur, reason)
            if cur > to:
                self.block(cur)
            self.unblock(to)
            result = {"from": cur, "to": to, "pinned_through": self.pin["through"] if self.pin else None}
            self.record("manual_rollback", **result)
            if self.listener is not None:
                self.listener.after_manual_switch(result)
            return result

    def restore(self) -> int:
        """At start: run the recorded version; if its file is missing or corrupt, the newest earlier version in the
        pointer's history that still verifies (the previous good state), else the bundle's version 0. A fallback is
        recorded as the version in use, so the updater asks the cloud for the newer one again and re-stores it.
        Returns the version in use."""
        with self.lock:
            ptr = self.store.read_pointer()
            if ptr.get("error"):
                self._on_error("versions", ptr["error"])
            v = int(ptr.get("version", 0))
            if not v:
                return 0
            try:
                self._run(v, self.store.load(v))
                return v
            except VersionStoreError as exc:
                problem = str(exc)
            seen = {v}
            for entry in reversed(ptr.get("history", [])):
                older = int(entry.get("version", 0))
                if older in seen or older == 0:
                    continue
                seen.add(older)
                try:
                    self._run(older, self.store.load(older))
                except VersionStoreError as exc:
                    problem += f"; {exc}"
                    continue
                self._on_error("versions", f"{problem}; running the previous good version {older}")
                self._record_fallback(older, problem)
                return older
            self._on_error("versions", f"{problem}; running the bundle's version 0")
            self._record_fallback(0, problem)
            return 0

    def _record_fallback(self, version: int, problem: str) -> None:
        try:
            self.store.set_current(version, reason=f"fallback at start: {problem}")
        except OSError as exc:
            self._on_error("versions_pointer", f"cannot record the version in use: {exc}")

    def status(self) -> dict:
        return json_safe({"in_use": self.current(), "blocked_versions": sorted(self.blocked), "pin": self.pin,
                          "events": self.events[-10:]})
