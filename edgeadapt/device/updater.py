"""Pull, verify, apply, watch, roll back: how a device takes a cloud update without downtime.

1. Poll ``GET /v1/updates?model=…&have=V`` (204 = current). 2. Verify the package (signature with the bundle's
cloud key, model id, base version and hash, no downgrade) — a package that fails is never applied.
3. Save the new version to disk, build its ONNX Runtime session off the hot path, swap it in between
batches. 4. Watch ``watch_batches`` batches: the previous version's parameters are kept and run on the same
inputs, with the same statistics and in-batch mix as the served batch, so agreement and mean entropy compare
the two versions on identical batches (a short window of noisy traffic cannot trip them); the OOD rate is
compared with the window before, allowing for its sampling noise. 5. Keep it, or roll back by itself and record
why; a rolled-back version is not taken again.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from edgeadapt.core import update_package as UP
from edgeadapt.core.mathops import entropy_from_logits
from edgeadapt.core.wire import Heartbeat
from edgeadapt.device.versions import VersionStoreError

log = logging.getLogger("edgeadapt.device.updater")


@dataclass
class WatchPolicy:
    """When a new version is rolled back (all relative to the window before the update)."""

    max_entropy_increase: float = 0.25  # relative increase of mean entropy
    max_ood_increase: float = 0.20  # absolute increase of the OOD rate
    min_agreement: float = 0.25  # agreement of predictions with the previous version (same normalization)


@dataclass
class _Watch:
    version: int
    previous_version: int
    previous_base: dict
    baseline_entropy: float
    baseline_ood: float
    baseline_entropy_sd: float = 0.0  # batch-to-batch spread of the baseline (noise margin, unpaired rule)
    entropy: list = field(default_factory=list)
    ood: list = field(default_factory=list)
    samples: int = 0
    agree: list = field(default_factory=list)
    # the same inputs through both versions: a paired entropy comparison that input noise cannot trip
    paired_entropy_prev: list = field(default_factory=list)
    paired_entropy_cur: list = field(default_factory=list)


class Updater:
    def __init__(self, daemon, cloud_url: str, token: str, poll_s: float = 2.0, watch_batches: int = 8,
                 policy: WatchPolicy | None = None, client: httpx.Client | None = None):
        self.daemon = daemon
        self.engine = daemon.engine
        self.versions = daemon.versions
        self.model = daemon.manifest.model_name
        self.public_key = daemon.manifest.cloud_public_key
        self.url = cloud_url.rstrip("/")
        self.poll_s = poll_s
        self.watch_batches = watch_batches
        self.policy = policy or WatchPolicy()
        self.client = client or httpx.Client(timeout=30, headers={"Authorization": f"Bearer {token}"})
        self._recent = collections.deque(maxlen=max(watch_batches, 4))
        self._watch: _Watch | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.events: list[dict] = []
        self.counters = {"checks": 0, "applied": 0, "rejected": 0, "rolled_back": 0, "kept": 0, "bytes_down": 0,
                         "errors": 0}
        self._blocked = set(self._load_blocked())

    # -- persistence of refused versions -----------------------------------------------------------
    def _blocked_path(self):
        return self.daemon.state_dir / "blocked_versions.json"

    def _load_blocked(self) -> list[int]:
        try:
            return json.loads(self._blocked_path().read_text())
        except (OSError, ValueError):
            return []

    def _block(self, version: int) -> None:
        self._blocked.add(version)
        try:
            self._blocked_path().write_text(json.dumps(sorted(self._blocked)))
        except OSError as exc:
            log.error("cannot persist blocked versions: %s", exc)

    def _event(self, kind: str, **kw) -> None:
        ev = {"at": time.time(), "event": kind, **kw}
        self.events = (self.events + [ev])[-100:]
        self.daemon.metrics.updates.labels(kind).inc()
        log.info("update %s: %s", kind, kw)

    # -- polling -----------------------------------------------------------------------------------
    def check_once(self) -> str:
        """One poll; returns "current", "applied", "rejected", "blocked", "busy" or "error"."""
        if self._watch is not None:
            return "busy"
        self.counters["checks"] += 1
        have = self.engine.param_version
        try:
            r = self.client.get(f"{self.url}/v1/updates", params={"model": self.model, "have": have})
        except httpx.HTTPError as exc:
            self.counters["errors"] += 1
            self.daemon._error("updater", f"cloud unreachable for updates: {exc}")
            return "error"
        self.daemon.errors.pop("updater", None)
        if r.status_code == 204:
            return "current"
        if r.status_code != 200:
            self.counters["errors"] += 1
            self.daemon._error("updater", f"update check answered {r.status_code}: {r.text[:200]}")
            return "error"
        data = r.content
        self.counters["bytes_down"] += len(data)
        self.daemon.metrics.bytes_down.set(self.counters["bytes_down"])
        return self.apply_package(data)

    def apply_package(self, data: bytes) -> str:
        try:
            header = UP.read_header(data)
            target = int(header["target"]["version"])
        except Exception:
            target = None
        if target is not None and target in self._blocked:
            return "blocked"
        with self._lock:
            base_version = self.engine.param_version
            base_params = dict(self.engine.base_params)
            try:
                version, params, header = UP.verify_and_apply(data, self.public_key, self.model, base_version,
                                                              base_params)
            except UP.UpdateRejected as exc:
                self.counters["rejected"] += 1
                self._event("rejected", reason=str(exc), target=target)
                return "rejected"
            try:
                self.versions.save(version, params)
            except OSError as exc:
                self.daemon._error("versions", f"cannot store version {version}: {exc}")
            previous_base = self.engine.base_params
            recent = list(self._recent)
            self.engine.apply_params(params, version)
            try:
                self.versions.set_current(version, reason="update")
            except OSError as exc:
                self.daemon._error("versions", f"cannot record the version in use: {exc}")
            self.daemon.metrics.param_version.set(version)
            self.counters["applied"] += 1
            self._event("applied", version=version, base=base_version, mode=header.get("compression"))
            self._watch = _Watch(
                version=version, previous_version=base_version, previous_base=previous_base,
                baseline_entropy=float(np.mean([e for e, _ in recent])) if recent else float("nan"),
                baseline_ood=float(np.mean([o for _, o in recent])) if recent else float("nan"),
                baseline_entropy_sd=float(np.std([e for e, _ in recent])) if len(recent) > 1 else 0.0,
            )
            return "applied"

    # -- watching (called from the batch worker after every batch) ---------------------------------
    def observe(self, x: np.ndarray, res) -> None:
        ent, ood = float(res.entropy.mean()), float(res.ood.mean())
        w = self._watch
        if w is None or res.param_version != w.version:
            self._recent.append((ent, ood))
            return
        w.entropy.append(ent)
        w.ood.append(ood)
        w.samples += len(res.entropy)
        try:
            # both versions on the same input with the same statistics and the same in-batch mix as the served
            # batch (fast path: mix None; a transductive batch: its own statistics): only the parameters differ
            xp = self.engine.prepare(x)
            mix = res.info.get("stat_mix")
            prev = self.engine.logits_for(xp, w.previous_base, mix)
            cur = self.engine.logits_for(xp, self.engine.base_params, mix)
            w.agree.append(float((prev.argmax(1) == cur.argmax(1)).mean()))
            w.paired_entropy_prev.append(float(entropy_from_logits(prev).mean()))
            w.paired_entropy_cur.append(float(entropy_from_logits(cur).mean()))
        except Exception as exc:  # a comparison failure must not hurt serving
            log.warning("agreement check failed: %s", exc)
        if len(w.entropy) >= self.watch_batches:
            self._decide(w)

    def _decide(self, w: _Watch) -> None:
        p = self.policy
        ent, ood = float(np.mean(w.entropy)), float(np.mean(w.ood))
        agree = float(np.mean(w.agree)) if w.agree else 1.0
        reasons = []
        if w.paired_entropy_cur:
            # same inputs through both versions: only the parameters differ, so no noise margin is needed
            ent = float(np.mean(w.paired_entropy_cur))
            before = float(np.mean(w.paired_entropy_prev))
            if ent > before * (1 + p.max_entropy_increase) + 0.02:
                reasons.append(f"mean entropy {ent:.3f} vs {before:.3f} for version {w.previous_version} "
                               "on the same inputs")
        elif np.isfinite(w.baseline_entropy):
            # other inputs than the baseline's: allow for the batch-to-batch spread of a short window
            noise = 3.0 * w.baseline_entropy_sd / np.sqrt(max(1, len(w.entropy)))
            if ent > w.baseline_entropy * (1 + p.max_entropy_increase) + 0.02 + noise:
                reasons.append(f"mean entropy {ent:.3f} vs {w.baseline_entropy:.3f} before")
        if np.isfinite(w.baseline_ood):
            # binomial noise of a rate over the window's samples, so a short window is not a coin flip
            q = min(max(w.baseline_ood, 0.05), 0.95)
            noise = 3.0 * np.sqrt(q * (1 - q) / max(1, w.samples))
            if ood > w.baseline_ood + p.max_ood_increase + noise:
                reasons.append(f"OOD rate {ood:.2f} vs {w.baseline_ood:.2f} before")
        if agree < p.min_agreement:
            reasons.append(f"agreement with version {w.previous_version} only {agree:.2f}")
        self._watch = None
        if reasons:
            self.rollback(w.previous_version, reason="; ".join(reasons), bad_version=w.version)
        else:
            self.counters["kept"] += 1
            self._event("kept", version=w.version, entropy=ent, ood=ood, agreement=agree)

    def rollback(self, to: int, reason: str, bad_version: int | None = None) -> None:
        try:
            params = self.versions.load(to)
        except VersionStoreError as exc:  # the bad version must go even when the way back is damaged on disk
            self.daemon._error("versions", f"{exc}; rolling back to the bundle's version 0 instead")
            reason, to, params = f"{reason}; {exc}", 0, self.versions.load(0)
        self.engine.apply_params(params, to)
        self.versions.set_current(to, reason=f"rollback: {reason}")
        if bad_version is not None:
            self._block(bad_version)
        self.daemon.metrics.param_version.set(to)
        self.counters["rolled_back"] += 1
        self._event("rolled_back", version=bad_version, to=to, reason=reason)

    # -- heartbeat and thread ----------------------------------------------------------------------
    def heartbeat(self) -> None:
        counters = {k: float(v) for k, v in self.counters.items()}
        counters["samples"] = float(self.daemon.samples_seen)
        hb = Heartbeat(model=self.model, param_version=self.engine.param_version, counters=counters,
                       status="watching" if self._watch else "ok")
        try:
            self.client.post(f"{self.url}/v1/heartbeat", content=hb.model_dump_json(),
                             headers={"content-type": "application/json"})
        except httpx.HTTPError:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
                self.heartbeat()
            except Exception as exc:  # never let the updater thread die
                log.exception("updater error: %s", exc)
            self._stop.wait(self.poll_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.client.close()

    def status(self) -> dict:
        return {"counters": dict(self.counters), "watching": self._watch.version if self._watch else None,
                "blocked_versions": sorted(self._blocked), "events": self.events[-10:]}
