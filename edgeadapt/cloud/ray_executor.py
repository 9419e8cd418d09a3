"""Training rounds as Ray tasks (``trainer.executor = "ray"``, issue 18 item 4): one task per lineage round.

The serve process keeps only the scheduler (``RayRounds``): a thread that decides when rounds are due (the
in-process trainer's rule, ``trainer.rounds_due``), regroups a grouping cloud, and submits one task per lineage
with pending uploads that has none in flight. It never trains and never blocks a request. A task
(``run_round``) gets plain settings only, the cloud home and the validated config (the store's paths or URLs:
SQLite file + blob directory, or PostgreSQL DSN + S3 bucket/endpoint; credentials come from the worker's own
environment), opens the same store, builds the same ``Trainer`` (kept per worker process for later rounds), and
runs ``Trainer.train_lineage``: the round's DB lease, training, and the one ``finish_round(lease=...)`` that
publishes. So exactly one publish per round holds however many replicas and workers there are, as with
in-process replicas. No arrays travel: uploads and parameters stay in the store.

A worker that dies mid-round leaves its lease to expire and its uploads pending; the task fails (no Ray retry:
``max_retries=0``), the failure is counted and shown, and a later submission redoes the round once the lease is
free. A Ray that cannot start, a task that raises, a worker that died: ``last_error`` (health's "trainer"
reason), ``failures`` and ``edgeadapt_cloud_trainer_failures_total``, and the log.

Ray's cost: a local Ray (``ray_address`` unset) starts ~12 s of processes once (2 CPUs at most), and the first
task of a worker builds its trainer (teacher, student, replay index) like a serve process does; later rounds
reuse it. A worker's replay buffer is its own (as each in-process replica's is).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path

from edgeadapt.cloud.config import CloudConfig, ConfigError, TrainerConfig
from edgeadapt.cloud.store import Store

log = logging.getLogger(__name__)

LOCAL_MAX_CPUS = 2  # a local Ray (no ray_address): rounds of at most this many lineages at once
LEASED_HOLD_S = 2.0  # a lineage found leased by another worker is asked again after this (not every wake)
CONNECT_SLOW_S = 30.0  # a connection to Ray that takes longer is reported (health) while it goes on
FAILURE_HOLD_S = 5.0  # after a failed task or a Ray that would not start, as the in-process trainer waits


#: this process's use of Ray (every served model's scheduler shares one connection): the local Ray started here
#: is shut down when its last user stops
_ray_lock = threading.Lock()
_ray_users = 0
_ray_started_here = False


class RayUnavailable(ConfigError):
    pass


def require_ray() -> None:
    """The ``ray`` package must be importable for ``executor = "ray"`` (the ``[ray]`` extra)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise RayUnavailable("trainer.executor = \"ray\" needs the ray package: pip install 'edgeadapt[ray]'")


def round_spec(config: CloudConfig, home: str | Path, model: str | None = None, model_fields: dict | None = None
               ) -> dict:
    """What a round's task needs to reach the same store and build the same trainer: JSON-able settings only,
    with the local paths made absolute (a worker runs in a directory of Ray's; on a cluster the paths must be
    shared storage, or the store PostgreSQL + S3). ``model``: the store view's model (a registered model's
    ``model_fields``, its bundle and teacher, replace the configured ones)."""
    from edgeadapt.cloud.admin import store_dir

    def absolute(p: str | None) -> str | None:
        return str(Path(p).expanduser().resolve()) if p else p

    cfg = {**config.model_dump(mode="json"), **(model_fields or {})}
    cfg["store_dir"] = str(store_dir(home, config).resolve())
    for name in ("bundle", "teacher_weights"):
        cfg[name] = absolute(cfg[name])
    if cfg["blob_url"] and "://" not in cfg["blob_url"]:
        cfg["blob_url"] = absolute(cfg["blob_url"])
    return {"home": str(Path(home).expanduser().resolve()), "model": model, "config": cfg}


def lineage_key(group: int | None) -> str:
    return "global" if group is None else f"group:{group}"


# ------------------------------------------------------------------------------------------------ the worker side
_worker: tuple[str, object] | None = None  # (spec digest, Trainer) of this worker process


