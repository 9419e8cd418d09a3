"""The device daemon: engine + micro-batcher + selection + persistent upload queue + uploader + updater.

Everything that can fail for reasons outside the model (disk full, cloud down, a bad update) is contained:
predictions keep flowing and the problem is reported in ``status()`` and the logs.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from edgeadapt.core.bundle import Bundle
from edgeadapt.core.tensorfile import load_params, save_params
from edgeadapt.core.upload_encoding import UploadEncoder
from edgeadapt.core.wire import UploadSample
from edgeadapt.device.batcher import MicroBatcher
from edgeadapt.device.config import DeviceConfig
from edgeadapt.device.engine import AdaptiveEngine, EngineConfig
from edgeadapt.device.metrics import DeviceMetrics
from edgeadapt.device.predictions import Predictions
from edgeadapt.device.selection import SampleSelector
from edgeadapt.device.upload_queue import UploadQueue
from edgeadapt.device.version_manager import VersionManager
from edgeadapt.device.versions import VersionStore

log = logging.getLogger("edgeadapt.device")
ADAPT_STATE = "adapt_state.safetensors"
GUARD_QUIET_S = 300.0  # an adaptation-guard action keeps the device reported degraded this long
TOKEN_RELOAD_S = 5.0  # a refused token makes the daemon re-read token_file at most this often


def _describe(exc: BaseException) -> str:
    """The error with SQLite's extended code name (SQLITE_FULL, SQLITE_IOERR_WRITE, ...) when it has one."""
    name = getattr(exc, "sqlite_errorname", None)
    return f"{exc} [{name}]" if name else f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc)


#: the daemon's engine defaults where they differ from the library's (``DeviceConfig.engine`` overrides them):
#: ONNX Runtime's workers sleep between runs instead of spinning; spinning cost the event loop a core's share at
#: one connection and at 50 (docs/BENCHMARKS.md "Serving", issue 16)
DAEMON_ENGINE: dict[str, float | int | bool] = {"ort_spinning": False}


