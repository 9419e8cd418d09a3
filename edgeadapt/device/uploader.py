"""Drains the upload queue to the cloud: ``POST {cloud_url}/v1/samples`` with a ``SampleBatch`` JSON body.

Outcome per request:
- 2xx: every id in the batch is acked (deleted). The server is idempotent by sample id, so a batch that
  was stored but whose response got lost is simply sent again and stored once.
- 413 (body too large): the batch is split in halves and each half is sent on its own; a single sample
  that is still too large is dropped as rejected.
- 401 / 403: the device's token is wrong or revoked. That is a configuration problem, not a problem with
  the samples, so they are kept and retried with backoff (dropping them would empty the queue on a typo).
- other 4xx except 408 / 429: the server refused the batch; it is dropped and counted as ``rejected``
  (the server's message is logged).
- 408, 429, 5xx, network errors and timeouts: nacked, retried after an exponential backoff with jitter.

What the operator sees (``health``, the daemon): a refusal as ``uploads_refused`` with its reason in words
("uploads refused: sample too large (HTTP 413: ...)"), a refused token as ``cloud_auth``, failures that last
longer than ``failing_after_s`` as ``uploads_failing``; each clears at the next accepted upload. ``metrics``
count refused samples and failed requests by reason.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from typing import Protocol

import httpx

from edgeadapt.core.wire import MAX_BODY_BYTES, MAX_SAMPLES_PER_BATCH
from edgeadapt.device.cloud_endpoints import CloudEndpoints
from edgeadapt.device.upload_queue import UploadQueue

log = logging.getLogger(__name__)

STAT_NAMES = ("requests", "bytes_up", "acked", "rejected", "retried", "errors", "auth_errors")

#: bounded labels for a refusal, and how each reads in a degraded reason
REFUSAL_WORDS = {"too_large": "sample too large", "wrong_model": "the cloud does not serve this model",
                 "undecodable": "the cloud cannot decode the encoded samples (upload_encoding)",
                 "invalid_input": "the cloud's input contract refuses the samples",
                 "invalid": "the cloud finds the batch invalid", "other": "refused by the cloud"}


class Health(Protocol):
    """Where problems go (the daemon): a problem by key, and its resolution."""

    def problem(self, key: str, msg: str, after_s: float = 0.0) -> None: ...

    def resolved(self, *keys: str) -> None: ...


def detail(text: str, limit: int = 200) -> str:
    """The ``detail`` of a JSON error answer (FastAPI's shape), else the text, shortened."""
    try:
        d = json.loads(text).get("detail")
        if d is not None:
            text = d if isinstance(d, str) else json.dumps(d)
    except (ValueError, AttributeError):
        pass
    return " ".join(str(text).split())[:limit]


def refusal_kind(code: int, message: str) -> str:
    """A bounded label for a 4xx refusal of uploads (metrics; the words come from ``REFUSAL_WORDS``)."""
    m = message.lower()
    if code == 413 or ("exceeds" in m and "limit" in m):
        return "too_large"
    if "not served here" in m or "wrong model" in m:
        return "wrong_model"
    if "undecodable" in m:
        return "undecodable"
    if "input" in m:
        return "invalid_input"
    if code == 422:
        return "invalid"
    return "other"


def failure_kind(exc: BaseException | None, code: int | None = None) -> str:
    """A bounded label for a failed (retried) upload request."""
    if code is not None:
        return "auth" if code in (401, 403) else f"http_{code}" if code in (408, 429) else "http_5xx"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return "tls"
    return "network"


class Uploader:
    def __init__(
        self,
        queue: UploadQueue,
        cloud_url: str | CloudEndpoints,
        token: str,
        model: str,
        batch_size: int = 64,
        timeout: float = 10.0,
        client: httpx.Client | None = None,
        poll_interval: float = 1.0,
        max_body_bytes: int = MAX_BODY_BYTES,
        verify: ssl.SSLContext | bool = True,
        health: Health | None = None,
        metrics=None,
        failing_after_s: float = 60.0,
    ) -> None:
        self.queue = queue
        #: the cloud replicas (one, or several that share a store): a network failure moves to the next
        self.endpoints = cloud_url if isinstance(cloud_url, CloudEndpoints) else CloudEndpoints(cloud_url)
        self.token = token
        self.model = model
        self.batch_size = max(1, min(int(batch_size), MAX_SAMPLES_PER_BATCH))
        self.poll_interval = float(poll_interval)
        self.max_body_bytes = int(max_body_bytes)
        self._own_client = client is None
        self.client = client if client is not None else httpx.Client(timeout=timeout, verify=verify)
        self.stats = dict.fromkeys(STAT_NAMES, 0)
        self.last_status: int | None = None
        self.last_error: str | None = None
        self.last_success_at: float | None = None  # time.time() of the last accepted upload
        self.health = health
        self.metrics = metrics
        self.failing_after_s = float(failing_after_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self._failing = False  # the last send failed for a reason on the cloud's side or the network's

    # ------------------------------------------------------------------ one round
    def _body(self, items: list[tuple[str, bytes]]) -> bytes:
        head = b'{"model":' + json.dumps(self.model).encode() + b',"samples":['
        return head + b",".join(p for _, p in items) + b"]}"

    def send_once(self, now: float | None = None) -> int:
        """Send one batch of ready items; returns how many were acked (0 when idle or on failure)."""
        with self._send_lock:
            now = time.time() if now is None else now
            items = self.queue.peek_raw(self.batch_size, now)
            if not items:
                return 0
            # keep the body under the server's limit
            kept, size = [], 64 + len(self.model)
            for it in items:
                if kept and size + len(it[1]) + 1 > self.max_body_bytes:
                    break
                kept.append(it)
                size += len(it[1]) + 1
            return self._send(kept, now)

    def _send(self, items: list[tuple[str, bytes]], now: float) -> int:
        ids = [i for i, _ in items]
        body = self._body(items)
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        self.stats["requests"] += 1
        self.stats["bytes_up"] += len(body)
        base = self.endpoints.current
        try:
            resp = self.client.post(f"{base}/v1/samples", content=body, headers=headers)
        except httpx.HTTPError as e:
            if not isinstance(e, httpx.HTTPStatusError):
                self.endpoints.failed(base, f"{type(e).__name__}: {e}")
            self.stats["errors"] += 1
            self.last_status, self.last_error = None, f"{type(e).__name__}: {e}"
            if "CERTIFICATE_VERIFY_FAILED" in str(e):
                self.last_error = (f"TLS: the cloud's certificate did not verify ({e}); give the device the CA that "
                                   "signed it (--ca-file / ca_file)")
            log.warning("upload of %d samples failed (%s); will retry", len(ids), self.last_error)
            self._failing = True
            self._failed(failure_kind(e), f"uploads failing: {self.last_error[:200]}")
            self.stats["retried"] += self.queue.nack(ids, now)
            return 0
        code = resp.status_code
        self.last_status = code
        if 200 <= code < 300:
            self.last_error = None
            self.last_success_at = time.time()
            if self.health is not None:
                self.health.resolved("uploads_refused", "uploads_failing", "cloud_auth")
            n = self.queue.ack(ids)
            self.stats["acked"] += n
            if self._failing:  # the cloud is back: send the backlog now, not after each item's backoff
                self._failing = False
                ready = self.queue.retry_now()
                if ready:
                    log.info("cloud reachable again; %d backed-off samples are due now", ready)
            return n
        msg = resp.text[:500]
        self.last_error = f"HTTP {code}: {msg}"
        if code == 413 and len(items) > 1:
            half = len(items) // 2
            log.info("cloud said 413 for %d samples; splitting the batch", len(items))
            return self._send(items[:half], now) + self._send(items[half:], now)
        if code in (401, 403):
            self.stats["auth_errors"] += 1
            log.error("cloud refused the device token (HTTP %d: %s); samples kept, will retry", code, msg)
            self._failing = True
            self._count("upload_failures", "auth")
            if self.health is not None:
                self.health.problem("cloud_auth", f"the cloud refuses this device's token (HTTP {code}: "
                                    f"{detail(msg, 120)}): revoked, expired or wrong; samples are kept and retried")
            self.stats["retried"] += self.queue.nack(ids, now)
            return 0
        if 400 <= code < 500 and code not in (408, 429):
            n = self.queue.drop(ids, "rejected")
            self.stats["rejected"] += n
            log.error("cloud rejected %d samples (HTTP %d): %s", n, code, msg)
            kind = refusal_kind(code, msg)
            self._count("uploads_refused", kind, n)
            if self.health is not None:
                self.health.problem("uploads_refused", f"uploads refused: {REFUSAL_WORDS[kind]} (HTTP {code}: "
                                    f"{detail(msg)})")
            return 0
        self.stats["errors"] += 1
        log.warning("upload of %d samples got HTTP %d (%s); will retry", len(ids), code, msg)
        self._failing = True
        self._failed(failure_kind(None, code), f"uploads failing: HTTP {code}: {detail(msg)}")
        self.stats["retried"] += self.queue.nack(ids, now)
        return 0

    def _count(self, metric: str, reason: str, n: int = 1) -> None:
        if self.metrics is not None and n:
            getattr(self.metrics, metric).labels(reason).inc(n)

    def _failed(self, kind: str, msg: str) -> None:
        """A retried failure: counted now, degraded once failures have lasted ``failing_after_s``."""
        self._count("upload_failures", kind)
        if self.health is not None:
            self.health.problem("uploads_failing", msg, after_s=self.failing_after_s)

    # ------------------------------------------------------------------ background thread
    def _run(self) -> None:
        while not self._stop.is_set():
            before = len(self.queue)
            try:
                self.send_once()
            except Exception:  # never let the thread die; the queue is persistent
                log.exception("uploader round failed")
            if len(self.queue) >= before:  # nothing delivered or dropped: wait before the next round
                self._stop.wait(self.poll_interval)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="edgeadapt-uploader", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        self.stop()
        if self._own_client:
            self.client.close()

    def __enter__(self) -> Uploader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
