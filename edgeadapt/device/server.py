"""The device's HTTP API: predict (JSON or binary), status, health, Prometheus metrics."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import math
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from edgeadapt.device.daemon import DeviceDaemon
from edgeadapt.device.engine import InputError

ALLOWED = {"uint8": np.uint8, "float32": np.float32, "float16": np.float16}


class ArrayIn(BaseModel):
    dtype: str = Field(description="uint8 (0-255), float32 or float16 (0-1)")
    shape: list[int] = Field(max_length=8)
    data: str = Field(description="base64 of the raw little-endian bytes")


class PredictRequest(BaseModel):
    inputs: list[Any] | None = Field(None, description="nested lists [N,C,H,W] or [C,H,W], values 0-1 (or 0-255 ints)")
    array: ArrayIn | None = None
    top_k: int = Field(3, ge=1, le=1000)
    probs: bool = Field(False, description="return the full probability vector")


class RollbackRequest(BaseModel):
    # module level: a model defined inside create_app is a forward reference FastAPI cannot resolve, and
    # /openapi.json answered 500
    to: int | None = Field(None, ge=0)


def _decode_array(a: ArrayIn, max_bytes: int) -> np.ndarray:
    if a.dtype not in ALLOWED:
        raise InputError(f"dtype {a.dtype!r} not supported; use one of {sorted(ALLOWED)}")
    if any(d <= 0 for d in a.shape):
        raise InputError(f"shape {a.shape} has a non-positive dimension")
    dt = np.dtype(ALLOWED[a.dtype]).newbyteorder("<")
    n = math.prod(a.shape)  # Python ints: a hostile shape cannot overflow into a small product
    if n * dt.itemsize > max_bytes:
        raise InputError(f"array of {n * dt.itemsize} bytes exceeds the {max_bytes}-byte limit")
    try:
        raw = base64.b64decode(a.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"data is not valid base64: {exc}") from exc
    if len(raw) != n * dt.itemsize:
        raise InputError(f"data has {len(raw)} bytes; shape {a.shape} of {a.dtype} needs {n * dt.itemsize}")
    return np.frombuffer(raw, dtype=dt).reshape(a.shape).astype(dt.newbyteorder("="))


def _load_npy(body: bytes, max_bytes: int) -> np.ndarray:
    """np.load, but the header is checked first: a header may declare far more data than the body holds, and
    np.load allocates what the header says before it finds the body short."""
    f = io.BytesIO(body)
    try:
        fmt = np.lib.format
        version = fmt.read_magic(f)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, _, dtype = read(f)
    except Exception as exc:
        raise InputError(f"body is not a valid .npy array: {exc}") from exc
    if dtype.hasobject:
        raise InputError("object arrays are not accepted")
    need = math.prod(shape) * dtype.itemsize
    if need > max_bytes or need != len(body) - f.tell():
        raise InputError(f"the .npy header declares {list(shape)} of {dtype} ({need} bytes); the body holds "
                         f"{len(body) - f.tell()} bytes of data (limit {max_bytes})")
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:
        raise InputError(f"body is not a valid .npy array: {exc}") from exc


def _query_int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise InputError(f"query parameter {name} must be an integer, not {raw[:50]!r}") from None
    if not lo <= v <= hi:
        raise InputError(f"query parameter {name} must be in {lo}..{hi}")
    return v


def _from_lists(inputs: list, expected: list[int]) -> np.ndarray:
    try:
        arr = np.asarray(inputs)
    except (ValueError, TypeError) as exc:
        raise InputError(f"inputs is not a rectangular numeric array: {exc}") from exc
    if arr.dtype == object or arr.dtype.kind not in "iuf":
        raise InputError(f"inputs must be numbers in a rectangular array of shape [N, {expected}]")
    if arr.dtype.kind in "iu":
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise InputError("integer inputs must be in 0..255")
        return arr.astype(np.uint8)
    return arr.astype(np.float32)


def _refusal_kind(message: str) -> str:
    """A bounded label for the inputs-refused metric."""
    for kind in ("range", "NaN", "shape", "dtype", "limit", "base64", "npy"):
        if kind in message:
            return kind.lower()
    return "other"


def _loopback_host(host: str) -> bool:
    """Is a ``Host`` header a loopback name or address (with or without a port)?"""
    h = host.strip().lower()
    if h.startswith("["):
        h = h[1:].split("]")[0]
    elif h.count(":") == 1:
        h = h.split(":")[0]
    return h in ("localhost", "127.0.0.1", "::1") or h.startswith("127.")


def create_app(daemon: DeviceDaemon) -> FastAPI:
    app = FastAPI(title="edgeadapt device", version="1", description="Forward-only adapting inference daemon.")
    cfg = daemon.config
    m = daemon.metrics
    expected = daemon.manifest.input.shape
    codec = daemon.engine.codec
    # nested lists of numbers cost ~8x their JSON size to parse: at least one sample, else 2 MiB
    json_list_limit = max(2 * 2**20, 16 * codec.sample_elems)

    allowed_origins = set(getattr(cfg, "allowed_origins", []) or [])

    @app.middleware("http")
    async def refuse_browsers_and_rebinding(request: Request, call_next):
        """A web page in a browser on the device host must not reach the API: browsers send ``Origin`` on every
        cross-origin (and every POST) request, other clients do not; admin calls also need a loopback ``Host``
        (DNS rebinding gives the attacker's name there)."""
        origin = request.headers.get("origin")
        if origin is not None and origin not in allowed_origins:
            m.requests.labels("403").inc()
            return JSONResponse({"detail": f"requests from web origin {origin[:100]!r} are not allowed "
                                           "(device config allowed_origins)"}, status_code=403)
        if request.url.path.startswith("/v1/admin/") and not _loopback_host(request.headers.get("host", "")):
            return JSONResponse({"detail": "admin endpoints answer requests addressed to a loopback host only"},
                                status_code=403)
        return await call_next(request)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > cfg.max_body_bytes
            except ValueError:
                return JSONResponse({"detail": "invalid Content-Length"}, status_code=400)
            if too_big:
                m.requests.labels("413").inc()
                return JSONResponse({"detail": f"body of {length} bytes exceeds the {cfg.max_body_bytes}-byte limit"},
                                    status_code=413)
        return await call_next(request)

    async def _read_body(request: Request) -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > cfg.max_body_bytes:
                raise HTTPException(413, f"body exceeds the {cfg.max_body_bytes}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _run(x: np.ndarray, top_k: int, want_probs: bool) -> dict:
        x = codec.as_batch(x)
        if len(x) > cfg.max_request_samples:
            raise InputError(f"{len(x)} samples in one request; the limit is {cfg.max_request_samples}")
        # the input boundary: shape, dtype, finiteness and the declared value range, per request (a bad request
        # is refused alone, before it shares a batch, or the adaptation statistics, with anyone else's)
        x, clipped = codec.check(x)
        if clipped:
            m.inputs_clipped.inc()
        results = await asyncio.wait_for(asyncio.wrap_future(daemon.batcher.submit(x, adapt=not clipped)), 60)
        preds = []
        for r in results:
            p = r["probs"]
            k = min(top_k, len(p))
            order = np.argsort(-p)[:k]
            item = {"class": r["class"], "label": r["label"], "ood": r["ood"], "ood_score": r["ood_score"],
                    "entropy": r["entropy"],
                    "top_k": [{"class": int(c), "label": daemon.manifest.labels[int(c)], "prob": float(p[c])}
                              for c in order]}
            if want_probs:
                item["probs"] = [float(v) for v in p]
            preds.append(item)
        return {"model": daemon.manifest.model_name, "param_version": results[0]["param_version"],
                "predictions": preds}

    binary = {"schema": {"type": "string", "format": "binary"}}
    predict_doc = {
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
            "application/x-npy": binary, "application/octet-stream": binary}},
        "parameters": [
            {"name": "top_k", "in": "query", "required": False, "description": "binary bodies: top classes to list",
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
            {"name": "X-Dtype", "in": "header", "required": False, "description": "octet-stream bodies",
             "schema": {"type": "string", "enum": sorted(ALLOWED)}},
            {"name": "X-Shape", "in": "header", "required": False,
             "description": "octet-stream bodies: comma-separated dimensions", "schema": {"type": "string"}}]}

    @app.post("/v1/predict", summary="Predict a batch (JSON: inputs or base64 array; or binary .npy / raw bytes)",
              openapi_extra=predict_doc)
    async def predict(request: Request):
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            body = await _read_body(request)
            top_k, want_probs = _query_int(request, "top_k", 3, 1, 1000), False
            if ctype in ("application/x-npy", "application/octet-stream"):
                if ctype == "application/x-npy":
                    x = _load_npy(body, cfg.max_body_bytes)
                else:
                    dtype = request.headers.get("x-dtype", "uint8")
                    shape = request.headers.get("x-shape", "")
                    try:
                        dims = [int(s) for s in shape.split(",") if s.strip()]
                        arr_in = ArrayIn(dtype=dtype, shape=dims, data=base64.b64encode(body).decode())
                    except ValueError as exc:  # pydantic's ValidationError is a ValueError too
                        raise InputError(f"X-Shape must be at most 8 comma-separated integers: {exc}") from exc
                    x = _decode_array(arr_in, cfg.max_body_bytes)
                if x.dtype.kind not in "uif" or (x.dtype.kind in "iu" and x.dtype != np.uint8):
                    raise InputError(f"array dtype {x.dtype} not supported; use uint8, float32 or float16")
            else:
                if len(body) > json_list_limit and b'"inputs"' in body:
                    raise HTTPException(413, f"nested-list JSON bodies are limited to {json_list_limit} bytes (parsing "
                                             "one costs about 8x its size in memory); send larger batches as 'array' "
                                             "(base64) or application/x-npy")
                if ctype and ctype != "application/json" and not ctype.endswith("+json"):
                    raise HTTPException(415, f"content-type {ctype[:100]!r} not supported: send application/json, "
                                             "application/x-npy or application/octet-stream")
                try:
                    req = PredictRequest.model_validate_json(body)
                except Exception as exc:
                    raise HTTPException(422, f"invalid JSON request: {str(exc)[:500]}") from exc
                top_k, want_probs = req.top_k, req.probs
                if (req.inputs is None) == (req.array is None):
                    raise InputError("give exactly one of 'inputs' (nested lists) or 'array' (base64)")
                x = _from_lists(req.inputs, expected) if req.inputs is not None else \
                    _decode_array(req.array, cfg.max_body_bytes)
            out = await _run(x, top_k, want_probs)
        except InputError as exc:
            m.requests.labels("400").inc()
            m.inputs_refused.labels(_refusal_kind(str(exc))).inc()
            raise HTTPException(400, str(exc)) from exc
        except HTTPException as exc:
            m.requests.labels(str(exc.status_code)).inc()
            raise
        except Exception as exc:
            m.requests.labels("500").inc()
            logging.getLogger("edgeadapt.device").exception("predict failed: %s", exc)
            raise HTTPException(500, f"internal error: {type(exc).__name__}: {exc}") from exc
        m.requests.labels("200").inc()
        m.latency.observe(time.perf_counter() - t0)
        return out

    @app.get("/v1/status")
    def status():
        # whatever the documents hold (a NaN in an update event): strict JSON, never a 500
        from edgeadapt.core.jsonsafe import json_safe

        return JSONResponse(json_safe(daemon.status()))

    @app.post("/v1/admin/rollback", summary="Roll back to an earlier version on disk (loopback clients only)")
    def admin_rollback(req: RollbackRequest, request: Request):
        client = request.client.host if request.client else ""
        if client not in ("127.0.0.1", "::1", "localhost", "testclient"):
            raise HTTPException(403, "admin endpoints answer loopback clients only")
        # the updater's one rollback path: under the update lock, ends a watch, pins the versions it left
        from edgeadapt.device.updater import RollbackRefused, manual_rollback

        try:
            return manual_rollback(daemon, req.to)
        except RollbackRefused as exc:
            raise HTTPException(409, str(exc)) from exc

    @app.post("/v1/admin/sync", summary="Upload everything queued now and check for an update (loopback only)")
    def admin_sync(request: Request):
        client = request.client.host if request.client else ""
        if client not in ("127.0.0.1", "::1", "localhost", "testclient"):
            raise HTTPException(403, "admin endpoints answer loopback clients only")
        sent = 0
        if daemon.uploader is not None:
            for _ in range(10_000):
                n = daemon.uploader.send_once()
                sent += n
                if n == 0:
                    break
        update = daemon.updater.check_once() if daemon.updater is not None else "standalone"
        return {"uploaded": sent, "update": update, "param_version": daemon.engine.param_version,
                "queued": len(daemon.queue) if daemon.queue is not None else 0}

    @app.get("/healthz")
    def healthz():
        """Liveness (it answers) with what part of the job fails now: ``status`` is ``degraded`` with reasons."""
        degraded = daemon.degraded()
        return {"ok": True, "status": "degraded" if degraded else "ok", "param_version": daemon.engine.param_version,
                "reasons": {k: v["reason"] for k, v in degraded.items()}}

    @app.get("/metrics")
    def metrics():
        daemon.status()  # refresh gauges
        return Response(daemon.metrics.render(), media_type="text/plain; version=0.0.4")

    def openapi() -> dict:
        # /v1/predict reads its body by hand (to limit its size while streaming): its schema is added here
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            js = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(js.pop("$defs", {}))
            comps["PredictRequest"] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
