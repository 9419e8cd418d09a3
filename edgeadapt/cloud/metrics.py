"""Prometheus metrics of the cloud service (one private registry per service, so tests can run many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class CloudMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.samples_received = Counter("edgeadapt_cloud_samples_received_total", "uploads stored (new)", registry=r)
        self.samples_duplicate = Counter("edgeadapt_cloud_samples_duplicate_total", "uploads already stored", registry=r)
        self.bytes_in = Counter("edgeadapt_cloud_bytes_in_total", "request body bytes received on /v1/samples",
                                registry=r)
        self.requests_rejected = Counter("edgeadapt_cloud_requests_rejected_total", "requests refused",
                                         ["reason"], registry=r)
        self.heartbeats = Counter("edgeadapt_cloud_heartbeats_total", "heartbeats received", registry=r)
        self.versions_published = Counter("edgeadapt_cloud_versions_published_total", "gated versions published",
                                          registry=r)
        self.versions_rejected = Counter("edgeadapt_cloud_versions_rejected_total", "candidates the gate rejected",
                                         registry=r)
        self.train_seconds = Histogram("edgeadapt_cloud_train_seconds", "duration of a training round", registry=r,
                                       buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))
        self.train_samples = Counter("edgeadapt_cloud_train_samples_total", "uploads trained on", registry=r)
        self.updates_served = Counter("edgeadapt_cloud_updates_served_total", "update packages served", ["mode"],
                                      registry=r)
        self.update_bytes_out = Counter("edgeadapt_cloud_update_bytes_out_total", "update package bytes served",
                                        registry=r)
        self.latest_version = Gauge("edgeadapt_cloud_latest_version", "latest published version", registry=r)
        self.pending_samples = Gauge("edgeadapt_cloud_pending_samples", "uploads waiting for training", registry=r)
        self.upload_refusals = Counter("edgeadapt_cloud_upload_refusals_total", "upload requests refused, by reason "
                                       "(too_large, wrong_model, undecodable, invalid_input, invalid, schema)",
                                       ["reason"],
                                       registry=r)
        self.trainer_failures = Counter("edgeadapt_cloud_trainer_failures_total", "training rounds that raised",
                                        registry=r)
        self.store_errors = Counter("edgeadapt_cloud_store_errors_total", "requests that failed in the store "
                                    "(SQLite or blob I/O), answered 503", registry=r)

    def register(self, collector) -> None:
        """A collector read at scrape time (the service's health and the fleet's state)."""
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)