class DeviceDaemon:
    def __init__(self, config: DeviceConfig):
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.errors: dict[str, str] = {}
        self._error_since: dict[str, float] = {}
        self._error_count: dict[str, int] = {}
        self._error_after: dict[str, float] = {}  # a reason counts as degraded once it has lasted this long
        self._logged_at: dict[str, float] = {}
        self._health_lock = threading.RLock()
        self._token_read_at = 0.0
        self.metrics = DeviceMetrics()
        self.bundle = Bundle(config.bundle)
        self.manifest = self.bundle.manifest
        self.engine = AdaptiveEngine(self.bundle, EngineConfig(
            method=config.method, ood_detector=config.ood_detector, threads=config.threads, backend=config.backend,
            input_range_policy=config.input_range_policy, reliability=config.reliability,
            **{**DAEMON_ENGINE, **config.engine}))
        self.codec = self.engine.codec
        self.upload_encoder = UploadEncoder(self.codec, config.upload_encoding)
        if self.upload_encoder.why_raw:
            log.warning("upload_encoding %s does not apply to this bundle: %s; samples are uploaded raw",
                        config.upload_encoding, self.upload_encoder.why_raw)
        self._guard_seen = dict(self.engine.guard_counters)
        self._guard_at = 0.0
        self._reasons_shown: set[str] = set()
        self.selector = SampleSelector(  # the engine's own policy: one meaning of "reliable" on the device
            self.manifest.num_classes, self.engine.config.reliability, budget_samples_per_s=config.upload_samples_per_s,
            budget_bytes_per_s=config.upload_bytes_per_s, novel_budget_samples_per_s=config.novel_samples_per_s)
        self._state_ok = self._prepare_state_dir()
        self.versions = VersionStore(self.state_dir, self.bundle.params, keep=config.keep_versions) \
            if self._state_ok else None
        #: the one owner of the version in use (updates, rollbacks, the choice at start), None without a state dir
        self.version_manager = VersionManager(self.versions, self.engine, self.metrics, on_error=self._error) \
            if self.versions is not None else None
        self.queue: UploadQueue | None = None
        if self._state_ok:
            try:
                self.queue = UploadQueue(self.state_dir / "queue.sqlite", max_bytes=config.queue_max_bytes)
            except Exception as exc:
                self._error("queue", f"upload queue unavailable: {exc}")
        self._restore()
        self.uploader = None
        self.updater = None
        #: the cloud replica(s): uploads, update checks and heartbeats move on together when one stops answering
        self.cloud = None
        if config.cloud_url:
            from edgeadapt.device.cloud_endpoints import CloudEndpoints

            self.cloud = CloudEndpoints(config.cloud_url)
        if config.cloud_url and config.token and self.queue is not None:
            from edgeadapt.device.uploader import Uploader

            self.uploader = Uploader(self.queue, self.cloud, config.token, self.manifest.model_name,
                                     poll_interval=config.upload_interval_s, verify=config.tls_verify(),
                                     health=self, metrics=self.metrics, failing_after_s=config.degraded_after_s)
        if config.cloud_url and config.token and self.versions is not None:
            try:
                from edgeadapt.device.updater import Updater
            except ImportError:  # pragma: no cover - updater module not present
                Updater = None
            if Updater is not None:
                self.updater = Updater(self, self.cloud, config.token, poll_s=config.update_poll_s,
                                       watch_batches=config.watch_batches, long_poll_s=config.update_long_poll_s)
        self.batcher = MicroBatcher(self._process_batch, config.max_batch, config.max_wait_ms,
                                    to_float=self.codec.to_values, after=self._after_batch)
        self._stop = threading.Event()
        self._saver = threading.Thread(target=self._save_loop, name="state-saver", daemon=True)
        self.started = time.time()
        self.samples_seen = 0
        self.ood_seen = 0
        self._age_gauges()

    # -- health ------------------------------------------------------------------------------------
    def _error(self, key: str, msg: str, after_s: float = 0.0) -> None:
        """Record a problem for status(); log it when it is new, or changed and not logged in the last minute
        (a persisting error, e.g. a full disk hit by every batch, must not flood the log). ``after_s``: it makes
        the device degraded only once it has lasted that long (a network blip is not an outage)."""
        with self._health_lock:
            now = time.monotonic()
            if key not in self.errors:
                self._error_since[key] = time.time()
                self._error_count[key] = 0
            self._error_count[key] = self._error_count.get(key, 0) + 1
            self._error_after[key] = after_s
            if key not in self.errors or (self.errors[key] != msg and now - self._logged_at.get(key, 0.0) > 60):
                (log.warning if after_s else log.error)(msg)
                self._logged_at[key] = now
            self.errors[key] = msg

    def problem(self, key: str, msg: str, after_s: float = 0.0) -> None:
        """What the uploader and updater report (the same record as ``_error``). A token the cloud refuses makes
        the daemon re-read its token file: writing a new token there fixes it without a restart."""
        self._error(key, msg, after_s)
        if key == "cloud_auth":
            self._reload_token()

    def resolved(self, *keys: str) -> None:
        """These problems are fixed: they leave status, health and the next heartbeat."""
        with self._health_lock:
            for key in keys:
                if self.errors.pop(key, None) is not None:
                    log.info("resolved: %s", key)
                self._error_after.pop(key, None)

    def _reload_token(self) -> None:
        cfg = self.config
        if cfg.token_file is None or time.monotonic() - self._token_read_at < TOKEN_RELOAD_S:
            return
        self._token_read_at = time.monotonic()
        from edgeadapt.device.config import read_token_file

        try:
            token = read_token_file(cfg.token_file)
        except ValueError as exc:
            log.error("cannot re-read the token: %s", exc)
            return
        if token == cfg.token:
            return
        cfg.token = token
        if self.uploader is not None:
            self.uploader.token = token
        if self.updater is not None:
            self.updater.client.headers["Authorization"] = f"Bearer {token}"
        log.info("token file %s changed: using the new token", cfg.token_file)

    def not_ready(self) -> str | None:
        """Why predictions cannot be served now (readiness), or None: the engine and the batch worker are up."""
        if self._stop.is_set():
            return "stopping"
        worker = getattr(self.batcher, "_thread", None)
        stopped = getattr(self.batcher, "_stop", None)
        if worker is None or not worker.is_alive() or (stopped is not None and stopped.is_set()):
            return "batcher stopped: predictions cannot be served"
        if getattr(self.engine, "backend", None) is None:
            return "engine not built"
        return None

    def _age_gauges(self) -> None:
        """Ages of the last success (gauges read at scrape time): since start when never; NaN when not used."""
        m = self.metrics

        def age(at) -> float:
            t = at()
            return time.time() - (t if t is not None else self.started)

        if self.uploader is not None:
            m.upload_age.set_function(lambda: age(lambda: self.uploader.last_success_at))
        if self.updater is not None:
            up = self.updater
            m.heartbeat_age.set_function(lambda: age(lambda: up.last_heartbeat_at))
            if up.updates:
                m.update_check_age.set_function(lambda: age(lambda: up.last_check_at))
            m.watching.set_function(lambda: 1.0 if up._watch is not None else 0.0)
            m.watch_age.set_function(lambda: up.watch_age_s())

    # -- state dir ---------------------------------------------------------------------------------

    def _prepare_state_dir(self) -> bool:
        from edgeadapt.core.fileperm import private_dir

        try:
            private_dir(self.state_dir)  # 0700: it holds queued user inputs and the adaptation state
            probe = self.state_dir / ".write-probe"
            probe.write_bytes(b"ok")
            probe.unlink()
            return True
        except OSError as exc:
            why = "it exists and is not a directory" if self.state_dir.exists() and not self.state_dir.is_dir() \
                else str(exc)
            self._error("state_dir", f"state directory {self.state_dir} is not writable ({why}); "
                        "running without persistence: no uploads, no saved adaptation state")
            return False

    def _restore(self) -> None:
        if self.version_manager is not None:
            # the recorded version, else the previous good one, else version 0
            self.version_manager.restore()
        path = self.state_dir / ADAPT_STATE
        if path.is_file():
            try:
                self.engine.load_state_dict(load_params(path))
                log.info("adaptation state restored from %s", path)
            except Exception as exc:  # unreadable, or refused as not finite / not plausible: never restored
                self._error("adapt_state", f"saved adaptation state not restored ({exc}); starting fresh")
        self.metrics.param_version.set(self.engine.param_version)

    def save_state(self) -> bool:
        if not self._state_ok:
            return False
        path = self.state_dir / ADAPT_STATE
        state = self.engine.state_dict()
        problem = self.engine.state_problem({k[len("method."):]: v for k, v in state.items() if k.startswith("method.")})
        if problem is not None:  # a poisoned state is never written over the last good one
            self._error("save_state", f"adaptation state not saved: {problem}")
            return False
        try:
            tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # unique: concurrent savers never collide
            save_params(state, tmp)
            tmp.replace(path)
            self.errors.pop("save_state", None)
            return True
        except Exception as exc:
            self._error("save_state", f"could not save adaptation state: {_describe(exc)} ({self._disk_hint()})")
            return False

    def _disk_hint(self) -> str:
        """Free space and the process's file-size limit: what an operator needs to read a write error."""
        parts = []
        try:
            parts.append(f"{shutil.disk_usage(self.state_dir).free / 2**20:.1f} MiB free in {self.state_dir}")
        except OSError as exc:
            parts.append(f"state directory {self.state_dir}: {exc}")
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if soft != resource.RLIM_INFINITY:
                parts.append(f"file size limit (RLIMIT_FSIZE) {soft} bytes")
        except (ImportError, OSError, ValueError):  # pragma: no cover - not on this platform
            pass
        return "; ".join(parts)

    def _save_loop(self) -> None:
        while not self._stop.wait(self.config.save_state_every_s):
            self.save_state()

    # -- the hot path ------------------------------------------------------------------------------
    def _process_batch(self, x: np.ndarray, adapt: bool = True) -> Predictions:
        """One batch, validated at the input boundary (``codec.check``). ``adapt=False``: inputs that had to be
        clipped into range are served from the current state and neither adapt it nor get uploaded. What need
        not delay the answer (the update watch, metrics, selection and queueing) is ``_after_batch``'s."""
        res = self.engine.process(x, adapt=adapt, validated=True)
        if self.engine.guard_counters != self._guard_seen:
            self._report_guard()
        elif "adaptation_guard" in self.errors and time.monotonic() - self._guard_at > GUARD_QUIET_S:
            self.errors.pop("adaptation_guard", None)  # degraded until the guard has been quiet a while
        return Predictions.from_result(res, self.manifest.labels)

    def _after_batch(self, x: np.ndarray, served: Predictions, adapt: bool) -> None:
        """After the batch's requests have their answers, before the next batch runs (the batcher's worker)."""
        res = served.result
        if self.updater is not None:
            try:
                self.updater.observe(x, res)
            except Exception as exc:  # watching an update must never fail a prediction
                log.exception("update watch failed: %s", exc)
                self._error("updater", f"update watch failed: {exc}")
        n = len(x)
        self.samples_seen += n
        n_ood = int(res.ood.sum())
        self.ood_seen += n_ood
        m = self.metrics
        m.samples.inc(n)
        m.batch_size.observe(n)
        m.ood.inc(n_ood)
        m.ood_rate.set(n_ood / n)
        m.mean_entropy.set(float(res.entropy.mean()))
        if adapt:
            self._select_and_queue(x, res)

    def _report_guard(self) -> None:
        """The engine's guard refused batch statistics, reset the state or answered a batch from a fallback: the
        device serves, but degraded, and says why."""
        now = dict(self.engine.guard_counters)
        last = self.engine.guard_last or {}
        for key, n in now.items():
            new = n - self._guard_seen.get(key, 0)
            if new > 0:
                self.metrics.guard_events.labels(key).inc(new)
        self._guard_seen = now
        self._guard_at = time.monotonic()
        if last:
            self._error("adaptation_guard", f"adaptation guard: {last.get('event')} at batch {last.get('at_batch')}: "
                                       f"{last.get('reason')} (counts {now})")

    def _select_and_queue(self, x: np.ndarray, res) -> None:
        if self.queue is None or self.uploader is None:  # standalone: nothing queued that could never be sent
            return
        sample_bytes = round(self.upload_encoder.mean_bytes)  # the byte budget counts what the encoding sends
        if self.config.upload_all:
            adapt_idx, novel_idx = np.flatnonzero(~res.ood), np.flatnonzero(res.ood)
        else:
            sel = self.selector.select(res.probs, res.entropy, res.ood, sample_bytes=sample_bytes,
                                       ood_scores=res.ood_score)
            adapt_idx, novel_idx = sel.adapt, sel.novel
        samples = []
        for kind, idx in (("adapt", adapt_idx), ("novel", novel_idx)):
            for i in idx:
                wire = self.upload_encoder.encode(self.codec.to_upload(x[i]))
                samples.append(UploadSample(
                    id=uuid.uuid4().hex, input=wire, logits=[float(v) for v in res.logits[i]],
                    entropy=float(res.entropy[i]), ood_score=float(res.ood_score[i]), novel=(kind == "novel"),
                    param_version=res.param_version))
                self.metrics.uploads_queued.labels(kind).inc()
        if samples:
            try:
                self.queue.put_many(samples)
                self.errors.pop("queue", None)
            except Exception as exc:  # disk full etc.: predictions go on
                self._error("queue", f"could not queue uploads: {_describe(exc)} ({self._disk_hint()})")

    def predict(self, x: np.ndarray, timeout: float = 30.0) -> Predictions:
        """Library callers: validated here (as the HTTP boundary does), then batched with everyone else."""
        x, clipped = self.codec.check(x)
        return self.batcher.submit(x, adapt=not clipped).result(timeout)

    def predict_in_step(self, x: np.ndarray) -> Predictions:
        """One batch on the caller's thread, the after-batch work (selection, queueing, the update watch) done
        before it returns: lockstep benchmarks (bench/fleet.py) upload exactly what the batches they sent queued.
        Not for serving: it bypasses the batcher, so only one caller at a time."""
        x, clipped = self.codec.check(x)
        served = self._process_batch(x, adapt=not clipped)
        self._after_batch(x, served, not clipped)
        return served

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._saver.start()
        if self.uploader is not None:
            self.uploader.start()
        if self.updater is not None:
            self.updater.start()

    def stop(self) -> None:
        self._stop.set()
        self.batcher.close()
        if self.updater is not None:
            self.updater.stop()
        if self.uploader is not None:
            self.uploader.stop()
        self.save_state()
        if self.queue is not None:
            self.queue.close()

    def degraded(self) -> dict[str, dict]:
        """What part of the job fails now, per reason: the message, since when and how often (from ``errors``;
        a reason with a threshold, e.g. the cloud unreachable, once it has lasted that long)."""
        if "adaptation_guard" in self.errors and time.monotonic() - self._guard_at > GUARD_QUIET_S:
            self.resolved("adaptation_guard")  # quiet for a while: cleared even when no batch comes to clear it
        now = time.time()
        with self._health_lock:
            out = {k: {"reason": v, "since": self._error_since.get(k), "count": self._error_count.get(k, 1)}
                   for k, v in list(self.errors.items())
                   if now - self._error_since.get(k, now) >= self._error_after.get(k, 0.0)}
        m = self.metrics
        m.degraded.set(1.0 if out else 0.0)
        for key in list(self._reasons_shown):
            if key not in out:
                m.degraded_reason.remove(key)
                self._reasons_shown.discard(key)
        for key in out:
            m.degraded_reason.labels(key).set(1.0)
            self._reasons_shown.add(key)
        return out

    def uploads_state(self) -> str:
        """Whether samples are queued and sent, in words (status and doctor)."""
        if self.uploader is not None:
            return "on"
        if not self.config.cloud_url:
            return "off: standalone (no cloud configured), nothing is queued"
        if not self.config.token:
            return "off: no token for the cloud, nothing is queued"
        return "off: no writable state directory for the upload queue"

    def status(self) -> dict:
        q = self.queue.counters() if self.queue is not None else {}
        up = dict(self.uploader.stats) if self.uploader is not None else {}
        if self.uploader is not None:  # why uploads are failing, e.g. the cloud is down: visible without the logs
            up.update(last_status=self.uploader.last_status, last_error=self.uploader.last_error)
        self.metrics.queue_depth.set(q.get("queued", 0))
        if self.queue is not None:
            self.metrics.queue_fill.set(q.get("queued_bytes", 0) / max(1, self.queue.max_bytes))
            for k, v in q.items():
                if k.startswith("dropped_") or k == "rejected":
                    self.metrics.queue_dropped.labels(k.removeprefix("dropped_")).set(v)
        self.metrics.uploads_sent.set(q.get("sent", 0))
        self.metrics.uploads_dropped.set(sum(v for k, v in q.items() if k.startswith("dropped")))
        self.metrics.bytes_up.set(up.get("bytes_up", 0))
        st = {
            "model": self.manifest.model_name, "param_version": self.engine.param_version,
            "method": self.config.method, "ood_detector": self.config.ood_detector,
            "uptime_s": round(time.time() - self.started, 1), "samples": self.samples_seen,
            "adapted_batches": self.engine.batches,
            # served batches, and how many of them ran on the event loop's thread (a lone request, batcher.run_alone)
            "batcher": {"batches": self.batcher.batches, "run_alone": self.batcher.alone_batches},
            "ood_samples": self.ood_seen, "queue": q, "uploader": up, "errors": dict(self.errors),
            "upload_encoding": self.upload_encoder.status(),
            "versions_on_disk": self.versions.versions() if self.versions else [],
            "cloud": self.config.cloud_url,
            "cloud_endpoints": self.cloud.status() if self.cloud is not None else None,
            "adaptation_guard": {"counters": dict(self.engine.guard_counters), "last": self.engine.guard_last},
            "degraded": self.degraded(),
            "uploads": self.uploads_state(),
            "health": {"ready": self.not_ready() is None, "not_ready": self.not_ready(),
                       "degraded_after_s": self.config.degraded_after_s},
        }
        if self.queue is not None:
            st["queue"]["fill_ratio"] = round(q.get("queued_bytes", 0) / max(1, self.queue.max_bytes), 4)
        if self.version_manager is not None:  # also without an updater: a standalone device's manual rollbacks
            st["version_manager"] = self.version_manager.status()
        if self.updater is not None:
            st["updater"] = self.updater.status()
        return st