def _worker_trainer(spec: dict):
    """This worker's trainer for ``spec``: built on its first round, reused by later ones (a changed spec, e.g.
    another cloud on the same cluster, builds a new one)."""
    global _worker
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    if _worker is not None and _worker[0] == digest:
        return _worker[1]
    from edgeadapt.cloud.admin import open_store
    from edgeadapt.cloud.edge_model import load_teacher
    from edgeadapt.cloud.trainer import Trainer

    config = CloudConfig.model_validate(spec["config"])
    pkg = logging.getLogger("edgeadapt")
    pkg.setLevel(config.log_level.upper())
    if not pkg.handlers:  # a Ray worker's stderr goes to its log file and to the driver (cloud serve)
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        pkg.addHandler(h)
    if _worker is not None:
        _worker[1].store.close()
        _worker = None
    store = open_store(spec["home"], config)
    if spec["model"] is not None:  # the model's view, as the serve process's trainer has it
        store = store.scoped(spec["model"])
    grouper = None
    if config.groups.enabled:
        from edgeadapt.cloud.grouping import Grouper

        grouper = Grouper(store, config.groups)
    teacher = load_teacher(config.teacher, config.teacher_weights, **config.teacher_kwargs)
    trainer = Trainer(Path(config.bundle).expanduser(), store, teacher, config.trainer,
                      auto_rollout=config.auto_rollout, student_model=config.student_model, grouper=grouper,
                      device=_task_device())
    _worker = (digest, trainer)
    return trainer


def _task_device() -> str:
    """"cuda" when Ray gave this task a GPU (its ``CUDA_VISIBLE_DEVICES`` names it) and torch sees one, else "cpu"."""
    import ray
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def run_round(spec: dict, group: int | None, limit: int | None) -> dict:
    """A Ray task: one round of lineage ``group`` against the store ``spec`` names (``Trainer.train_lineage``:
    lease, train, gate, publish once). -> the round's ``TrainResult`` as a dict, plus who ran it."""
    import torch

    trainer = _worker_trainer(spec)
    out = trainer.train_lineage(group, limit).to_dict()
    out["worker"] = {"holder": trainer.holder, "pid": os.getpid(), "host": socket.gethostname(),
                     "torch_threads": torch.get_num_threads(), "device": str(trainer.device)}
    return out


