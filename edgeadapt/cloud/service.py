"""The cloud service's logic, independent of HTTP: ingest, update packages per device, heartbeats.

Which parameters a device holds: a device that got version V through a lossy package holds the reconstruction
the cloud computed when it built that package, not V's exact parameters. The device names what it holds by its
hash (``have_hash``); the cloud keeps every reconstruction it served (``param_sets``) and builds the next delta
against exactly that, so errors never accumulate and the base hash always verifies. Without ``have_hash`` the
base is version V's exact parameters. Answering an update check changes nothing in the store: heartbeats say
which version a device runs.

Several models (the registry, issue 18; cloud/registry.py): each registered model is served with its own store
view, input contract, trainer and grouper (``ServedModel``); a device is registered for one model, and its
uploads, heartbeats and update checks are judged by that model's contract and answered from that model's
versions. The configured ``bundle`` is registered at start and is the default model (``self.store``,
``self.trainer``, ... are its); the other registered models are loaded at start, or at the first request of one
of their devices when registered while the service runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeadapt.cloud.admin import open_store, read_admin_token
from edgeadapt.cloud.config import CloudConfig, ConfigError, resolve_home
from edgeadapt.cloud.metrics import CloudMetrics, ModelMetrics
from edgeadapt.cloud.store import (
    Device,
    ModelRecord,
    NewSample,
    NotFound,
    Store,
    StoreError,
    hash_token,
    register_bundle,
    token_matches,
)
from edgeadapt.core import signing
from edgeadapt.core.bundle import BundleError, BundleManifest
from edgeadapt.core.input_codec import InputCodec
from edgeadapt.core.safetext import clean_text
from edgeadapt.core.tensorfile import ParamSet
from edgeadapt.core.update_package import MODES, build_package_full
from edgeadapt.core.upload_encoding import decode_upload
from edgeadapt.core.wire import (
    MAX_SAMPLES_PER_BATCH,
    DomainSignature,
    SampleBatch,
    SampleBatchResult,
    UpdateInfo,
    upload_body_bytes,
)

log = logging.getLogger(__name__)

MODE_OPTS = {"ternary": ("density", "threshold", "zstd_level"), "bitmask_fp16": ("density", "threshold", "zstd_level"),
             "int4": ("clip", "zstd_level"), "ecq": ("vector_k", "matrix_k", "small_n", "zstd_level")}


MODEL_RETRY_S = 30.0  # a registered model that failed to load is tried again after this


class ServiceError(Exception):
    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class Invalid(ServiceError):
    status = 422


class Conflict(ServiceError):
    status = 409


class Missing(ServiceError):
    status = 404


@dataclass
class ServedModel:
    """One registered model as the service serves it."""

    name: str
    store: Store  # the store's view of this model (Store.scoped)
    bundle_dir: Path
    manifest: BundleManifest
    codec: InputCodec
    one_sample_body_bytes: int  # one upload of this model's input: a max_body_bytes below it refuses them all
    trainer: object | None = None  # Trainer (None: no teacher, uploads stored only)
    grouper: object | None = None  # Grouper, when groups are enabled
    build_lock: threading.Lock = field(default_factory=threading.Lock)
    metrics: ModelMetrics | None = None  # its series (label model=NAME) of the service's metrics


def one_upload_bytes(manifest: BundleManifest, codec: InputCodec) -> int:
    """Bytes of a one-sample upload of this bundle (``upload_body_bytes`` of its lowest input)."""
    lowest = np.full(codec.shape, codec.low, np.float32)
    return upload_body_bytes(manifest.model_name, codec.to_upload(lowest), manifest.num_classes)


@dataclass
class Package:
    data: bytes
    info: UpdateInfo
    target_hash: str
    base_hash: str


def refusal_kind(message: str) -> str:
    """A bounded label for a refused upload (the cloud's metric; the device classifies the same way)."""
    m = message.lower()
    if "exceeds" in m and "limit" in m:
        return "too_large"
    if "not served here" in m:
        return "wrong_model"
    if "undecodable" in m:  # an image-encoded upload that is corrupt, a bomb or not the declared sample
        return "undecodable"
    if "input" in m:
        return "invalid_input"
    return "invalid"


def sample_split(device_name: str, sample_id: str, novel: bool, holdout_fraction: float, seed: int = 0) -> str:
    """train | holdout | novel — deterministic per (device, sample id, seed)."""
    if novel:
        return "novel"
    h = int.from_bytes(hashlib.sha256(f"{seed}:{device_name}:{sample_id}".encode()).digest()[:8], "big")
    return "holdout" if h / 2**64 < holdout_fraction else "train"


class CloudService:
    """Everything the HTTP layer calls. ``teacher``: a torch module (or None: build from config; no teacher
    configured = no trainer, uploads are stored only)."""

    def __init__(self, config: CloudConfig, home: str | Path | None = None, *, store: Store | None = None,
                 teacher=None, private_key=None, admin_token: str | None = None):
        self.config = config
        self.home = resolve_home(home)
        if not config.bundle:
            raise ConfigError("no bundle configured (--bundle or `bundle` in config.toml)")
        self.bundle_dir = Path(config.bundle).expanduser()
        #: the whole store (every model's devices, versions, rollouts); ``self.store`` is the default model's view
        self.root_store = store or open_store(self.home, config)
        self.manifest = register_bundle(self.root_store, self.bundle_dir, config.teacher, config.teacher_weights,
                                        config.teacher_kwargs or None, config.student_model)
        self.model_name = self.manifest.model_name
        self.store = self.root_store.scoped(self.model_name)
        self.codec = InputCodec(self.manifest.input)
        self.key_from_home = private_key is None  # health checks the key file only when it came from there
        self.private_key = private_key or signing.load_private_key(self.home)
        self.public_key_b64 = signing.public_key_b64(self.private_key)
        if self.manifest.cloud_public_key is None:
            log.warning("bundle %s carries no cloud public key: devices cannot verify updates from this cloud",
                        self.bundle_dir)
        elif self.manifest.cloud_public_key != self.public_key_b64:
            raise ConfigError(f"bundle {self.bundle_dir} was exported for another cloud key "
                              f"({self.manifest.cloud_public_key[:12]}…, this cloud signs with "
                              f"{self.public_key_b64[:12]}…): devices would reject every update")
        token = admin_token if admin_token is not None else read_admin_token(self.home)
        self._admin_hash = hash_token(token)
        self.metrics = CloudMetrics()
        # one sample of this bundle as a device uploads it: a max_body_bytes below this refuses every upload
        self.one_sample_body_bytes = one_upload_bytes(self.manifest, self.codec)
        if self.one_sample_body_bytes > config.max_body_bytes:
            log.warning("max_body_bytes %d is smaller than one upload of this bundle (%d bytes): every upload will "
                        "be refused", config.max_body_bytes, self.one_sample_body_bytes)
        from edgeadapt.cloud.health import CloudHealth, FleetCollector

        self.health = CloudHealth(self)
        self.metrics.register(FleetCollector(self))
        self.started = False
        self.generation = 0
        self._gen_lock = threading.Lock()
        #: called (from whichever thread) after every publish or rollout: wakes the HTTP layer's long-polls
        self.publish_listeners: list[Callable[[], None]] = []
        self._build_lock = threading.Lock()
        self.trainer = None
        model_metrics = self._watched_metrics(self.model_name, self.store)
        #: groups of similar devices with a lineage each (issue 18); None: one global lineage, as before
        self.grouper = None
        if config.groups.enabled:
            from edgeadapt.cloud.grouping import Grouper

            self.grouper = Grouper(self.store, config.groups)
        if config.trainer.executor == "ray":  # rounds run as Ray tasks, each building its own trainer
            if teacher is not None:
                raise ConfigError("trainer.executor = \"ray\" builds the teacher in each Ray worker from the config "
                                  "(teacher, teacher_weights); a teacher object cannot be passed")
            if config.teacher:
                from edgeadapt.cloud.ray_executor import RayRounds

                self.trainer = RayRounds(config, self.home, self.store, grouper=self.grouper, metrics=model_metrics,
                                         on_publish=self._bump)
        elif teacher is None and config.teacher:
            from edgeadapt.cloud.edge_model import load_teacher

            teacher = load_teacher(config.teacher, config.teacher_weights, **config.teacher_kwargs)
        if teacher is not None:
            from edgeadapt.cloud.trainer import Trainer

            self.trainer = Trainer(self.bundle_dir, self.store, teacher, config.trainer,
                                   auto_rollout=config.auto_rollout, metrics=model_metrics, on_publish=self._bump,
                                   student_model=config.student_model, grouper=self.grouper)
        #: every model served, by name (the default one first); why a registered model could not be loaded
        self.models: dict[str, ServedModel] = {self.model_name: ServedModel(
            self.model_name, self.store, self.bundle_dir, self.manifest, self.codec, self.one_sample_body_bytes,
            self.trainer, self.grouper, self._build_lock, model_metrics)}
        self.model_errors: dict[str, tuple[float, str]] = {}
        self._models_lock = threading.RLock()
        for rec in self.root_store.models.list():
            if rec.model not in self.models:
                self._load_model(rec)

    # ------------------------------------------------------------------ models
    def _load_model(self, rec: ModelRecord) -> ServedModel | None:
        """Serve a registered model (not the configured one): its bundle, contract, grouper and, with a teacher,
        its trainer. A model that cannot be loaded (its bundle gone, another key) is left out with the reason
        (health shows it; its devices get 503 and keep their uploads) and retried after a while."""
        cfg = self.config
        try:
            bundle = Path(rec.bundle)
            view = self.root_store.scoped(rec.model)
            manifest = register_bundle(view, bundle)  # its parameters still those of its version 0
            if manifest.cloud_public_key not in (None, self.public_key_b64):
                raise ConfigError(f"bundle {bundle} was exported for another cloud key: its devices would reject "
                                  "every update")
            codec = InputCodec(manifest.input)
            model_metrics = self._watched_metrics(rec.model, view)
            grouper = trainer = None
            if cfg.groups.enabled:
                from edgeadapt.cloud.grouping import Grouper

                grouper = Grouper(view, cfg.groups)
            if rec.teacher and cfg.trainer.executor == "ray":  # its rounds as Ray tasks on its store view
                from edgeadapt.cloud.ray_executor import RayRounds

                trainer = RayRounds(cfg, self.home, view, grouper=grouper, metrics=model_metrics,
                                    on_publish=self._bump, model_fields={
                                        "bundle": rec.bundle, "teacher": rec.teacher,
                                        "teacher_weights": rec.teacher_weights, "teacher_kwargs": rec.teacher_kwargs,
                                        "student_model": rec.student_model})
            elif rec.teacher:
                from edgeadapt.cloud.edge_model import load_teacher
                from edgeadapt.cloud.trainer import Trainer

                teacher = load_teacher(rec.teacher, rec.teacher_weights, **rec.teacher_kwargs)
                trainer = Trainer(bundle, view, teacher, cfg.trainer, auto_rollout=cfg.auto_rollout,
                                  metrics=model_metrics, on_publish=self._bump, student_model=rec.student_model,
                                  grouper=grouper)
            served = ServedModel(rec.model, view, bundle, manifest, codec, one_upload_bytes(manifest, codec),
                                 trainer, grouper, metrics=model_metrics)
        except (ConfigError, BundleError, StoreError, ValueError, OSError) as exc:
            why = f"{type(exc).__name__}: {str(exc)[:300]}"
            self.model_errors[rec.model] = (time.time(), why)
            log.error("model %s (bundle %s) cannot be served: %s", rec.model, rec.bundle, why)
            return None
        self.model_errors.pop(rec.model, None)
        self.models[rec.model] = served
        if served.trainer is not None and self.started and cfg.trainer.enabled:
            served.trainer.start()
        log.info("serving model %s too (bundle %s, %s)", rec.model, rec.bundle,
                 f"teacher {rec.teacher}" if rec.teacher else "no teacher: uploads stored only")
        return served

    def _watched_metrics(self, model: str, store: Store) -> ModelMetrics:
        """The model's metric series, its latest version and pending uploads read from ``store`` at each scrape."""
        found = self.metrics.model(model)
        found.watch(store)
        return found

    def model_of(self, device: Device) -> str:
        """The registered model a device runs (one added before any model was registered: the default)."""
        return device.model or self.model_name

    def metrics_for(self, device: Device) -> ModelMetrics:
        """The metric series of the device's model (a registered name: the label stays bounded)."""
        return self.metrics.model(self.model_of(device))

    def served(self, model: str) -> ServedModel | None:
        """The served model of this name; one registered since the start is loaded now (None: not registered, or
        it cannot be loaded: ``model_errors`` says why)."""
        found = self.models.get(model)
        if found is not None:
            return found
        with self._models_lock:
            if model in self.models:
                return self.models[model]
            failed = self.model_errors.get(model)
            if failed is not None and time.time() - failed[0] < MODEL_RETRY_S:
                return None
            try:
                rec = self.root_store.models.get(model)
            except NotFound:
                return None
            return self._load_model(rec)

    def served_for(self, device: Device) -> ServedModel:
        """The model a device is registered for (one added before any model was registered: the default)."""
        name = self.model_of(device)
        served = self.served(name)
        if served is None:
            failed = self.model_errors.get(name)
            if failed is not None:
                raise ServiceError(f"model {name!r} of device {device.name!r} cannot be served now: {failed[1]}", 503)
            raise Missing(f"device {device.name!r} is registered for model {name!r}, which this cloud does not "
                          "serve")
        return served

    def trainers(self) -> list:
        return [m.trainer for m in self.models.values() if m.trainer is not None]

    @staticmethod
    def _not_served(model: str, device: Device, served: ServedModel) -> str:
        return (f"model {model!r} is not served here to device {device.name!r} (this cloud serves "
                f"{served.name!r} to it)")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.config.trainer.enabled:
            for trainer in self.trainers():
                trainer.start()
        self.started = True

    def limits(self, device: Device | None = None) -> dict:
        """What a device needs to know to upload here (``/healthz``: the default model's at the top, each model's
        under ``models``; ``/v1/whoami``: its own model's; ``edgeadapt doctor``)."""
        return self.model_limits(self.models[self.model_name] if device is None else self.served_for(device))

    def model_limits(self, m: ServedModel) -> dict:
        """What a device of this model needs to know to upload here."""
        return {"model": m.name, "input_shape": list(m.codec.shape),
                "max_body_bytes": self.config.max_body_bytes, "one_sample_body_bytes": m.one_sample_body_bytes,
                "max_upload_sample_bytes": m.codec.max_upload_sample_bytes,
                "max_samples_per_batch": MAX_SAMPLES_PER_BATCH, "public_key": self.public_key_b64}

    def stop(self) -> None:
        for trainer in self.trainers():
            trainer.stop()

    def _bump(self, *_: object) -> None:
        """Something a device may be waiting for changed (a version published, a rollout or handoff made)."""
        with self._gen_lock:
            self.generation += 1
        for listener in list(self.publish_listeners):
            try:
                listener()
            except Exception:  # a closed event loop must not fail a publish
                log.exception("publish listener failed")

    # ------------------------------------------------------------------ auth
    def is_admin(self, token: str) -> bool:
        return bool(token) and token_matches(token, self._admin_hash)

    def device_for(self, token: str) -> Device | None:
        return self.store.authenticate(token)

    # ------------------------------------------------------------------ ingest
    def ingest(self, device: Device, batch: SampleBatch) -> SampleBatchResult:
        try:
            return self._ingest(device, batch)
        except Invalid as exc:
            self.metrics_for(device).upload_refusals.labels(reason=refusal_kind(exc.message)).inc()
            raise

    def _ingest(self, device: Device, batch: SampleBatch) -> SampleBatchResult:
        served = self.served_for(device)
        if batch.model != served.name:
            raise Invalid(self._not_served(batch.model, device, served))
        codec = served.codec
        c = served.manifest.num_classes
        tcfg = self.config.trainer
        new: list[NewSample] = []
        for i, s in enumerate(batch.samples):
            where = f"samples[{i}] (id {s.id})"
            try:  # the bundle's input contract: size from its shape, decoded by its encoding, then shape, dtype,
                arr = decode_upload(codec, s.input)  # finiteness and range
            except ValueError as exc:  # InputError is a ValueError
                raise Invalid(f"{where}: input: {exc}") from None
            if len(s.logits) != c:
                raise Invalid(f"{where}: {len(s.logits)} logits, the model has {c} classes")
            values = [*s.logits, s.entropy, s.ood_score]
            if not all(math.isfinite(v) for v in values):
                raise Invalid(f"{where}: logits/entropy/ood_score must be finite")
            new.append(NewSample(sample_id=s.id, input=arr, logits=np.asarray(s.logits, np.float32),
                                 entropy=s.entropy, ood_score=s.ood_score, novel=s.novel,
                                 param_version=s.param_version,
                                 split=sample_split(device.name, s.id, s.novel, tcfg.holdout_fraction, tcfg.seed)))
        new_ids, dups = served.store.add_samples(device.id, new)
        self.health.resolved("store")  # a write went through
        served.metrics.samples_received.inc(len(new_ids))
        served.metrics.samples_duplicate.inc(len(dups))
        served.store.touch_device(device.id)
        if new_ids and served.trainer is not None:
            served.trainer.notify()
        seen, ids = set(), []
        for s in batch.samples:
            if s.id not in seen:
                seen.add(s.id)
                ids.append(s.id)
        return SampleBatchResult(accepted=len(new_ids), duplicates=len(dups), ids=ids)

    # ------------------------------------------------------------------ heartbeat
    def heartbeat(self, device: Device, model: str, version: int, counters: dict, status: str,
                  problems: dict | None = None, signature: DomainSignature | None = None) -> dict:
        """Record what the device reports (its degraded reasons too: ``cloud devices`` lists them; its domain
        signature, by which a grouping cloud assigns it a group). A device of another model is recorded with that
        as its problem, then refused."""
        problems = dict(problems or {})
        served = self.served_for(device)
        if model != served.name:
            problems["model"] = (f"runs model {clean_text(model, 64)!r}; this cloud serves "
                                 f"{clean_text(served.name, 64)!r} to it")
            served.store.touch_device(device.id, status="wrong model", problems=problems, heartbeat=True)
            raise Invalid(self._not_served(model, device, served))
        clean = {str(k)[:64]: float(v) for k, v in list(counters.items())[:256] if math.isfinite(float(v))}
        served.store.touch_device(device.id, version=version, status=status, counters=clean, problems=problems,
                                  heartbeat=True)
        served.metrics.heartbeats.inc()
        group = None
        if signature is not None:
            if served.grouper is not None:
                device.version = version
                group = device.group_id = served.grouper.observe(device, signature.values, signature.entropy)
            else:  # kept for `cloud devices` (and a later switch to grouping) even when not grouping
                served.store.fleet.set_signature(device.id, signature.values, signature.entropy)
        return {"ok": True, "target_version": self.target_for(device),
                "latest_version": served.store.latest_version(), **({"group": group} if group is not None else {})}

    # ------------------------------------------------------------------ updates
    def _mode_opts(self, mode: str) -> dict:
        allowed = MODE_OPTS.get(mode, ("zstd_level",))
        return {k: v for k, v in self.config.update_opts.items() if k in allowed}

    def _device_base(self, store: Store, have: int, have_hash: str | None) -> tuple[ParamSet, str]:
        if have_hash:
            found = store.get_param_set(have_hash)
            if found is None:
                raise Conflict(f"unknown parameters {have_hash[:16]}… for version {have}: this cloud never served "
                               "them")
            return found[1], have_hash
        try:
            rec = store.get_version(have)
        except NotFound:
            raise Conflict(f"version {have} is unknown to this cloud (latest is {store.latest_version()})") \
                from None
        return store.get_params(have), rec.params_hash

    def count_served(self, pkg: Package) -> None:
        """A package went out (``/v1/updates``; ``/v1/updates/info`` only describes one)."""
        m = self.metrics.model(pkg.info.model)  # the served model's name, never the one the device asked for
        m.updates_served.labels(mode=pkg.info.mode).inc()
        m.update_bytes_out.inc(len(pkg.data))

    def target_for(self, device: Device) -> int | None:
        """The version of its model the newest rollout covering this device assigns (group rollouts cover its
        group's members)."""
        served = self.served_for(device)
        return served.store.target_version(device.name, device.group_id if served.grouper is not None else None)

    def _handoff(self, device: Device, have: int, target: int) -> int | None:
        """A device whose group is at an older version number than the one it runs (it moved group, or its group
        was rolled back) is served that group's parameters under a new number, since devices refuse downgrades:
        a new version in the group's lineage with the target's parameters, rolled out to the group. None when the
        device already holds exactly those parameters."""
        gid = device.group_id
        if gid is None:
            return None
        store = self.served_for(device).store
        try:
            have_hash = store.get_version(have).params_hash
        except NotFound:
            have_hash = None
        rec = store.get_version(target)
        if have_hash == rec.params_hash:
            return None
        version = store.add_version(store.get_params(target), parent=target,
                                    note=f"v{target} for group {gid} (handoff from v{have})",
                                    metrics={"handoff_of": target}, group_id=gid)
        store.add_rollout(version, note="handoff", group_id=gid)
        self._bump()
        log.info("device %s (v%d) moved to group %d at v%d: served as v%d", device.name, have, gid, target, version)
        return version

    def update_for(self, device: Device, model: str, have: int, have_hash: str | None = None,
                   mode: str | None = None) -> Package | None:
        """The package that takes this device from ``have`` (holding ``have_hash``) to its assigned version, or
        None (up to date, or no newer version assigned: devices never downgrade through a delta)."""
        served = self.served_for(device)
        if model != served.name:
            raise Missing(self._not_served(model, device, served))
        store = served.store
        mode = mode or self.config.update_mode
        if mode not in MODES:
            raise Invalid(f"unknown update mode {mode!r}; use one of {MODES}")
        target = self.target_for(device)
        if target is not None and target < have and served.grouper is not None:
            with served.build_lock:  # one handoff version however many requests ask at once
                target = self.target_for(device)
                if target is not None and target < have:
                    target = self._handoff(device, have, target)
        if target is None or target <= have:
            return None
        base_params, base_hash = self._device_base(store, have, have_hash)
        opts = self._mode_opts(mode)
        # the default model's keys as before (packages built by an older release stay found); the others' prefixed
        key = ("" if served.name == self.model_name else f"{served.name}:") + \
            f"{base_hash}:{have}:{target}:{mode}:{json.dumps(opts, sort_keys=True)}"
        with served.build_lock:
            cached = store.get_package(key)
            if cached is None:
                built = build_package_full(served.name, have, base_params, target, store.get_params(target),
                                           mode, self.private_key, **opts)
                target_hash = built.header["target"]["params_hash"]
                if target_hash != built.header["target"]["exact_hash"]:
                    store.put_param_set(target, built.params)
                info = {"target_hash": target_hash, "base_hash": base_hash}
                store.put_package(key, built.data, info)
                data = built.data
            else:
                data, info = cached
                target_hash = info["target_hash"]
        upd = UpdateInfo(model=served.name, version=target, base_version=have, mode=mode, size=len(data))
        return Package(data, upd, target_hash, info["base_hash"])
