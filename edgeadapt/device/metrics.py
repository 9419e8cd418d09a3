"""Prometheus metrics of the device daemon (own registry, so tests can run several daemons in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class DeviceMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("edgeadapt_requests", "predict requests", ["status"], registry=r)
        self.samples = Counter("edgeadapt_samples", "samples predicted", registry=r)
        self.latency = Histogram("edgeadapt_request_latency_seconds", "predict request latency", registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.batch_size = Histogram("edgeadapt_batch_size", "micro-batch size", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.ood = Counter("edgeadapt_ood_samples", "samples flagged out-of-distribution", registry=r)
        self.ood_rate = Gauge("edgeadapt_ood_rate", "OOD fraction of the last batch", registry=r)
        self.mean_entropy = Gauge("edgeadapt_mean_entropy", "mean prediction entropy of the last batch", registry=r)
        self.uploads_queued = Counter("edgeadapt_uploads_queued", "samples put in the upload queue", ["kind"],
                                      registry=r)
        self.uploads_sent = Gauge("edgeadapt_uploads_sent", "samples acknowledged by the cloud", registry=r)
        self.uploads_dropped = Gauge("edgeadapt_uploads_dropped", "samples dropped (queue bound, rejected)",
                                     registry=r)
        self.bytes_up = Gauge("edgeadapt_bytes_up", "request bytes sent to the cloud", registry=r)
        self.bytes_down = Gauge("edgeadapt_bytes_down", "update bytes received from the cloud", registry=r)
        self.queue_depth = Gauge("edgeadapt_upload_queue_items", "items waiting in the upload queue", registry=r)
        self.param_version = Gauge("edgeadapt_param_version", "parameter version in use", registry=r)
        self.updates = Counter("edgeadapt_updates", "update outcomes", ["outcome"], registry=r)
        self.guard_events = Counter("edgeadapt_adaptation_guard_events", "adaptation-state guard actions (batch "
                                    "statistics refused, state reset, non-finite batch answered from a fallback)",
                                    ["event"], registry=r)
        self.inputs_refused = Counter("edgeadapt_inputs_refused", "predict requests refused at the input boundary",
                                      ["reason"], registry=r)
        self.inputs_clipped = Counter("edgeadapt_inputs_clipped", "predict requests clipped into the declared range "
                                      "(served, never adapted on or uploaded)", registry=r)
        # what an alert is written on (docs/RELIABILITY.md "Alerts"): refusals and failures by reason, ages of the
        # last success, the watch, the queue's fill and its drops by policy, the degraded reasons themselves
        self.uploads_refused = Counter("edgeadapt_uploads_refused", "samples the cloud refused (4xx) and the device "
                                       "dropped, by reason", ["reason"], registry=r)
        self.upload_failures = Counter("edgeadapt_upload_failures", "upload requests that failed and will be retried "
                                       "(network, timeout, TLS, auth, 5xx, 408/429), by reason", ["reason"],
                                       registry=r)
        self.update_rejections = Counter("edgeadapt_update_rejections", "update packages rejected or refused, by "
                                         "reason", ["reason"], registry=r)
        nan = float("nan")
        self.upload_age = Gauge("edgeadapt_upload_last_success_age_seconds", "seconds since the cloud last accepted "
                                "an upload (since start when never; NaN when uploads are off)", registry=r)
        self.update_check_age = Gauge("edgeadapt_update_check_last_success_age_seconds", "seconds since the last "
                                      "update check the cloud answered (since start when never; NaN: no updater)",
                                      registry=r)
        self.heartbeat_age = Gauge("edgeadapt_heartbeat_last_success_age_seconds", "seconds since the cloud last "
                                   "accepted a heartbeat (since start when never; NaN: standalone)", registry=r)
        for g in (self.upload_age, self.update_check_age, self.heartbeat_age):
            g.set(nan)
        self.watching = Gauge("edgeadapt_update_watching", "1 while a new version is being watched", registry=r)
        self.watch_age = Gauge("edgeadapt_update_watch_age_seconds", "seconds the watch in progress has run (0: none)",
                               registry=r)
        self.queue_fill = Gauge("edgeadapt_upload_queue_fill_ratio", "queued bytes / the queue's byte bound",
                                registry=r)
        self.queue_dropped = Gauge("edgeadapt_upload_queue_dropped", "samples the queue dropped, by policy "
                                   "(oldest, full, too_large, attempts) or refusal (rejected)", ["reason"], registry=r)
        self.degraded = Gauge("edgeadapt_degraded", "1 while any part of the job fails (see /healthz reasons)",
                              registry=r)
        self.degraded_reason = Gauge("edgeadapt_degraded_reason", "1 per degraded reason in effect", ["reason"],
                                     registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