# ------------------------------------------------------------------------------------------------ the scheduler
class RayRounds:
    """The serve process's side of ``executor = "ray"``: what ``CloudService.trainer`` is then (the in-process
    ``Trainer``'s interface: ``start``/``stop``/``notify``/``train_now``, ``running``, ``last_result``,
    ``last_error``, ``last_success_at``, ``failures``, ``version``)."""

    executor = "ray"

    def __init__(self, config: CloudConfig, home: str | Path, store: Store, *, grouper=None, metrics=None,
                 on_publish=None, model_fields: dict | None = None):
        require_ray()
        if not (model_fields or {}).get("teacher", config.teacher):
            raise ConfigError("trainer.executor = \"ray\": the teacher must be named (teacher, teacher_weights), "
                              "since each Ray worker builds it")
        self.cfg: TrainerConfig = config.trainer
        self.spec = round_spec(config, home, store.model, model_fields)
        self.store = store
        self.grouper = grouper
        self.metrics = metrics
        self.on_publish = on_publish
        self.last_result = None
        self.last_worker: dict = {}  # who ran the last completed round: holder, pid, host
        self._last_error: tuple[float, str] | None = None
        self._connecting_since: float | None = None
        self.last_success_at: float | None = None
        self.failures = 0
        self.ray_state = "not started"  # not started | connecting | connected (address, resources) | failed: why
        self._remote = None
        self._uses_ray = False
        self._lock = threading.RLock()
        self._inflight: dict[str, object] = {}  # lineage -> ObjectRef of its round's task
        self._settled: OrderedDict[str, object] = OrderedDict()  # task id -> TrainResult (train_now and the loop)
        self._hold: dict[str, float] = {}  # lineage -> not asked again before (monotonic)
        self._retry_at = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ Ray
    def connect(self) -> None:
        """Join (or start) Ray once; raises with the reason, also kept in ``ray_state`` / ``last_error``."""
        global _ray_users, _ray_started_here
        if self._remote is not None:
            return
        # Ray's crash handler in this process would catch the SIGTERM that stops `cloud serve`, print a stack and
        # re-raise it in the middle of the graceful shutdown (read when ray is first imported)
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        try:
            import ray

            from edgeadapt.cloud import ray_executor

            with _ray_lock:
                self.ray_state, self._connecting_since = "connecting", time.time()
                if not ray.is_initialized():
                    addr = self.cfg.ray_address
                    kw = {} if addr else {"num_cpus": max(1, min(LOCAL_MAX_CPUS, os.cpu_count() or 1))}
                    ray.init(address=addr, include_dashboard=False, logging_level=logging.WARNING,
                             namespace="edgeadapt", **kw)
                    _ray_started_here = True
                if not self._uses_ray:
                    _ray_users += 1
                    self._uses_ray = True
            gpus = float(ray.cluster_resources().get("GPU", 0.0))
            num_gpus = self.cfg.ray_num_gpus if gpus > 0 else 0.0
            # max_calls 0: a worker keeps its trainer for later rounds, GPU tasks too (Ray's default for them is
            # a fresh process per task); no retries: a dead worker's round is redone by the next submission
            self._remote = ray.remote(num_cpus=1, num_gpus=num_gpus, max_calls=0, max_retries=0,
                                      retry_exceptions=False)(ray_executor.run_round)
            where = self.cfg.ray_address or "local"
            self.ray_state = f"connected ({where}, {ray.cluster_resources().get('CPU', 0):g} CPUs, {gpus:g} GPUs" \
                             f"{f', {num_gpus:g} GPU per task' if num_gpus else ''})"
            log.info("training rounds run on Ray: %s", self.ray_state)
        except Exception as exc:
            why = f"cannot start Ray ({self.cfg.ray_address or 'local'}): {type(exc).__name__}: {str(exc)[:300]}"
            self.ray_state = f"failed: {why}"
            self._fail(why)
            raise RayUnavailable(why) from exc
        finally:
            self._connecting_since = None

    @property
    def last_error(self) -> tuple[float, str] | None:
        """The last failure until a round succeeds; also a connection to Ray that has hung for a while (ray.init
        retries an unreachable cluster address for minutes before it gives up)."""
        since = self._connecting_since
        if self._last_error is None and since is not None and time.time() - since > CONNECT_SLOW_S:
            return since, (f"cannot reach Ray at {self.cfg.ray_address or 'local'}: still connecting after "
                           f"{time.time() - since:.0f} s")
        return self._last_error

    def _fail(self, why: str) -> None:
        log.error("training on Ray: %s", why)
        self.failures += 1
        self._last_error = (time.time(), why)
        self._retry_at = time.monotonic() + FAILURE_HOLD_S
        if self.metrics is not None:
            self.metrics.trainer_failures.inc()

    # ------------------------------------------------------------------ rounds
    def _lineages(self) -> tuple[list[int | None], list[str]]:
        """The lineages with pending uploads. A grouping cloud regroups first, as the in-process trainer does
        before its rounds, but only while no round is in flight (groups do not change under a running round)."""
        if self.grouper is None:
            return ([None] if self.store.count_samples("train", consumed=False) else []), []
        from edgeadapt.cloud.trainer import lineage_pending

        with self._lock:
            idle = not self._inflight
        regrouped = self.grouper.regroup() if idle else []
        _, pending = lineage_pending(self.store, self.grouper)
        return list(pending), regrouped

    def _submit(self, groups: list[int | None], limit: int | None, force: bool = False) -> dict[str, object]:
        """A task per lineage that has none in flight (and is not held back, unless ``force``); -> lineage ->
        its task (new or already in flight)."""
        out = {}
        now = time.monotonic()
        with self._lock:
            for g in groups:
                key = lineage_key(g)
                ref = self._inflight.get(key)
                if ref is None:
                    if not force and self._hold.get(key, 0.0) > now:
                        continue
                    ref = self._inflight[key] = self._remote.remote(self.spec, g, limit)
                out[key] = ref
        return out

    def _settle(self, key: str, ref) -> object:
        """The finished task's result, recorded once (counted, published listeners woken) whoever asks first."""
        import ray
        from ray.exceptions import RayTaskError, WorkerCrashedError

        from edgeadapt.cloud.trainer import TrainResult

        tid = ref.hex()
        with self._lock:
            done = self._settled.get(tid)
            if done is not None:
                return done
            if self._inflight.get(key) is ref:
                del self._inflight[key]
            try:
                d = ray.get(ref, timeout=0)
                known = {f.name for f in fields(TrainResult)}
                res = TrainResult(**{k: v for k, v in d.items() if k in known})
                self._record(res, key, d.get("worker", {}))
            except WorkerCrashedError:
                why = (f"the Ray worker running the {key} round died; its lease expires and the round is redone "
                       "(published once)")
                self._fail(why)
                res = TrainResult("failed", 0, reason=why)
            except RayTaskError as exc:
                cause = exc.cause if exc.cause is not None else exc
                why = f"the Ray task for the {key} round raised {type(cause).__name__}: {str(cause)[:300]}"
                self._fail(why)
                res = TrainResult("failed", 0, reason=why)
            except Exception as exc:  # the task was lost some other way (node died, Ray went away, ...)
                why = f"the Ray task for the {key} round failed: {type(exc).__name__}: {str(exc)[:300]}"
                self._fail(why)
                res = TrainResult("failed", 0, reason=why)
            self._settled[tid] = res
            while len(self._settled) > 64:
                self._settled.popitem(last=False)
            return res

    def _record(self, res, key: str, worker: dict) -> None:
        if res.status == "idle" and "another worker" in res.reason:
            self._hold[key] = time.monotonic() + LEASED_HOLD_S
        if res.status not in ("published", "rejected"):
            return
        self.last_result, self.last_worker = res, worker
        self._last_error, self.last_success_at = None, time.time()
        log.info("training round on Ray (%s, worker pid %s on %s): %s%s", key, worker.get("pid"), worker.get("host"),
                 res.status, f" -> v{res.version}" if res.version is not None else f": {res.reason}")
        if self.metrics is not None:
            self.metrics.train_seconds.observe(res.seconds)
            self.metrics.train_samples.inc(res.samples)
            if res.status == "published":
                self.metrics.versions_published.inc()
            else:
                self.metrics.versions_rejected.inc()
        if res.status == "published" and self.on_publish is not None:
            try:
                self.on_publish(res.version)
            except Exception:  # a listener must not break training
                log.exception("on_publish callback failed")

    def _collect(self) -> None:
        import ray

        with self._lock:
            running = dict(self._inflight)
        if not running:
            return
        by_ref = {ref.hex(): key for key, ref in running.items()}
        ready, _ = ray.wait(list(running.values()), num_returns=len(running), timeout=0)
        for ref in ready:
            self._settle(by_ref[ref.hex()], ref)

    def train_now(self, limit: int | None = None, timeout: float | None = None):
        """A round for every lineage with pending uploads, on Ray, waited for (the admin API's ``train``); a
        lineage whose round is already running is waited for instead."""
        import ray

        from edgeadapt.cloud.trainer import Trainer, TrainResult

        self.connect()
        groups, regrouped = self._lineages()
        refs = self._submit(groups, limit, force=True)
        ready = set()
        if refs:
            done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
            ready = {ref.hex() for ref in done}
        late = [key for key, ref in refs.items() if ref.hex() not in ready]
        if late:  # still running: the scheduler records them when they end
            raise TimeoutError(f"rounds on Ray still running after {timeout} s: {', '.join(late)}")
        results = [self._settle(key, ref) for key, ref in refs.items()]
        failed = [r for r in results if r.status == "failed"]
        if failed:
            raise RuntimeError("; ".join(r.reason for r in failed))
        if self.grouper is None:
            return results[0] if results else TrainResult("idle", self.version, reason="no pending uploads")
        return Trainer._summary(results, regrouped)

    @property
    def version(self) -> int:
        return int(self.store.latest_version() or 0)

    @property
    def in_flight(self) -> list[str]:
        with self._lock:
            return sorted(self._inflight)

    def status(self) -> dict:
        """For the admin API's status: where rounds run and what is running now."""
        return {"executor": self.executor, "ray": self.ray_state, "in_flight": self.in_flight,
                "failures": self.failures}

    # ------------------------------------------------------------------ background scheduler
    def notify(self) -> None:
        self._wake.set()

    def _tick(self) -> None:
        from edgeadapt.cloud.trainer import rounds_due

        if time.monotonic() < self._retry_at:
            return
        if self._remote is None:
            try:
                self.connect()
            except RayUnavailable:
                return
        self._collect()
        if rounds_due(self.store, self.cfg):
            groups, _ = self._lineages()
            self._submit(groups, self.cfg.max_samples_per_round)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # the store, most likely: shown like a failed round, tried again later
                log.exception("scheduling a round on Ray failed; retrying later")
                self._fail(f"scheduling a round failed: {type(exc).__name__}: {str(exc)[:200]}")
            self._wake.wait(timeout=min(1.0, self.cfg.train_interval_s))
            self._wake.clear()

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="edgeadapt-ray-rounds", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop scheduling; a round in flight finishes on its worker (or, with the local Ray this process started
        and now shuts down, is cut off and redone after its lease expires)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        global _ray_users, _ray_started_here
        if self._uses_ray:
            import ray

            with _ray_lock:
                _ray_users -= 1
                if _ray_users == 0 and _ray_started_here:
                    ray.shutdown()
                    _ray_started_here = False
            self._uses_ray = False
            self._remote = None
            self.ray_state = "not started"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
