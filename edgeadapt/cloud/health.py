"""The cloud's own health (issue 20): live, ready, degraded with reasons, and the fleet's state as metrics.

Degraded reasons come from two places. Events record them as they happen (a store error answered 503, a failed
training round) and clear them at the next success. Checks run at each ``/healthz`` or scrape: the store
answers, the signing key file is still there and readable (the running service signs with the key it loaded;
a restart would fail without it), free disk under the store, a bundle without the cloud's key (devices cannot
verify any update), a ``max_body_bytes`` smaller than one sample of the bundle (no device can upload).

Several models (issue 18): what is per model is checked for each served model. The default (configured) model's
reasons keep their plain keys (``trainer``, ``bundle_key``, ``uploads_impossible``); another model's carry its
name (``trainer:NAME``, ..., ``model:NAME`` when it cannot be loaded at all). ``models_health`` is each model's
part of ``/healthz``; the collector labels what is per model with ``model``.
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
        since: dict[str, float] = {}  # a failed round's reason dates from the failure
        for name, m in list(svc.models.items()):
            found.update(self._model_reasons(name, m, since))
        for name, (_, why) in list(svc.model_errors.items()):  # registered models that cannot be served
            found[f"model:{name}"] = f"registered model {name!r} cannot be served (its devices get 503): {why}"
        now = time.time()
        with self._lock:
            out = {k: dict(v) for k, v in self._events.items()}
        for k, reason in found.items():
            if k in out:  # found now, and an event recorded before: both said
                if reason not in out[k]["reason"]:
                    out[k]["reason"] = f"{reason}; last error: {out[k]['reason']}"
            else:
                out[k] = {"reason": reason, "since": since.get(k, now), "count": 1}
        return out

    def _model_reasons(self, name: str, m, since: dict[str, float]) -> dict[str, str]:
        """What fails one served model's devices: its bundle without the cloud's key, uploads larger than the body
        limit, its trainer failing (since when: into ``since``) or stopped. Keys as in the module docstring."""
        svc = self.service
        default = name == svc.model_name
        key = (lambda kind: kind) if default else (lambda kind: f"{kind}:{name}")
        of = "" if default else f"model {name!r}: "
        found: dict[str, str] = {}
        if m.manifest.cloud_public_key is None:
            found[key("bundle_key")] = (f"{of}the bundle carries no cloud public key: devices cannot verify any "
                                        f"update; re-export it: {export_hint(str(svc.home / signing.PUBLIC_KEY_FILE))}")
        if m.one_sample_body_bytes > svc.config.max_body_bytes:
            found[key("uploads_impossible")] = (f"{of}max_body_bytes {svc.config.max_body_bytes} is smaller than one "
                                                f"upload of this bundle ({m.one_sample_body_bytes} bytes): every "
                                                "upload is refused; raise max_body_bytes")
        t = m.trainer
        if t is not None:
            on_ray = t.executor == "ray"
            if t.last_error is not None:
                found[key("trainer")] = (f"{of}{'training on Ray' if on_ray else 'training round'} failed: "
                                         f"{t.last_error[1]}")
                since[key("trainer")] = t.last_error[0]
            elif svc.config.trainer.enabled and svc.started and not t.running:
                found[key("trainer")] = f"{of}the {'Ray scheduler' if on_ray else 'trainer'} thread is not running"
        return found


PER_MODEL_KINDS = ("trainer", "bundle_key", "uploads_impossible", "model")


def reason_model(key: str, default: str) -> str | None:
    """The model a degraded reason is about (None: the whole cloud's, e.g. the store or the disk)."""
    kind, _, name = key.partition(":")
    if kind not in PER_MODEL_KINDS:
        return None
    return name or default


def models_health(service, problems: dict[str, dict], ready: bool) -> dict[str, dict]:
    """Each registered model's part of ``/healthz``: what its devices need to upload (``limits``: input shape,
    size limits), its classes, latest version, pending uploads, trainer state and its own degraded reasons. A
    model that cannot be loaded: ``served`` false and why (``error``; None: registered while the cloud runs, loaded
    at the first request of one of its devices)."""
    reasons: dict[str, dict[str, str]] = {}
    for k, v in problems.items():
        name = reason_model(k, service.model_name)
        if name is not None:
            reasons.setdefault(name, {})[k] = v["reason"]
    out: dict[str, dict] = {}
    for name, m in list(service.models.items()):
        latest = pending = None
        if ready:
            try:
                latest, pending = m.store.latest_version(), m.store.count_samples("train", consumed=False)
            except Exception:  # the store failing now: the store reason says so
                pass
        t = m.trainer
        out[name] = {"served": True, "input_shape": list(m.codec.shape), "num_classes": m.manifest.num_classes,
                     "latest_version": latest, "pending": pending,
                     "trainer": None if t is None else {
                         "running": t.running, "executor": t.executor, "version": t.version,
                         "last_error": None if t.last_error is None else t.last_error[1],
                         "last_success_age_s": None if t.last_success_at is None else time.time() - t.last_success_at},
                     "limits": service.model_limits(m), "reasons": reasons.get(name, {})}
    for name, (_, why) in list(service.model_errors.items()):
        out.setdefault(name, {"served": False, "error": why, "reasons": reasons.get(name, {})})
    if ready:
        try:  # registered while the cloud runs: loaded at the first request of one of its devices
            for rec in service.root_store.models.list():
                out.setdefault(rec.model, {"served": False, "error": None, "input_shape": rec.input_shape,
                                           "num_classes": rec.num_classes, "reasons": {}})
        except Exception:  # the store failing now: the store reason says so
            pass
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
        served = list(svc.models.items())
        g = GaugeMetricFamily("edgeadapt_cloud_trainer_last_success_age_seconds",
                              "seconds since each model's last training round finished (since start when none; "
                              "NaN: no trainer)", labels=["model"])
        for name, m in served:
            t = m.trainer
            g.add_metric([name], NEVER if t is None else time.time() - (t.last_success_at or svc.health.started))
        yield g
        t = svc.trainer
        if t is not None:
            g = GaugeMetricFamily("edgeadapt_cloud_trainer_executor", "1 for where training rounds run "
                                  "(trainer.executor)", labels=["executor"])
            g.add_metric([t.executor], 1.0)
            yield g
        ray = [(name, m.trainer) for name, m in served if m.trainer is not None and m.trainer.executor == "ray"]
        if ray:
            g = GaugeMetricFamily("edgeadapt_cloud_trainer_rounds_in_flight", "rounds running as Ray tasks",
                                  labels=["model"])
            for name, rt in ray:
                g.add_metric([name], float(len(rt.in_flight)))
            yield g
        try:
            from edgeadapt.cloud.admin import devices_info

            rows = devices_info(getattr(svc, "root_store", svc.store), svc.config.device_stale_after_s)
        except Exception:  # the store's failure is already a degraded reason
            return
        names = ("ok", "degraded", "stale", "revoked", "never")
        states = {(name, s): 0 for name, _ in served for s in names}  # every served model's, at 0 too
        age = GaugeMetricFamily("edgeadapt_cloud_device_heartbeat_age_seconds",
                                "seconds since each device's last heartbeat (NaN: never)", labels=["device"])
        probs = GaugeMetricFamily("edgeadapt_cloud_device_problems", "degraded reasons of each device's last "
                                  "heartbeat (plus stale, revoked, expired)", labels=["device"])
        for r in rows:
            state = "revoked" if r["revoked"] or r["expired"] else "never" if r["heartbeat_age_s"] is None else \
                "stale" if r["stale"] else "degraded" if r["problems"] else "ok"
            states[r["model"], state] = states.get((r["model"], state), 0) + 1
            age.add_metric([r["name"]], NEVER if r["heartbeat_age_s"] is None else r["heartbeat_age_s"])
            probs.add_metric([r["name"]], float(len(r["trouble"])))
        g = GaugeMetricFamily("edgeadapt_cloud_devices", "devices by model and state", labels=["model", "state"])
        for (model, state), v in states.items():
            g.add_metric([model, state], float(v))
        yield g
        yield age
        yield probs
