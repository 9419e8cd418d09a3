"""Pull, verify, apply, watch, roll back: how a device takes a cloud update without downtime.

1. Long-poll ``GET /v1/updates?model=…&have=V&have_hash=H&wait=S`` (204 = current after waiting up to S s; the
cloud answers as soon as it publishes). ``H`` names the exact parameters the device holds (a lossy package's
reconstruction), so the cloud builds the next delta against them without remembering what it served. Heartbeats
go on their own thread, every ``poll_s``, whatever a check waits. 2. Verify the package (signature with the bundle's
cloud key, model id, base version and hash, no downgrade) — a package that fails is never applied.
3. Save the new version to disk, build its ONNX Runtime session off the hot path, swap it in between
batches. 4. Watch ``watch_batches`` batches: the previous version's parameters are kept and run on the same
inputs, with the same statistics and in-batch mix as the served batch, so agreement and mean entropy compare
the two versions on identical batches (a short window of noisy traffic cannot trip them); the OOD rate is
compared with the window before, allowing for its sampling noise. 5. Keep it, or roll back by itself and record
why; a rolled-back version is not taken again.

Hostile updates (DESIGN §15): a download is streamed with a size cap derived from the bundle's adaptable tensors
and a total deadline; a package is checked for value bounds per tensor kind before it is applied
(``core.param_bounds``); a version whose outputs are not finite is rolled back at once, and a non-finite
measurement never reads as "kept". A package refused once is remembered (its sha256 and the version it was
refused against) and hostile outcomes back the polling off, so nothing is re-verified in a hot loop. Every change
of the version in use (an update taken, a rollback) goes through the device's ``VersionManager``, which owns the
block list, the pin and the events; a manual rollback there (``switch_by_hand``) takes the same lock as an
update and tells the updater first, which ends a watch in progress.

No pointless loops (issue 20): once a package for target T was refused against version V (rejected, blocked,
pinned), the next polls ask ``/v1/updates/info`` first and download nothing while the cloud still offers T; a
bundle without the cloud's public key never downloads at all. A watch that has not seen its window after
``watch_timeout_s`` decides on what it saw, or, with no traffic at all, keeps the version unwatched and says so.
What fails is reported to the daemon's health (``cloud_unreachable`` past ``degraded_after_s``, ``cloud_auth``,
``updater``, ``updates_rejected``, ``update_rolled_back``, ``heartbeat``), and the heartbeat carries the
daemon's degraded reasons to the cloud.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from edgeadapt.core import update_package as UP
from edgeadapt.core.domain_signature import SCHEME as SIGNATURE_SCHEME
from edgeadapt.core.jsonsafe import json_safe
from edgeadapt.core.mathops import entropy_from_logits
from edgeadapt.core.tensorfile import params_hash
from edgeadapt.core.wire import DomainSignature, Heartbeat, UpdateInfo
from edgeadapt.device.cloud_endpoints import CloudEndpoints
from edgeadapt.device.version_manager import VersionManager

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
    started: float = field(default_factory=time.monotonic)
    agree: list = field(default_factory=list)
    # the same inputs through both versions: a paired entropy comparison that input noise cannot trip
    paired_entropy_prev: list = field(default_factory=list)
    paired_entropy_cur: list = field(default_factory=list)


#: per fp32 value of the bundle's adaptable tensors, what an update response may hold (fp32 is the largest mode;
#: x2 leaves room for zstd and safetensors framing), plus a header allowance
DOWNLOAD_BYTES_PER_VALUE = 8
DOWNLOAD_HEADER_ALLOWANCE = 64 << 10
DOWNLOAD_BYTES_PER_TENSOR = 256  # the header's tensor entry, uncompressed
#: polling outcomes after which the next poll comes sooner than a backoff
_HEALTHY = ("current", "applied", "busy", "error", "off")
LONG_POLL_MIN_GAP_S = 1.0  # long-polling: held checks start at most this often
INFO_BYTES = 64 << 10  # an /v1/updates/info or heartbeat answer is read up to this much

#: bounded labels for why an update was refused, the words a degraded reason uses, and what each label matches
REJECTION_KINDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("no_public_key", "no public key", ("no cloud public key", "invalid public key")),
    ("signature", "bad signature (signed with another key?)", ("bad signature",)),
    ("wrong_model", "package for another model", ("wrong model",)),
    ("base_mismatch", "package against other parameters", ("base version mismatch", "base params hash")),
    ("downgrade", "downgrade", ("downgrade",)),
    ("bounds", "implausible values", ("implausible", "non-finite")),
    ("too_large", "too large", ("exceeds", "decompress")),
    ("timeout", "download too slow", ("took more than", "timed out")),
)


def rejection_kind(reason: str) -> tuple[str, str]:
    """(metric label, words) for a rejection or refusal reason; anything else is a malformed package."""
    r = reason.lower()
    for kind, words, needles in REJECTION_KINDS:
        if any(n in r for n in needles):
            return kind, words
    return "malformed", "malformed package"


def _detail(text: str, limit: int = 200) -> str:
    from edgeadapt.device.uploader import detail

    return detail(text, limit)


def max_update_bytes(params: dict) -> int:
    """The size cap for an update download to a device holding ``params`` (the bundle's adaptable tensors)."""
    n = sum(int(np.asarray(v).size) for v in params.values())
    return DOWNLOAD_BYTES_PER_VALUE * n + DOWNLOAD_HEADER_ALLOWANCE + DOWNLOAD_BYTES_PER_TENSOR * len(params)


class Updater:
    def __init__(self, daemon, cloud_url: str | CloudEndpoints, token: str, poll_s: float = 2.0, watch_batches: int = 8,
                 policy: WatchPolicy | None = None, client: httpx.Client | None = None,
                 download_timeout_s: float | None = None, max_download_bytes: int | None = None,
                 max_backoff_s: float | None = None, long_poll_s: float = 0.0):
        self.daemon = daemon
        self.engine = daemon.engine
        self.versions = daemon.versions
        #: the one owner of the version in use: switches, the block list, the pin and the events
        self.manager: VersionManager = daemon.version_manager
        self.manager.listener = self
        self.model = daemon.manifest.model_name
        self.public_key = daemon.manifest.cloud_public_key
        self.endpoints = cloud_url if isinstance(cloud_url, CloudEndpoints) else CloudEndpoints(cloud_url)
        self.poll_s = poll_s
        #: how long the background check asks the cloud to hold it open until a version is published (0: none)
        self.long_poll_s = float(long_poll_s)
        self.watch_batches = watch_batches
        self.policy = policy or WatchPolicy()
        self.client = client or httpx.Client(timeout=30, headers={"Authorization": f"Bearer {token}"},
                                             verify=daemon.config.tls_verify())
        # value bounds: every new version is checked against the bundle's own (version 0) tensors, by kind
        self.reference = dict(daemon.bundle.params)
        self.kinds = {t.name: t.kind for t in daemon.manifest.adaptable}
        # the total deadline of one download: this argument, else the device config's update_download_timeout_s
        self.download_timeout_s = float(download_timeout_s or daemon.config.update_download_timeout_s)
        self.max_download_bytes = int(max_download_bytes or max_update_bytes(self.reference))
        self.max_backoff_s = float(max_backoff_s) if max_backoff_s is not None else max(poll_s, min(60.0, 16 * poll_s))
        cfg = daemon.config
        self.updates = bool(getattr(cfg, "updates", True))  # False: heartbeats only
        self.watch_timeout_s = float(getattr(cfg, "watch_timeout_s", 600.0))
        self.failing_after_s = float(getattr(cfg, "degraded_after_s", 60.0))
        self.last_check_at: float | None = None  # time.time() of the last update check the cloud answered
        self.last_heartbeat_at: float | None = None  # ... and of the last heartbeat it accepted
        # version in use -> (target, outcome) of the package refused against it: not downloaded again while the
        # cloud's /v1/updates/info still offers that target
        self._refused: dict[int, tuple[int, str]] = {}
        self._code: int | None = None  # HTTP status of the last update check
        self._offered: int | None = None  # the version the last download's X-Edgeadapt-Version header named
        self._failures = 0  # hostile outcomes in a row: the backoff exponent
        self._recent = collections.deque(maxlen=max(watch_batches, 4))
        self._watch: _Watch | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hb_thread: threading.Thread | None = None
        self._long_polling = False  # the updater thread is waiting on a held check (nothing to interrupt)
        self._held: tuple[int, int, str] | None = None  # (version, id of its params, their hash)
        # the version store's lock: updates, automatic and manual rollbacks (and a daemon without an updater)
        # all change the version in use under the same one
        self._lock = self.manager.lock
        self.counters = {"checks": 0, "applied": 0, "rejected": 0, "rolled_back": 0, "kept": 0, "bytes_down": 0,
                         "errors": 0, "downloads_refused": 0, "rejected_again": 0, "pinned_skips": 0,
                         "manual_rollbacks": 0, "kept_unwatched": 0, "info_checks": 0}
        self._rejected: collections.OrderedDict[tuple[str, int], str] = collections.OrderedDict()

    @property
    def events(self) -> list[dict]:
        """The device's update and version events (the version manager keeps them)."""
        return self.manager.events

    def _event(self, kind: str, **kw) -> None:
        self.manager.record(kind, **kw)
        if kind in ("rejected", "download_refused"):
            self.daemon.metrics.update_rejections.labels(rejection_kind(str(kw.get("reason", "")))[0]).inc()

    def _rejected_problem(self, reason: str, target: int | None) -> None:
        words = rejection_kind(reason)[1]
        which = f"version {target}" if target is not None else "the package"
        self.daemon.problem("updates_rejected", f"rejects updates: {words} ({which}: {reason[:150]})")

    def _reached(self) -> None:
        """The cloud answered (whatever it said): it is reachable."""
        self.daemon.resolved("cloud_unreachable")

    def _unreachable(self, exc: BaseException) -> None:
        self.endpoints.request_failed(exc)  # the next request goes to another replica, if there is one
        self.daemon.problem("cloud_unreachable", f"cloud unreachable: {type(exc).__name__}: {str(exc)[:200]}",
                            after_s=self.failing_after_s)

    def _check_answered(self, code: int | None, why: str) -> None:
        """An update check the cloud answered with an error: a refused token is ``cloud_auth``, the rest
        ``updater``."""
        if code in (401, 403):
            self.daemon.problem("cloud_auth", f"the cloud refuses this device's token ({why[:160]}): revoked, "
                                "expired or wrong")
        else:
            self.daemon.problem("updater", why)

    @property
    def url(self) -> str:
        """The cloud replica in use now (``endpoints``: the uploader's too)."""
        return self.endpoints.current

    # -- polling -----------------------------------------------------------------------------------
    def held_hash(self) -> str:
        """The hash of the parameters in use (cached per version)."""
        params, version = self.engine.base_params, self.engine.param_version
        held = self._held
        if held is None or held[0] != version or held[1] != id(params):
            held = (version, id(params), params_hash(params))
            self._held = held
        return held[2]

    def _query(self, have: int, wait: float = 0.0) -> dict:
        q: dict = {"model": self.model, "have": have, "have_hash": self.held_hash()}
        if wait > 0:
            q["wait"] = round(wait, 3)
        return q

    def check_once(self, wait: float = 0.0) -> str:
        """One poll, held open by the cloud up to ``wait`` s until a version is published; returns "current",
        "applied", "rejected", "blocked", "pinned", "refused", "busy", "off" (updates not wanted) or "error"."""
        if not self.updates:
            return "off"
        # under the version lock: a manual switch ends the watch and changes the version in one step, and a check
        # that saw the one without the other would ask the cloud to hold it open for a version already left
        with self._lock:
            w = self._watch
            if w is not None:
                if time.monotonic() - w.started <= self.watch_timeout_s:
                    return "busy"
                self._watch_timed_out(w)
                if self._watch is not None:
                    return "busy"
            self.counters["checks"] += 1
            have = self.engine.param_version
        try:
            known = self._precheck(have)
        except httpx.HTTPError as exc:
            self.counters["errors"] += 1
            self._unreachable(exc)
            return "error"
        if known is not None:
            return known
        self._long_polling = wait > 0
        try:
            outcome, got = self._download(have, wait)
        except httpx.TimeoutException as exc:
            outcome, got = "refused", f"update download timed out: {type(exc).__name__}: {exc}"
        except httpx.HTTPError as exc:
            if self._stop.is_set():
                return "off"
            self.counters["errors"] += 1
            self._unreachable(exc)
            return "error"
        finally:
            self._long_polling = False
        if self._stop.is_set():  # stopped while the cloud held the check: take nothing now
            return "off"
        self._reached()
        if outcome == "refused":
            self.counters["downloads_refused"] += 1
            self.daemon._error("updater", f"update download refused: {got}")
            self._event("download_refused", reason=got, have=have)
            if self._offered is not None:  # the cloud named the version: not downloaded again while it offers it
                self._refused[have] = (self._offered, "refused")
            return "refused"
        if outcome == "error":
            self.counters["errors"] += 1
            self._check_answered(self._code, got)
            return "error"
        self.last_check_at = time.time()
        self.daemon.resolved("updater", "cloud_auth")
        if outcome == "current":
            self._refused.pop(have, None)
            self.daemon.resolved("updates_rejected", "update_rolled_back")  # nothing refused is offered now
            return "current"
        return self.apply_package(got, asked_at=have)

    def _precheck(self, have: int) -> str | None:
        """Before downloading: when a package was refused against ``have`` (or this bundle has no key to verify
        any), ask ``/v1/updates/info`` what the cloud offers. The same target again: the same outcome, nothing
        downloaded. Returns the outcome, or None: go and download."""
        refused = self._refused.get(have)
        if self.public_key is not None and refused is None:
            return None
        self.counters["info_checks"] += 1
        kind, got = self._info(have)
        self._reached()
        if kind == "error":
            self.counters["errors"] += 1
            self._check_answered(self._code, str(got))
            # an answer that is not an UpdateInfo is a hostile one: backed off like a refused download
            return "refused" if self._code == 200 else "error"
        self.last_check_at = time.time()
        self.daemon.resolved("updater", "cloud_auth")
        if kind == "current":
            self._refused.pop(have, None)
            self.daemon.resolved("updates_rejected", "update_rolled_back")
            return "current"
        target = got.version  # type: ignore[union-attr]
        if self.public_key is None:
            reason = "no cloud public key configured: cannot verify the update"
            if refused is None or refused[0] != target:  # counted and recorded once per version offered
                self._refused[have] = (target, "rejected")
                self.counters["rejected"] += 1
                self._event("rejected", reason=reason, target=target, downloaded=False)
            else:
                self.counters["rejected_again"] += 1
            self.daemon.problem("updates_rejected", f"rejects updates: no public key (the cloud offers version "
                                f"{target}; the bundle carries no cloud public key: re-export it with --cloud-key, "
                                "or run the device with --no-updates)")
            return "rejected"
        if refused is not None and refused[0] == target:
            if refused[1] == "pinned":
                self.counters["pinned_skips"] += 1
            else:
                self.counters["rejected_again"] += 1
            return refused[1]
        return None  # something else is offered now: download it

    def _info(self, have: int) -> tuple[str, UpdateInfo | str | None]:
        """``GET /v1/updates/info`` -> ("current", None), ("offer", UpdateInfo) or ("error", why); bounded like a
        download."""
        t0 = time.monotonic()
        with self.client.stream("GET", f"{self.url}/v1/updates/info", params=self._query(have),
                                headers={"Accept-Encoding": "identity"},
                                timeout=httpx.Timeout(min(10.0, self.download_timeout_s))) as r:
            self._code = r.status_code
            if r.status_code == 204:
                return "current", None
            body, why = self._read(r, INFO_BYTES, t0, self.download_timeout_s)
            if r.status_code != 200:
                return "error", f"update check answered {r.status_code}: {_detail(body.decode('utf-8', 'replace'))}"
        try:
            return "offer", UpdateInfo.model_validate_json(body)
        except ValueError:
            return "error", f"update info unreadable ({why or 'not an UpdateInfo'}): {body[:80]!r}"

    def _download(self, have: int, wait: float = 0.0) -> tuple[str, bytes | str | None]:
        """GET the update, streamed: -> ("current", None), ("ok", bytes), ("error", why) or ("refused", why).

        At most ``max_download_bytes`` are read (a Content-Length above it is refused before the body), and the
        whole download must finish within ``download_timeout_s``: a 768 MiB response took a device to 3.2 GB RSS,
        and a body dripped one byte per 5 s hung the updater and its heartbeats. The deadline is checked after
        every network read, each of which is itself limited to min(10 s, deadline), so a refusal comes within
        deadline + one read timeout. Bodies are asked for and accepted only uncompressed (a gzip body could
        inflate past the cap in one read). A long-poll (``wait``) extends the deadlines by the time the cloud may
        hold the request before it answers."""
        t0 = time.monotonic()
        limit, cap = self.download_timeout_s + wait, self.max_download_bytes
        per_read = min(10.0, self.download_timeout_s)
        with self.client.stream("GET", f"{self.url}/v1/updates", params=self._query(have, wait),
                                headers={"Accept-Encoding": "identity"},
                                timeout=httpx.Timeout(per_read, read=per_read + wait)) as r:
            self._code = r.status_code
            offered = r.headers.get("x-edgeadapt-version", "")
            self._offered = int(offered) if offered.isdigit() else None
            if r.status_code == 204:
                return "current", None
            if r.status_code != 200:
                text = self._read(r, 4096, t0, limit)[0].decode("utf-8", "replace")
                return "error", f"update check answered {r.status_code}: {text[:200]}"
            enc = r.headers.get("content-encoding", "identity").strip().lower()
            if enc not in ("", "identity"):
                return "refused", f"update response has content-encoding {enc[:50]!r}; only identity is accepted"
            declared = r.headers.get("content-length")
            if declared is not None:
                try:
                    size = int(declared)
                except ValueError:
                    return "refused", f"invalid Content-Length {declared[:50]!r}"
                if size > cap:
                    return "refused", (f"update of {size} bytes (Content-Length) exceeds the {cap}-byte limit "
                                       "for this bundle")
            data, why = self._read(r, cap, t0, limit)
            self.counters["bytes_down"] += len(data)
            self.daemon.metrics.bytes_down.set(self.counters["bytes_down"])
            if why:
                return "refused", why
            return "ok", data

    @staticmethod
    def _read(r: httpx.Response, cap: int, t0: float, limit: float) -> tuple[bytes, str | None]:
        """Read a streamed body up to ``cap`` bytes and ``limit`` seconds since ``t0`` -> (bytes, why it stopped
        early or None)."""
        buf = bytearray()
        for chunk in r.iter_raw():  # no chunk_size: every network read comes back at once, however small
            buf += chunk
            if len(buf) > cap:
                return bytes(buf[:cap]), (f"update response exceeds the {cap}-byte limit for this bundle "
                                          f"(stopped after {len(buf)} bytes)")
            if time.monotonic() - t0 > limit:
                return bytes(buf), (f"update download took more than {limit:g} s ({len(buf)} bytes in "
                                    f"{time.monotonic() - t0:.1f} s)")
        return bytes(buf), None

    @staticmethod
    def _peek_target(data: bytes) -> int | None:
        """The package's target version from its (not yet verified) header, or None when unreadable."""
        try:
            v = UP.read_header(data)["target"]["version"]
        except Exception:
            return None
        return v if type(v) is int else None

    def _skip(self, target: int | None) -> str | None:
        """"pinned" or "blocked" when a package for ``target`` must not be taken (the version manager's pin and
        block list), else None."""
        refusal = self.manager.refusal(target)
        if refusal == "pinned":
            self.counters["pinned_skips"] += 1
        return refusal

    def apply_package(self, data: bytes, asked_at: int | None = None) -> str:
        """Verify and take a package (``asked_at``: the version the check that fetched it started from)."""
        peeked = self._peek_target(data)
        skip = self._skip(peeked)
        if skip:
            if peeked is not None:
                self._refused[self.engine.param_version] = (peeked, skip)
            return skip
        digest = hashlib.sha256(bytes(data)).hexdigest()
        with self._lock:
            base_version = self.engine.param_version
            if asked_at is not None and base_version != asked_at:
                # fetched for a version this device has left since: another check (a long-poll and a sync
                # answered by the same publish) took an update first; this one is stale, not hostile
                return "current"
            seen = self._rejected.get((digest, base_version))
            if seen is not None:  # the same bytes against the same version: the same answer, without the work
                self.counters["rejected_again"] += 1
                return "rejected"
            base_params = dict(self.engine.base_params)
            try:
                version, params, header = UP.verify_and_apply(data, self.public_key, self.model, base_version,
                                                              base_params, reference=self.reference,
                                                              kinds=self.kinds)
            except Exception as exc:  # anything a package makes the checks raise is a rejection with its reason
                reason = exc.reason if isinstance(exc, UP.UpdateRejected) else \
                    f"package could not be verified: {type(exc).__name__}: {str(exc)[:200]}"
                self._rejected[(digest, base_version)] = reason
                while len(self._rejected) > 64:
                    self._rejected.popitem(last=False)
                self.counters["rejected"] += 1
                self._event("rejected", reason=reason, target=peeked, sha256=digest[:16])
                self._rejected_problem(reason, peeked)
                if peeked is not None:
                    self._refused[base_version] = (peeked, "rejected")
                return "rejected"
            skip = self._skip(version)  # the verified version (the peek may not have read it)
            if skip:
                self._refused[base_version] = (version, skip)
                return skip
            previous_base = self.engine.base_params
            recent = list(self._recent)
            self.counters["applied"] += 1
            # stored, swapped in, recorded in use; a pin ends (this is newer than every version it covers)
            self.manager.take(version, params, base_version, header.get("compression"))
            self._refused.clear()
            self.daemon.resolved("updates_rejected", "update_rolled_back")
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
            if math.isfinite(ent) and math.isfinite(ood):  # a non-finite batch is no baseline
                self._recent.append((ent, ood))
            return
        if not (np.isfinite(res.logits).all() and np.isfinite(res.entropy).all()):
            # a version whose outputs are not finite goes now, not at the end of the window
            self._finish(w, [f"non-finite logits or entropy from version {w.version} on a served batch"])
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
        except Exception as exc:  # a comparison failure must not hurt serving
            log.warning("agreement check failed: %s", exc)
        else:
            if not np.isfinite(cur).all():  # argmax(NaN) = 0 would "agree" on traffic that is mostly class 0
                self._finish(w, [f"non-finite logits from version {w.version} (paired with version "
                                 f"{w.previous_version} on the same inputs)"])
                return
            w.agree.append(float((prev.argmax(1) == cur.argmax(1)).mean()))
            w.paired_entropy_prev.append(float(entropy_from_logits(prev).mean()))
            w.paired_entropy_cur.append(float(entropy_from_logits(cur).mean()))
        if len(w.entropy) >= self.watch_batches:
            self._decide(w)

    def watch_age_s(self) -> float:
        w = self._watch
        return time.monotonic() - w.started if w is not None else 0.0

    def _watch_timed_out(self, w: _Watch) -> None:
        """No full window within ``watch_timeout_s``: decide on the batches seen, or, with none (no traffic),
        keep the version unwatched, as a stated outcome rather than "watching" for ever."""
        self._event("watch_timed_out", version=w.version, batches=len(w.entropy), of=self.watch_batches,
                    after_s=round(time.monotonic() - w.started, 1))
        if w.entropy:
            self._decide(w)
            return
        with self._lock:
            if self._watch is not w:
                return
            self._watch = None
            self.counters["kept_unwatched"] += 1
            self._event("kept_unwatched", version=w.version,
                        reason=f"no traffic in the {self.watch_timeout_s:g} s after the update: kept without a watch")

    def _decide(self, w: _Watch) -> None:
        p = self.policy
        ent, ood = float(np.mean(w.entropy)), float(np.mean(w.ood))
        agree = float(np.mean(w.agree)) if w.agree else float("nan")
        reasons = []
        if not w.agree:
            reasons.append(f"version {w.version} could not be compared with version {w.previous_version} on any "
                           "batch of the window")
        if w.paired_entropy_cur:
            # same inputs through both versions: only the parameters differ, so no noise margin is needed
            ent = float(np.mean(w.paired_entropy_cur))
            before = float(np.mean(w.paired_entropy_prev))
            if not (ent <= before * (1 + p.max_entropy_increase) + 0.02):  # NaN fails this, as it must
                reasons.append(f"mean entropy {ent:.3f} vs {before:.3f} for version {w.previous_version} "
                               "on the same inputs")
        elif np.isfinite(w.baseline_entropy):
            # other inputs than the baseline's: allow for the batch-to-batch spread of a short window
            noise = 3.0 * w.baseline_entropy_sd / np.sqrt(max(1, len(w.entropy)))
            if not (ent <= w.baseline_entropy * (1 + p.max_entropy_increase) + 0.02 + noise):
                reasons.append(f"mean entropy {ent:.3f} vs {w.baseline_entropy:.3f} before")
        if not math.isfinite(ood):
            reasons.append(f"OOD rate {ood} is not finite")
        elif np.isfinite(w.baseline_ood):
            # binomial noise of a rate over the window's samples, so a short window is not a coin flip
            q = min(max(w.baseline_ood, 0.05), 0.95)
            noise = 3.0 * np.sqrt(q * (1 - q) / max(1, w.samples))
            if ood > w.baseline_ood + p.max_ood_increase + noise:
                reasons.append(f"OOD rate {ood:.2f} vs {w.baseline_ood:.2f} before")
        if w.agree and not (agree >= p.min_agreement):
            reasons.append(f"agreement with version {w.previous_version} only {agree:.2f}")
        if not math.isfinite(ent) and not any("entropy" in r for r in reasons):
            reasons.append(f"mean entropy {ent} is not finite")
        self._finish(w, reasons, entropy=ent, ood=ood, agreement=agree)

    def _finish(self, w: _Watch, reasons: list[str], **measured: float) -> None:
        """End watch ``w``: roll back when there are reasons, else keep. Under the lock, and only if ``w`` is
        still the watch in progress (a manual rollback may have ended it between two batches)."""
        with self._lock:
            if self._watch is not w:
                return
            self._watch = None
            if reasons:
                self.rollback(w.previous_version, reason="; ".join(reasons), bad_version=w.version)
            else:
                self.counters["kept"] += 1
                self._event("kept", version=w.version, **measured)

    def rollback(self, to: int, reason: str, bad_version: int | None = None) -> None:
        """The watch's rollback: the version manager runs ``to`` (or version 0) and blocks ``bad_version``."""
        with self._lock:
            self.counters["rolled_back"] += 1
            to = self.manager.roll_back(to, reason, bad_version)
            if bad_version is not None:
                self.daemon.problem("update_rolled_back", f"rolled back version {bad_version} to {to}: "
                                    f"{reason[:150]}")
            self._refused.clear()

    # -- told by the version manager about an operator's switch (under its lock) -------------------
    def before_manual_switch(self, reason: str) -> None:
        """End a watch in progress: the updater would otherwise answer "busy" for good, and decide about a version
        no longer in use."""
        w, self._watch = self._watch, None
        if w is not None:
            self._event("watch_ended", version=w.version, reason=reason)

    def after_manual_switch(self, result: dict) -> None:
        self._refused.clear()
        self.counters["manual_rollbacks"] += 1

    # -- heartbeat and thread ----------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Version, counters, a status word and the daemon's degraded reasons, to the cloud (``cloud devices``)."""
        counters = {k: float(v) for k, v in self.counters.items()}
        counters["samples"] = float(self.daemon.samples_seen)
        problems = {k: v["reason"] for k, v in self.daemon.degraded().items()}
        status = "watching" if self._watch else "degraded" if problems else "pinned" if self.manager.pin else \
            "ok" if self.updates else "ok (updates off)"
        hb = Heartbeat(model=self.model, param_version=self.engine.param_version, counters=counters,
                       status=status, problems=problems, signature=self._signature())
        # bounded like the download: a cloud that drips its answer must not hold the updater's loop
        t0, per_read = time.monotonic(), min(10.0, self.download_timeout_s)
        try:
            with self.client.stream("POST", f"{self.url}/v1/heartbeat", content=hb.model_dump_json(),
                                    headers={"content-type": "application/json"},
                                    timeout=httpx.Timeout(per_read)) as r:
                body = self._read(r, INFO_BYTES, t0, self.download_timeout_s)[0]
                code = r.status_code
        except httpx.HTTPError as exc:
            self._unreachable(exc)
            return
        self._reached()
        if 200 <= code < 300:
            self.last_heartbeat_at = time.time()
            self.daemon.resolved("heartbeat", "cloud_auth")
        elif code in (401, 403):
            self.daemon.problem("cloud_auth", f"the cloud refuses this device's token (heartbeat answered {code}): "
                                "revoked, expired or wrong")
        else:
            self.daemon.problem("heartbeat", f"heartbeat refused (HTTP {code}: "
                                f"{_detail(body.decode('utf-8', 'replace'))})")

    def _signature(self) -> DomainSignature | None:
        """The device's current domain for the cloud's grouping; None (and a problem shown) when it cannot be
        computed, so the heartbeat still goes."""
        try:
            values = self.engine.domain_signature()
        except (ValueError, KeyError) as exc:
            self.daemon.problem("signature", f"domain signature unavailable: {str(exc)[:200]}")
            return None
        self.daemon.resolved("signature")
        recent = list(self._recent)
        entropy = float(np.mean([e for e, _ in recent])) if recent else None
        return DomainSignature(scheme=SIGNATURE_SCHEME, values=[float(v) for v in values],
                               entropy=entropy if entropy is not None and math.isfinite(entropy) else None)

    def next_wait_s(self, outcome: str) -> float:
        """Seconds until the next poll: ``poll_s``, doubling after each hostile outcome in a row (a rejected,
        refused, blocked or pinned package, which would otherwise be downloaded again every poll) up to
        ``max_backoff_s``. An unreachable cloud is polled at the normal pace: it costs nothing and the device
        should notice the cloud's return."""
        self._failures = 0 if outcome in _HEALTHY else self._failures + 1
        return min(self.max_backoff_s, self.poll_s * 2 ** min(self._failures, 30))

    def _run(self) -> None:
        while not self._stop.is_set():
            outcome, t0 = "error", time.monotonic()
            try:
                outcome = self.check_once(wait=self.long_poll_s)
            except Exception as exc:  # never let the updater thread die
                log.exception("updater error: %s", exc)
            pause = self.next_wait_s(outcome)
            if self.long_poll_s > 0 and outcome in _HEALTHY and outcome != "error":
                # the held check is the wait: the next one goes out at once, but at most one a second starts (a
                # cloud that ignores `wait` and answers at once is not polled in a hot loop)
                pause = max(0.0, min(pause, LONG_POLL_MIN_GAP_S) - (time.monotonic() - t0))
            self._stop.wait(pause)

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.heartbeat()
            except Exception as exc:  # never let the heartbeat thread die
                log.exception("heartbeat error: %s", exc)
            self._stop.wait(self.poll_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self._thread.start()
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._hb_thread.start()

    def stop(self) -> None:
        """Stop both threads. A thread blocked in a held check is not waited for (a socket read cannot be
        interrupted from here): it is a daemon thread, and it takes nothing once it sees the stop."""
        self._stop.set()
        for t in (self._thread, self._hb_thread):
            if t is not None:
                t.join(0.5 if t is self._thread and self._long_polling else 10)
        self.client.close()

    def status(self) -> dict:
        w = self._watch
        watch = None if w is None else {"version": w.version, "age_s": round(time.monotonic() - w.started, 1),
                                        "batches": len(w.entropy), "of": self.watch_batches,
                                        "timeout_s": self.watch_timeout_s}
        return json_safe({"counters": dict(self.counters), "watching": w.version if w else None, "watch": watch,
                          "updates": "on" if self.updates else "off", "last_check_at": self.last_check_at,
                          "last_heartbeat_at": self.last_heartbeat_at,
                          "blocked_versions": sorted(self.manager.blocked), "pin": self.manager.pin,
                          "events": self.events[-10:],
                          "max_download_bytes": self.max_download_bytes,
                          "download_timeout_s": self.download_timeout_s})


