"""The cloud HTTP API (FastAPI + uvicorn). OpenAPI at ``/openapi.json``, docs at ``/docs``.

Device endpoints (``Authorization: Bearer <device token>``; a missing, unknown, revoked or expired token gets
401, the same answer for each so that it tells an attacker nothing; tokens are stored as SHA-256 hashes, looked
up by hash and compared with ``hmac.compare_digest``):

- ``POST /v1/samples`` — a ``SampleBatch``; answers ``SampleBatchResult``. Bodies over ``max_body_bytes`` get
  413 (from Content-Length before anything is read, or while the body streams in). Invalid batches get 422
  with a message. Idempotent: a sample id is stored once per device, and a byte-identical retried batch gets
  the byte-identical answer.
- ``GET /v1/updates?model=M&have=V[&wait=S][&mode=MODE][&have_hash=H]`` — 204 when the device is at (or past)
  its assigned version; else 200 with the update package (``application/octet-stream``; headers
  ``X-Edgeadapt-Version``, ``X-Edgeadapt-Base-Version``, ``X-Edgeadapt-Mode``, ``X-Edgeadapt-Target-Hash``).
  ``wait`` long-polls up to ``long_poll_max_s``. ``GET /v1/updates/info`` answers ``UpdateInfo`` JSON instead.
  409 when the cloud does not know the device's base version.
- ``POST /v1/heartbeat`` — a ``Heartbeat``; answers ``{"target_version", "latest_version"}``.
- ``GET /v1/devices/{name}`` — the device's own record (another device's: 403).

Admin endpoints (``Authorization: Bearer <admin token>``; a device token gets 403): ``GET/POST
/v1/admin/devices``, ``POST /v1/admin/devices/{name}/revoke``, ``GET /v1/admin/versions``, ``GET/POST
/v1/admin/rollouts``, ``POST /v1/admin/train`` (train on everything pending now; returns the result),
``GET /v1/admin/status``, ``GET /v1/admin/models`` (the registry: several models per cloud, each device
registered for one; device, version, rollout and group endpoints take ``model`` where it matters, default the
only model). Unauthenticated: ``GET /healthz`` (live, ready, degraded with reasons, and what a device
needs to upload: model, key, size limits), ``GET /livez``, ``GET /readyz`` (503 when the store does not answer),
``GET /metrics`` (unless ``metrics_public`` is off). ``GET /v1/whoami`` (device token): the device's name and the
same limits, for ``edgeadapt doctor``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import sqlite3
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import ClientDisconnect

from edgeadapt.cloud import admin as A
from edgeadapt.cloud.config import ConfigError
from edgeadapt.cloud.service import CloudService, ServiceError
from edgeadapt.cloud.store import Device, StoreError
from edgeadapt.core.wire import MAX_VERSION, Heartbeat, SampleBatch, SampleBatchResult, UpdateInfo

log = logging.getLogger(__name__)

SMALL_BODY_BYTES = 64 * 1024
class PublishSignal:
    """Wakes every waiting long-poll of this process at once when the service publishes (or rolls out) a version:
    an ``asyncio.Event`` replaced on each firing, so a waiter that captured it before its query never misses a
    publish that lands between the query and the wait."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.closing = False  # the server is shutting down: held checks answer 204 now instead of at their wait

    def fire(self) -> None:
        old, self.event = self.event, asyncio.Event()
        old.set()

    def release(self) -> None:
        self.closing = True
        self.fire()


def _cloud_server(config):
    """A uvicorn server that, when it starts shutting down, first answers every held update check (204: the
    device asks again, e.g. at another replica); uvicorn would otherwise wait for them up to its graceful
    timeout and then cancel them."""
    import uvicorn

    class CloudServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            signal = getattr(getattr(self.config.app, "state", None), "publish_signal", None)
            if signal is not None:
                signal.release()
            await super().shutdown(sockets)

    return CloudServer(config)


