"""The cloud's own health (issue 20): live, ready, degraded with reasons, and the fleet's state as metrics.

Degraded reasons come from two places. Events record them as they happen (a store error answered 503, a failed
training round) and clear them at the next success. Checks run at each ``/healthz`` or scrape: the store
answers, the signing key file is still there and readable (the running service signs with the key it loaded;
a restart would fail without it), free disk under the store, a bundle without the cloud's key (devices cannot
verify any update), a ``max_body_bytes`` smaller than one sample of the bundle (no device can upload).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

from edgeadapt.core import signing
from edgeadapt.core.findings import export_hint

NEVER = float("nan")


def age_words(seconds: float) -> str:
    """42 s, 15 min, 2 h, 3 d: an age as an operator reads it."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


class CloudHealth:
    """Problems of one service, each with since-when and a count; ``check()`` adds the ones computed now."""

    def __init__(self, service) -> None:
        self.service = service
        self._events: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.started = time.time()

    def problem(self, key: str, reason: str) -> None:
        with self._lock:
            rec = self._events.get(key)
            if rec is None:
                self._events[key] = {"reason": reason, "since": time.time(), "count": 1}
            else:
                rec.update(reason=reason, count=rec["count"] + 1)

    def resolved(self, key: str) -> None:
        with self._lock:
            self._events.pop(key, None)

    def not_ready(self) -> str | None:
        """Why the service cannot do its job at all (readiness), or None."""
        try:
            self.service.store.latest_version()
        except Exception as exc:  # any store failure: the service cannot answer devices
            return f"store not answering: {type(exc).__name__}: {str(exc)[:200]}"
        return None

    def check(self) -> dict[str, dict]:
        """Every degraded reason now: {key: {reason, since, count}}."""
        svc = self.service
        found: dict[str, str] = {}
        why = self.not_ready()
        blobs = getattr(getattr(svc.store, "blobs", None), "root", None)
        if why:
            found["store"] = why
        elif blobs is not None and not Path(blobs).is_dir():
            found["store"] = f"blob directory {blobs} is not a directory: uploads cannot be stored"
        key_path = svc.home / signing.PRIVATE_KEY_FILE
        if svc.key_from_home:
            try:
                with open(key_path, "rb") as f:
                    f.read(1)
            except OSError as exc:
                what = "unreadable" if key_path.exists() else "missing"
                found["signing_key"] = (f"signing key {key_path} is {what} ({exc.strerror or exc}): updates are "
                                        "signed with the key loaded at start; a restart would fail")
        root = getattr(svc.store, "root", None)
        if root is not None:
            try:
                free = shutil.disk_usage(Path(root)).free
                if free < svc.config.min_free_disk_mb * 2**20:
                    found["disk"] = (f"disk: {free / 2**20:.0f} MiB free under the store {root} (below "
                                     f"min_free_disk_mb {svc.config.min_free_disk_mb:g})")
            except OSError as exc:
                found["disk"] = f"disk: store directory {root}: {exc}"
        if svc.manifest.cloud_public_key is None:
            found["bundle_key"] = ("the bundle carries no cloud public key: devices cannot verify any update; "
                                   f"re-export it: {export_hint(str(svc.home / signing.PUBLIC_KEY_FILE))}")
        if svc.one_sample_body_bytes > svc.config.max_body_bytes:
            found["uploads_impossible"] = (f"max_body_bytes {svc.config.max_body_bytes} is smaller than one upload "
                                           f"of this bundle ({svc.one_sample_body_bytes} bytes): every upload is "
                                           "refused; raise max_body_bytes")
        t = svc.trainer
        if t is not None:
            on_ray = t.executor == "ray"
            if t.last_error is not None:
                found["trainer"] = f"{'training on Ray' if on_ray else 'training round'} failed: {t.last_error[1]}"
            elif svc.config.trainer.enabled and svc.started and not t.running:
                found["trainer"] = f"the {'Ray scheduler' if on_ray else 'trainer'} thread is not running"
        for name, (_, why) in getattr(svc, "model_errors", {}).items():  # registered models that cannot be served
            found[f"model:{name}"] = f"registered model {name!r} cannot be served (its devices get 503): {why}"
        for name, m in getattr(svc, "models", {}).items():
            if name != svc.model_name and m.trainer is not None and m.trainer.last_error is not None:
                found[f"trainer:{name}"] = f"training round of model {name!r} failed: {m.trainer.last_error[1]}"
        now = time.time()
        with self._lock:
            out = {k: dict(v) for k, v in self._events.items()}
        since_t = t.last_error[0] if t is not None and t.last_error is not None else None
        for k, reason in found.items():
            if k in out:  # found now, and an event recorded before: both said
                if reason not in out[k]["reason"]:
                    out[k]["reason"] = f"{reason}; last error: {out[k]['reason']}"
            else:
                out[k] = {"reason": reason, "since": since_t if k == "trainer" and since_t else now, "count": 1}
        return out


