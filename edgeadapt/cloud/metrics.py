"""Prometheus metrics of the cloud service (one private registry per service, so tests can run many).

What is per model (issue 18: several models per cloud) carries a ``model`` label: uploads, refusals, heartbeats,
rounds, publishes, trainer failures, packages served, the latest version and the pending uploads. Its values are
only ever names of registered models (the model a device is registered for, never the name a client sent), so
the number of series stays bounded by the registry; ``model=""`` is an upload refused before its device was
known (a declared Content-Length over the limit). What belongs to the process (requests refused by HTTP status,
store errors) has no model label. ``sum without (model) (...)`` gives the old totals.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

MODEL = "model"


class CloudMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        m = [MODEL]
        self.samples_received = Counter("edgeadapt_cloud_samples_received_total", "uploads stored (new)", m,
                                        registry=r)
        self.samples_duplicate = Counter("edgeadapt_cloud_samples_duplicate_total", "uploads already stored", m,
                                         registry=r)
        self.bytes_in = Counter("edgeadapt_cloud_bytes_in_total", "request body bytes received on /v1/samples", m,
                                registry=r)
        self.requests_rejected = Counter("edgeadapt_cloud_requests_rejected_total", "requests refused",
                                         ["reason"], registry=r)
        self.heartbeats = Counter("edgeadapt_cloud_heartbeats_total", "heartbeats received", m, registry=r)
        self.versions_published = Counter("edgeadapt_cloud_versions_published_total", "gated versions published",
                                          m, registry=r)
        self.versions_rejected = Counter("edgeadapt_cloud_versions_rejected_total", "candidates the gate rejected",
                                         m, registry=r)
        self.train_seconds = Histogram("edgeadapt_cloud_train_seconds", "duration of a training round", m,
                                       registry=r, buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))
        self.train_samples = Counter("edgeadapt_cloud_train_samples_total", "uploads trained on", m, registry=r)
        self.updates_served = Counter("edgeadapt_cloud_updates_served_total", "update packages served",
                                      [MODEL, "mode"], registry=r)
        self.update_bytes_out = Counter("edgeadapt_cloud_update_bytes_out_total", "update package bytes served", m,
                                        registry=r)
        self.latest_version = Gauge("edgeadapt_cloud_latest_version", "latest version in the store (read at "
                                    "scrape time: publishes, rollbacks and other replicas' rounds included)", m,
                                    registry=r)
        self.pending_samples = Gauge("edgeadapt_cloud_pending_samples", "uploads waiting for training (read at "
                                     "scrape time)", m, registry=r)
        self.upload_refusals = Counter("edgeadapt_cloud_upload_refusals_total", "upload requests refused, by reason "
                                       "(too_large, wrong_model, undecodable, invalid_input, invalid, schema)",
                                       [MODEL, "reason"], registry=r)
        self.trainer_failures = Counter("edgeadapt_cloud_trainer_failures_total", "training rounds that raised", m,
                                        registry=r)
        self.store_errors = Counter("edgeadapt_cloud_store_errors_total", "requests that failed in the store "
                                    "(SQLite or blob I/O), answered 503", registry=r)
        self._models: dict[str, ModelMetrics] = {}
        self._lock = threading.Lock()

    def model(self, name: str) -> ModelMetrics:
        """One model's series (created once, at 0, so that every served model shows on /metrics from the start).
        ``name`` must be a registered model's (see the module docstring)."""
        with self._lock:
            found = self._models.get(name)
            if found is None:
                found = self._models[name] = ModelMetrics(self, name)
            return found

    def register(self, collector) -> None:
        """A collector read at scrape time (the service's health and the fleet's state)."""
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ByModel:
    """A metric with more labels than ``model``, the model already chosen: ``labels(reason=...)``."""

    def __init__(self, metric, model: str) -> None:
        self.metric, self.model = metric, model

    def labels(self, **labels: str):
        return self.metric.labels(**{MODEL: self.model}, **labels)


class ModelMetrics:
    """The series of one model under the names ``CloudMetrics`` gives them, so that the trainer, the Ray scheduler
    and ingest count into their own model's series with the code they had (``metrics.versions_published.inc()``)."""

    def __init__(self, metrics: CloudMetrics, model: str) -> None:
        self.name = model
        one = {MODEL: model}
        self.samples_received = metrics.samples_received.labels(**one)
        self.samples_duplicate = metrics.samples_duplicate.labels(**one)
        self.bytes_in = metrics.bytes_in.labels(**one)
        self.heartbeats = metrics.heartbeats.labels(**one)
        self.versions_published = metrics.versions_published.labels(**one)
        self.versions_rejected = metrics.versions_rejected.labels(**one)
        self.train_seconds = metrics.train_seconds.labels(**one)
        self.train_samples = metrics.train_samples.labels(**one)
        self.update_bytes_out = metrics.update_bytes_out.labels(**one)
        self.trainer_failures = metrics.trainer_failures.labels(**one)
        self.updates_served = ByModel(metrics.updates_served, model)
        self.upload_refusals = ByModel(metrics.upload_refusals, model)
        self._parent = metrics
        self.latest_version = self.pending_samples = None  # read from the model's store once it is served

    def watch(self, store) -> None:
        """Read this model's latest version and pending uploads from its store view at each scrape (NaN while the
        store fails: the scrape itself must not): nothing else sets them."""
        one = {MODEL: self.name}
        self.latest_version = self._parent.latest_version.labels(**one)
        self.latest_version.set_function(_nan_on_error(lambda: store.latest_version() or 0))
        self.pending_samples = self._parent.pending_samples.labels(**one)
        self.pending_samples.set_function(_nan_on_error(lambda: store.count_samples("train", consumed=False)))


def _nan_on_error(f: Callable[[], float]) -> Callable[[], float]:
    def read() -> float:
        try:
            return float(f())
        except Exception:  # the store's failure is a degraded reason (health.py); the scrape still answers
            return math.nan

    return read