class TooLarge(Exception):
    model = ""  # the registered model of the device whose upload it is ("": refused before the device was known)


def _problem(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - 10
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


class BodyLimitMiddleware:
    """Refuse a request whose declared Content-Length exceeds the limit before any of it is read. ``per_path``:
    other limits for some paths (a heartbeat gets its own 64 KiB whatever ``max_body_bytes`` says, so a cloud
    configured too small for uploads still hears what its devices report)."""

    def __init__(self, app, limit: int, per_path: dict[str, int] | None = None, on_refused=None):
        self.app = app
        self.limit = limit
        self.per_path = per_path or {}
        self.on_refused = on_refused  # called with the path of a body refused as too large (metrics)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            limit = self.per_path.get(scope.get("path", ""), self.limit)
            for name, value in scope.get("headers", []):
                if name == b"content-length":
                    try:
                        n = int(value)
                    except ValueError:
                        n = -1
                    if n < 0 or n > limit:
                        msg = "invalid Content-Length" if n < 0 else \
                            f"request body of {n} bytes exceeds the {limit}-byte limit"
                        if n >= 0 and self.on_refused is not None:
                            self.on_refused(scope.get("path", ""))
                        resp = _problem(400 if n < 0 else 413, msg, {"Connection": "close"})
                        await resp(scope, receive, send)
                        return
        await self.app(scope, receive, send)


async def read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body of {declared} bytes exceeds the {limit}-byte limit")
    buf = bytearray()
    try:
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise TooLarge(f"request body exceeds the {limit}-byte limit")
    except ClientDisconnect:  # gone, or cut off at the body deadline (core/netguard.py): nobody to answer
        raise HTTPException(400, "client disconnected before the body was complete") from None
    return bytes(buf)


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class NewDevice(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    model: str | None = Field(None, max_length=256, description="the registered model it runs (default: the only "
                              "one; required when several are registered)")
    expires_days: float | None = Field(None, gt=0, le=36500, description="token lifetime (default: until revoked)")


class PushRequest(BaseModel):
    version: int | None = Field(None, ge=0, le=MAX_VERSION)
    devices: list[str] | None = None
    fraction: float | None = Field(None, gt=0, le=1)
    revert: bool = False
    group: int | None = Field(None, ge=1, le=MAX_VERSION, description="roll out to this group's members")
    model: str | None = Field(None, max_length=256, description="the model whose version this is (default: the "
                              "only one; required when several are registered)")


def create_app(service: CloudService) -> FastAPI:
    """The FastAPI app for a service. Starting it (lifespan) starts the trainer thread; stopping stops it."""

    cfg = service.config

    signal = PublishSignal()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def wake() -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(signal.fire)

        service.publish_listeners.append(wake)
        service.start()
        try:
            yield
        finally:
            service.publish_listeners.remove(wake)
            await run_in_threadpool(service.stop)

    app = FastAPI(title="edgeadapt cloud", version="1", lifespan=lifespan,
                  description="Ingest uploads from edge devices, distill a teacher into the devices' adaptable "
                              "tensors, serve signed, compressed update packages.")
    metrics = service.metrics

    def _body_refused(path: str, model: str = "") -> None:
        metrics.requests_rejected.labels(reason="413").inc()
        if path == "/v1/samples":
            metrics.upload_refusals.labels(model=model, reason="too_large").inc()

    app.add_middleware(BodyLimitMiddleware, limit=cfg.max_body_bytes, per_path={"/v1/heartbeat": SMALL_BODY_BYTES},
                       on_refused=_body_refused)
    app.state.service = service
    app.state.publish_signal = signal

    unauthorized = HTTPException(401, "missing or invalid token", headers={"WWW-Authenticate": "Bearer"})

    async def device_auth(request: Request) -> Device:
        token = _bearer(request)
        device = await run_in_threadpool(service.device_for, token) if token else None
        if device is None:
            if token and service.is_admin(token):
                raise HTTPException(403, "this endpoint is for devices; the admin token is not a device token")
            metrics.requests_rejected.labels(reason="auth").inc()
            raise unauthorized
        return device

    async def admin_auth(request: Request) -> None:
        token = _bearer(request)
        if token and service.is_admin(token):
            return
        if token and await run_in_threadpool(service.device_for, token) is not None:
            raise HTTPException(403, "admin token required")
        metrics.requests_rejected.labels(reason="auth").inc()
        raise unauthorized

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        metrics.requests_rejected.labels(reason=str(exc.status)).inc()
        return _problem(exc.status, exc.message)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError):
        return _problem(404 if exc.__class__.__name__ == "NotFound" else 409, str(exc))

    @app.exception_handler(TooLarge)
    async def _too_large(request: Request, exc: TooLarge):
        _body_refused(request.url.path, exc.model)
        return _problem(413, str(exc), {"Connection": "close"})

    @app.exception_handler(sqlite3.Error)
    @app.exception_handler(OSError)
    async def _store_failed(request: Request, exc: Exception):
        # a full disk, an I/O error, a locked database: the device retries a 503 (its samples are kept), and the
        # cloud's health says why until a write goes through again
        metrics.store_errors.inc()
        name = getattr(exc, "sqlite_errorname", None)
        why = f"{type(exc).__name__}: {str(exc)[:200]}" + (f" [{name}]" if name else "")
        service.health.problem("store", f"store error on {request.url.path}: {why}")
        log.error("store error on %s: %s", request.url.path, why)
        return _problem(503, f"the cloud's store failed ({why}); retry later", {"Retry-After": "5"})

    # ------------------------------------------------------------------ unauthenticated
    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict:
        """Live (it answers), ready (the store answers), degraded with reasons (each with since and count), and
        what a device needs to upload here (``limits``: the default model's). ``models``: each registered model's
        input shape, classes, limits, latest version, pending uploads, trainer state and own reasons (the fields
        at the top are the default model's, as before several models)."""
        from edgeadapt.cloud.health import models_health

        problems = service.health.check()
        not_ready = service.health.not_ready()
        latest = None if not_ready else service.store.latest_version()
        return {"ok": True, "status": "not ready" if not_ready else "degraded" if problems else "ok",
                "ready": not_ready is None, "model": service.model_name,
                "models": models_health(service, problems, not_ready is None),
                "latest_version": latest,
                "trainer": None if service.trainer is None else service.trainer.running,
                "executor": None if service.trainer is None else service.trainer.executor,
                "reasons": {k: v["reason"] for k, v in problems.items()}, "degraded": problems,
                "limits": service.limits()}

    @app.get("/livez", tags=["ops"])
    def livez() -> dict:
        """Liveness: the process answers."""
        return {"ok": True}

    @app.get("/readyz", tags=["ops"])
    def readyz():
        """Readiness: 200 when the store answers, else 503 with why."""
        why = service.health.not_ready()
        if why is not None:
            return JSONResponse({"ready": False, "reason": why}, status_code=503)
        return {"ready": True}

    @app.get("/metrics", tags=["ops"])
    async def metrics_endpoint(request: Request):
        if not cfg.metrics_public:
            await admin_auth(request)
        return Response(metrics.render(), media_type=metrics.content_type)

    # ------------------------------------------------------------------ devices
    @app.post("/v1/samples", response_model=SampleBatchResult, tags=["device"],
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/SampleBatch"}}}}})
    async def post_samples(request: Request, device: Device = Depends(device_auth)):
        own = service.metrics_for(device)  # its model's series: the registered model, not the batch's name
        try:
            body = await read_limited(request, cfg.max_body_bytes)
        except TooLarge as exc:
            exc.model = own.name
            raise
        own.bytes_in.inc(len(body))
        sha = hashlib.sha256(body).hexdigest()
        cached = await run_in_threadpool(service.store.get_batch_response, device.id, sha)
        if cached is not None:  # a byte-identical retry: every sample in it is a duplicate by now
            own.samples_duplicate.inc(len(json.loads(cached).get("ids", [])))
            return Response(cached, media_type="application/json")
        try:
            batch = SampleBatch.model_validate_json(body)
        except ValidationError as exc:
            metrics.requests_rejected.labels(reason="422").inc()
            own.upload_refusals.labels(reason="schema").inc()
            return _problem(422, _validation_message(exc))
        result = await run_in_threadpool(service.ingest, device, batch)
        text = result.model_dump_json()
        await run_in_threadpool(service.store.put_batch_response, device.id, sha, text)
        return Response(text, media_type="application/json")

    @app.post("/v1/heartbeat", tags=["device"])
    async def post_heartbeat(request: Request, device: Device = Depends(device_auth)) -> dict:
        body = await read_limited(request, SMALL_BODY_BYTES)
        try:
            hb = Heartbeat.model_validate_json(body)
        except ValidationError as exc:
            return _problem(422, _validation_message(exc))
        return await run_in_threadpool(service.heartbeat, device, hb.model, hb.param_version, hb.counters, hb.status,
                                       hb.problems, hb.signature)

    async def _find_update(device: Device, model: str, have: int, wait: float, mode: str | None,
                           have_hash: str | None):
        """The device's package, waiting up to ``wait`` s for one: woken at once by a publish in this process,
        and re-checked every ``long_poll_recheck_s`` for what other replicas (or `cloud push` on the store)
        publish."""
        deadline = time.monotonic() + min(max(wait, 0.0), cfg.long_poll_max_s)
        while True:
            published = signal.event  # before the query: a publish during it still wakes the wait below
            pkg = await run_in_threadpool(service.update_for, device, model, have, have_hash, mode)
            remaining = deadline - time.monotonic()
            if pkg is not None or remaining <= 0 or signal.closing:
                return pkg
            try:
                await asyncio.wait_for(published.wait(), min(cfg.long_poll_recheck_s, remaining))
            except asyncio.TimeoutError:
                pass

    @app.get("/v1/updates", tags=["device"], responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the update package"},
        204: {"description": "up to date"}})
    async def get_updates(model: str = Query(...), have: int = Query(..., ge=0, le=MAX_VERSION),
                          wait: float = Query(0.0, ge=0, description="long-poll seconds"),
                          mode: str | None = Query(None), have_hash: str | None = Query(None, max_length=64),
                          device: Device = Depends(device_auth)):
        pkg = await _find_update(device, model, have, wait, mode, have_hash)
        if pkg is None:
            return Response(status_code=204)
        service.count_served(pkg)
        return Response(pkg.data, media_type="application/octet-stream", headers={
            "X-Edgeadapt-Version": str(pkg.info.version), "X-Edgeadapt-Base-Version": str(pkg.info.base_version),
            "X-Edgeadapt-Mode": pkg.info.mode, "X-Edgeadapt-Target-Hash": pkg.target_hash,
            "Content-Disposition": f'attachment; filename="{model}-v{pkg.info.base_version}-v{pkg.info.version}.eaup"'})

    @app.get("/v1/updates/info", tags=["device"], response_model=UpdateInfo, responses={204: {}})
    async def get_update_info(model: str = Query(...), have: int = Query(..., ge=0, le=MAX_VERSION),
                              mode: str | None = Query(None),
                              have_hash: str | None = Query(None, max_length=64),
                              device: Device = Depends(device_auth)):
        pkg = await _find_update(device, model, have, 0.0, mode, have_hash)
        if pkg is None:
            return Response(status_code=204)
        return pkg.info

    @app.get("/v1/devices/{name}", tags=["device"])
    def get_device(name: str, device: Device = Depends(device_auth)) -> dict:
        if name != device.name:
            raise HTTPException(403, "a device may only read its own record")
        return next(d for d in A.devices_info(service.root_store, cfg.device_stale_after_s) if d["name"] == name)

    @app.get("/v1/whoami", tags=["device"])
    def whoami(device: Device = Depends(device_auth)) -> dict:
        """The token's device and what it needs to work with this cloud: the model served, the signing key, the
        upload limits (``edgeadapt doctor device`` checks a bundle against them)."""
        store = service.served_for(device).store
        return {"device": device.name, **service.limits(device), "latest_version": store.latest_version(),
                "target_version": service.target_for(device)}

    # ------------------------------------------------------------------ admin
    admin = [Depends(admin_auth)]

    @app.get("/v1/admin/status", tags=["admin"], dependencies=admin)
    def admin_status() -> dict:
        s = service.store
        t = service.trainer
        return {"model": service.model_name, "latest_version": s.latest_version(),
                "samples": {"train": s.count_samples("train"), "holdout": s.count_samples("holdout"),
                            "novel": s.count_samples("novel"), "pending": s.count_samples("train", consumed=False),
                            "capped": s.count_samples("capped")},
                "trainer": None if t is None else {"running": t.running, "version": t.version,
                                                   "last_result": t.last_result.to_dict() if t.last_result else None,
                                                   "executor": t.executor,
                                                   **(t.status() if t.executor == "ray" else {})},
                "update_mode": cfg.update_mode, "auto_rollout": cfg.auto_rollout,
                "public_key": service.public_key_b64,
                "models": {name: {"latest_version": m.store.latest_version(),
                                  "pending": m.store.count_samples("train", consumed=False),
                                  "trainer": None if m.trainer is None else {"running": m.trainer.running,
                                                                             "version": m.trainer.version}}
                           for name, m in service.models.items()},
                "model_errors": {name: why for name, (_, why) in service.model_errors.items()}}

    @app.get("/v1/admin/models", tags=["admin"], dependencies=admin)
    def admin_models() -> list[dict]:
        """The registered models: bundle, teacher, input shape, classes, devices, versions, pending uploads."""
        from edgeadapt.cloud.registry import models_info

        return models_info(service.root_store)

    def _model_store(model: str | None):
        """The store view of the model a request names (default: the only one registered)."""
        return service.root_store.scoped(service.root_store.models.resolve(model))

    @app.get("/v1/admin/devices", tags=["admin"], dependencies=admin)
    def admin_devices(stale_after_s: float | None = Query(None, gt=0, le=10**9, description="a heartbeat older "
                                                          "than this is stale (default: device_stale_after_s)")
                      ) -> list[dict]:
        """Every device: version, assigned version and rollout, last seen, and what is wrong (``trouble``)."""
        return A.devices_info(service.root_store, stale_after_s or cfg.device_stale_after_s)

    @app.post("/v1/admin/devices", tags=["admin"], dependencies=admin, status_code=201)
    def admin_add_device(req: NewDevice) -> dict:
        store = service.root_store
        token = store.add_device(req.name, None if req.expires_days is None else req.expires_days * 86400, req.model)
        dev = store.get_device(req.name)
        return {"name": req.name, "model": dev.model, "token": token, "expires": A._iso(dev.expires)}

    @app.post("/v1/admin/devices/{name}/revoke", tags=["admin"], dependencies=admin)
    def admin_revoke_device(name: str) -> dict:
        service.store.revoke_device(name)
        return {"name": name, "revoked": True}

    @app.get("/v1/admin/versions", tags=["admin"], dependencies=admin)
    def admin_versions(model: str | None = Query(None, max_length=256, description="one model's (default: all)")
                       ) -> dict:
        return A.versions_info(service.root_store if model is None else _model_store(model))

    @app.get("/v1/admin/rollouts", tags=["admin"], dependencies=admin)
    def admin_rollouts() -> list[dict]:
        return A.rollouts_info(service.root_store)

    @app.post("/v1/admin/rollouts", tags=["admin"], dependencies=admin, status_code=201)
    def admin_push(req: PushRequest) -> dict:
        out = A.push(_model_store(req.model), req.version, req.devices, req.fraction, req.revert, req.group)
        service._bump()
        return out

    @app.get("/v1/admin/groups", tags=["admin"], dependencies=admin)
    def admin_groups() -> list[dict]:
        """Groups of similar devices (issue 18): members, lineage version, rollout target, accuracy proxy."""
        return A.groups_info(service.root_store, cfg.groups)

    @app.post("/v1/admin/train", tags=["admin"], dependencies=admin)
    def admin_train() -> dict[str, Any]:
        if service.trainer is None:
            raise HTTPException(409, "no trainer: the service runs without a teacher")
        try:
            return service.trainer.train_now().to_dict()
        except (ConfigError, RuntimeError, TimeoutError) as exc:  # executor ray: Ray down, a task failed or still runs
            raise HTTPException(503, str(exc)) from None

    @app.post("/v1/admin/models/{model}/train", tags=["admin"], dependencies=admin)
    def admin_train_model(model: str) -> dict[str, Any]:
        """Train one model on everything its devices uploaded and it has not trained on yet, now."""
        served = service.served(model)
        if served is None:
            why = service.model_errors.get(model)
            raise HTTPException(503 if why else 404, why[1] if why else f"no model {model!r} is served here")
        if served.trainer is None:
            raise HTTPException(409, f"no trainer for model {model!r}: it was registered without a teacher")
        try:
            return served.trainer.train_now().to_dict()
        except (ConfigError, RuntimeError, TimeoutError) as exc:  # executor ray: Ray down, a task failed or still runs
            raise HTTPException(503, str(exc)) from None

    def openapi() -> dict:
        # the bodies read by hand (to limit their size while streaming) are documented explicitly
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (SampleBatch, Heartbeat):
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[model.__name__] = js
            hb = schema["paths"]["/v1/heartbeat"]["post"]
            hb["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Heartbeat"}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def create_app_from_home(home: str | Path | None = None, overrides: dict | None = None, **service_kwargs) -> FastAPI:
    from edgeadapt.cloud.config import load_config

    config = load_config(home, overrides)
    return create_app(CloudService(config, home, **service_kwargs))


def _server_options(config, limits=None, raise_limit: bool = True, http: str = "auto") -> dict[str, Any]:
    """uvicorn options shared by ``serve`` and ``ServerThread``: connection limits and read deadlines
    (``edgeadapt.core.netguard``; ``http``: auto | httptools | h11) and TLS when the config names a certificate."""
    from edgeadapt.core.netguard import uvicorn_options

    opts = uvicorn_options(limits or config.net_limits(), raise_limit=raise_limit, http=http)
    if config.tls_cert:
        opts["ssl_certfile"] = str(Path(config.tls_cert).expanduser())
        if config.tls_key:
            opts["ssl_keyfile"] = str(Path(config.tls_key).expanduser())
    return opts


class ServerThread:
    """Run an app with uvicorn in a background thread on an already-bound socket (port 0 = any free port), with
    the same connection limits (and TLS, when configured) as ``serve``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 limits=None, http: str = "auto"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        cfg = app.state.service.config
        self.scheme = cfg.scheme
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5,
                                access_log=False, **_server_options(cfg, limits, raise_limit=False, http=http))
        self.server = _cloud_server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="edgeadapt-cloud-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the cloud server failed to start")
            if time.monotonic() > deadline:
                raise TimeoutError("the cloud server did not start in time")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(service: CloudService, log_level: str = "info") -> None:
    """Run the service in the foreground until interrupted."""
    import uvicorn

    config = uvicorn.Config(create_app(service), host=service.config.host, port=service.config.port,
                            log_level=log_level, timeout_graceful_shutdown=10, **_server_options(service.config))
    _cloud_server(config).run()