class FleetCollector:
    """Scrape-time metrics: the service's degraded reasons, devices by state, each device's heartbeat age and
    problem count, the trainer's last success."""

    def __init__(self, service) -> None:
        self.service = service

    def describe(self):
        return []

    def collect(self):
        svc = self.service
        problems = svc.health.check()
        g = GaugeMetricFamily("edgeadapt_cloud_degraded", "1 while any part of the cloud's job fails")
        g.add_metric([], 1.0 if problems else 0.0)
        yield g
        g = GaugeMetricFamily("edgeadapt_cloud_degraded_reason", "1 per degraded reason in effect", labels=["reason"])
        for k in problems:
            g.add_metric([k], 1.0)
        yield g
        t = svc.trainer
        g = GaugeMetricFamily("edgeadapt_cloud_trainer_last_success_age_seconds",
                              "seconds since the last training round finished (since start when none; NaN: no "
                              "trainer)")
        g.add_metric([], NEVER if t is None else time.time() - (t.last_success_at or svc.health.started))
        yield g
        if t is not None:
            g = GaugeMetricFamily("edgeadapt_cloud_trainer_executor", "1 for where training rounds run "
                                  "(trainer.executor)", labels=["executor"])
            g.add_metric([t.executor], 1.0)
            yield g
            if t.executor == "ray":
                g = GaugeMetricFamily("edgeadapt_cloud_trainer_rounds_in_flight", "rounds running as Ray tasks")
                g.add_metric([], float(len(t.in_flight)))
                yield g
        try:
            from edgeadapt.cloud.admin import devices_info

            rows = devices_info(getattr(svc, "root_store", svc.store), svc.config.device_stale_after_s)
        except Exception:  # the store's failure is already a degraded reason
            return
        states = dict.fromkeys(("ok", "degraded", "stale", "revoked", "never"), 0)
        age = GaugeMetricFamily("edgeadapt_cloud_device_heartbeat_age_seconds",
                                "seconds since each device's last heartbeat (NaN: never)", labels=["device"])
        probs = GaugeMetricFamily("edgeadapt_cloud_device_problems", "degraded reasons of each device's last "
                                  "heartbeat (plus stale, revoked, expired)", labels=["device"])
        for r in rows:
            state = "revoked" if r["revoked"] or r["expired"] else "never" if r["heartbeat_age_s"] is None else \
                "stale" if r["stale"] else "degraded" if r["problems"] else "ok"
            states[state] += 1
            age.add_metric([r["name"]], NEVER if r["heartbeat_age_s"] is None else r["heartbeat_age_s"])
            probs.add_metric([r["name"]], float(len(r["trouble"])))
        g = GaugeMetricFamily("edgeadapt_cloud_devices", "devices by state", labels=["state"])
        for k, v in states.items():
            g.add_metric([k], float(v))
        yield g
        yield age
        yield probs
