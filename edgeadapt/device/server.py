"""The device's HTTP API: predict (JSON, binary arrays, image files), the Open Inference Protocol (KServe v2 REST,
as Triton serves it: device/oip.py), status, health, Prometheus metrics.

The predict routes (``/v1/predict``, ``/v2/models/{name}/infer``) are the hot path. They are answered by plain
ASGI handlers in front of FastAPI's middleware and routing (``DeviceApp.__call__``): at one small image per
request those layers cost more than the model (a profile of the old route: ~60% of the event loop in
``BaseHTTPMiddleware`` task groups, request streaming and routing, docs/NOTES.md "Serving"). The same guard as
everywhere else runs first (browser Origin, loopback Host for admin calls, the body limit), and the routes stay
in ``/openapi.json`` (their descriptions are written below).
Everything else is ordinary FastAPI.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from edgeadapt.device import oip
from edgeadapt.device.daemon import DeviceDaemon
from edgeadapt.device.engine import InputError
from edgeadapt.device.image_decode import IMAGE_TYPES, ImageDecoder, ImageError
from edgeadapt.device.predictions import Predictions

log = logging.getLogger("edgeadapt.device")

ALLOWED = {"uint8": np.uint8, "float32": np.float32, "float16": np.float16}
MAX_DIMS = 8
BATCH_TIMEOUT_S = 60.0
#: image bodies larger than this are decoded on a worker thread (Pillow releases the GIL), smaller ones inline
DECODE_INLINE_BYTES = 32 * 1024

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class ArrayIn(BaseModel):
    dtype: str = Field(description="uint8 (0-255), float32 or float16 (0-1)")
    shape: list[int] = Field(max_length=MAX_DIMS)
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


class Refused(Exception):
    """A request refused with an HTTP status other than 400 (413 too large, 415 unsupported type, 422 ...)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The client disconnected before its request body arrived: nothing to answer."""


def _array_size(dtype: str, shape: list[int], max_bytes: int) -> np.dtype:
    """The little-endian dtype of an array described by a client, after its size is checked in Python ints: a
    hostile shape cannot overflow into a small product, nor ask for more than the body limit."""
    if dtype not in ALLOWED:
        raise InputError(f"dtype {dtype!r} not supported; use one of {sorted(ALLOWED)}")
    if any(d <= 0 for d in shape):
        raise InputError(f"shape {shape} has a non-positive dimension")
    dt = np.dtype(ALLOWED[dtype]).newbyteorder("<")
    need = math.prod(shape) * dt.itemsize
    if need > max_bytes:
        raise InputError(f"array of {need} bytes exceeds the {max_bytes}-byte limit")
    return dt


def _array_from_bytes(raw: bytes, dtype: str, shape: list[int], max_bytes: int) -> np.ndarray:
    """Raw little-endian bytes of ``shape`` and ``dtype`` -> an array (read in place for uint8)."""
    dt = _array_size(dtype, shape, max_bytes)
    need = math.prod(shape) * dt.itemsize
    if len(raw) != need:
        raise InputError(f"data has {len(raw)} bytes; shape {shape} of {dtype} needs {need}")
    x = np.frombuffer(raw, dtype=dt).reshape(shape)
    return x if dt.itemsize == 1 else x.astype(dt.newbyteorder("="))


def _decode_array(a: ArrayIn, max_bytes: int) -> np.ndarray:
    _array_size(a.dtype, a.shape, max_bytes)  # before decoding anything
    try:
        raw = base64.b64decode(a.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"data is not valid base64: {exc}") from exc
    return _array_from_bytes(raw, a.dtype, a.shape, max_bytes)


def _raw_shape(header: str) -> list[int]:
    try:
        dims = [int(s) for s in header.split(",") if s.strip()]
    except ValueError as exc:
        raise InputError(f"X-Shape must be at most {MAX_DIMS} comma-separated integers: {exc}") from exc
    if len(dims) > MAX_DIMS:
        raise InputError(f"X-Shape must be at most {MAX_DIMS} comma-separated integers, not {len(dims)}")
    return dims


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
        shape, fortran, dtype = read(f)
    except Exception as exc:
        raise InputError(f"body is not a valid .npy array: {exc}") from exc
    if dtype.hasobject:
        raise InputError("object arrays are not accepted")
    need = math.prod(shape) * dtype.itemsize
    if need > max_bytes or need != len(body) - f.tell():
        raise InputError(f"the .npy header declares {list(shape)} of {dtype} ({need} bytes); the body holds "
                         f"{len(body) - f.tell()} bytes of data (limit {max_bytes})")
    try:
        # the header is known good and the size matches: the data is read in place, not copied by np.load
        x = np.frombuffer(body, dtype=dtype, offset=f.tell())
        return x.reshape(shape[::-1]).T if fortran else x.reshape(shape)
    except Exception as exc:
        raise InputError(f"body is not a valid .npy array: {exc}") from exc


def _query_int(query: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
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


def _query_bool(query: dict[str, str], name: str, default: bool) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on", ""):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise InputError(f"query parameter {name} must be true or false, not {raw[:50]!r}")


def parse_multipart(body: bytes, content_type: str, max_files: int) -> tuple[list[bytes], dict[str, str]]:
    """A ``multipart/form-data`` body -> (the files' bytes in order, the text fields). A part is a file when it
    has a filename or an ``image/*`` type. Parsed in memory (the body is already within the body limit), never
    spooled to disk; at most ``max_files`` files."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InputError("multipart/form-data body without a boundary parameter")
    parts: list[dict] = []
    head: dict[str, bytes] = {"field": b"", "value": b""}
    state = {"ended": 0, "closed": False}

    def on_part_begin() -> None:
        if len(parts) >= max_files + 16:  # files, plus room for a few text fields
            raise Refused(413, f"more than {max_files} files in one request")
        parts.append({"headers": {}, "chunks": []})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        head["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        head["value"] += data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"][head["field"].strip().lower()] = head["value"].strip()
        head["field"], head["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["chunks"].append(data[start:end])

    def on_part_end() -> None:
        state["ended"] += 1

    def on_end() -> None:
        state["closed"] = True

    parser = MultipartParser(boundary, callbacks={
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_end": on_end}, max_size=len(body))
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise InputError(f"malformed multipart/form-data body: {exc}") from exc
    if not state["closed"] or state["ended"] != len(parts):
        raise InputError("multipart/form-data body ends before its closing boundary")
    files, fields = [], {}
    for part in parts:
        h = part["headers"]
        _, disp = parse_options_header(h.get(b"content-disposition", b""))
        ptype = h.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        data = b"".join(part["chunks"])
        if b"filename" in disp or ptype.startswith("image/"):
            files.append(data)
        else:
            name = disp.get(b"name", b"").decode("latin-1")
            fields[name] = data[:100].decode("utf-8", "replace")
    if not files:
        raise InputError("multipart/form-data body holds no file (send each image as a file part)")
    if len(files) > max_files:
        raise Refused(413, f"{len(files)} files in one request; the limit is {max_files}")
    return files, fields


def _time_out(fut: asyncio.Future) -> None:
    """A batch that has not answered in ``BATCH_TIMEOUT_S``: its request fails (a 500 that says so)."""
    if not fut.done():
        fut.set_exception(TimeoutError(f"no answer from the engine within {BATCH_TIMEOUT_S:g} s"))


def _refusal_kind(message: str) -> str:
    """A bounded label for the inputs-refused metric."""
    for kind in ("range", "NaN", "shape", "dtype", "limit", "base64", "npy", "image", "multipart"):
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


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def _media_type(headers: dict[str, str]) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


async def respond(send: Send, status: int, body: bytes, content_type: bytes = b"application/json",
                  extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", b"%d" % len(body)), *extra]})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body, cut off (413) once past ``limit`` bytes while it streams in."""
    chunks: list[bytes] = []
    total = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        chunk = msg.get("body", b"")
        if chunk:
            total += len(chunk)
            if total > limit:
                raise Refused(413, f"body exceeds the {limit}-byte limit")
            chunks.append(chunk)
        if not msg.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def v1_payload(preds: Predictions, model: str, top_k: int, want_probs: bool) -> bytes:
    """/v1's answer, built from Python lists made once per batch (``Predictions.lists``), not per request."""
    lists, lo, hi = preds.lists(top_k, want_probs)
    labels = preds.labels
    cls, ood, score, ent, order, top = (lists["class"], lists["ood"], lists["ood_score"], lists["entropy"],
                                        lists["order"], lists["top"])
    all_probs = lists.get("probs") if want_probs else None
    out = []
    for i in range(lo, hi):
        c = cls[i]
        item = {"class": c, "label": labels[c], "ood": ood[i], "ood_score": score[i], "entropy": ent[i],
                "top_k": [{"class": j, "label": labels[j], "prob": p} for j, p in zip(order[i], top[i], strict=True)]}
        if all_probs is not None:
            item["probs"] = all_probs[i]
        out.append(item)
    return orjson.dumps({"model": model, "param_version": preds.param_version, "predictions": out})


class DeviceApp(FastAPI):
    """FastAPI, with every HTTP request passing ``front`` first: it refuses what the guard refuses and answers
    the hot routes itself; anything it leaves goes through FastAPI as usual."""

    front: Callable[[Scope, Receive, Send], Awaitable[bool]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.front is not None and await self.front(scope, receive, send):
            return
        await super().__call__(scope, receive, send)


def create_app(daemon: DeviceDaemon) -> DeviceApp:
    app = DeviceApp(title="edgeadapt device", version="1", description="Forward-only adapting inference daemon.")
    cfg = daemon.config
    m = daemon.metrics
    manifest = daemon.manifest
    expected = manifest.input.shape
    codec = daemon.engine.codec
    # nested lists of numbers cost ~8x their JSON size to parse: at least one sample, else 2 MiB
    json_list_limit = max(2 * 2**20, 16 * codec.sample_elems)
    allowed_origins = set(getattr(cfg, "allowed_origins", []) or [])
    served_ok = m.requests.labels("200")  # the labelled child once, not a labels() lookup per request

    def guard(path: str, headers: dict[str, str]) -> tuple[int, str] | None:
        """A web page in a browser on the device host must not reach the API: browsers send ``Origin`` on every
        cross-origin (and every POST) request, other clients do not; admin calls also need a loopback ``Host``
        (DNS rebinding gives the attacker's name there). A declared body over the limit is refused unread."""
        origin = headers.get("origin")
        if origin is not None and origin not in allowed_origins:
            return 403, (f"requests from web origin {origin[:100]!r} are not allowed "
                         "(device config allowed_origins)")
        if path.startswith("/v1/admin/") and not _loopback_host(headers.get("host", "")):
            return 403, "admin endpoints answer requests addressed to a loopback host only"
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > cfg.max_body_bytes
            except ValueError:
                return 400, "invalid Content-Length"
            if too_big:
                return 413, f"body of {length} bytes exceeds the {cfg.max_body_bytes}-byte limit"
        return None

    batcher = daemon.batcher
    inflight = [0]  # predict/infer requests in this server now (front counts them)

    async def serve(x: np.ndarray) -> Predictions:
        """The input boundary and the batcher: shape, dtype, finiteness and the declared value range, per request
        (a bad request is refused alone, before it shares a batch, or the adaptation statistics, with anyone
        else's); a clipped request is served but adapts nothing. A request with no other in flight runs on
        this thread when the engine is free (``run_alone``: no hand-off to the worker and back); otherwise it
        joins the batcher's queue."""
        x = codec.as_batch(x)
        if len(x) > cfg.max_request_samples:
            raise InputError(f"{len(x)} samples in one request; the limit is {cfg.max_request_samples}")
        x, clipped = codec.check(x)
        if clipped:
            m.inputs_clipped.inc()
        if inflight[0] == 1:
            await asyncio.sleep(0)  # requests parsed in the same loop turn start first, and are counted
            if inflight[0] == 1:
                res = batcher.run_alone(x, not clipped, defer=asyncio.get_running_loop().call_soon)
                if res is not None:
                    return res
        fut = batcher.submit_async(x, adapt=not clipped)
        timer = asyncio.get_running_loop().call_later(BATCH_TIMEOUT_S, _time_out, fut)
        try:
            return await fut
        finally:
            timer.cancel()

    def v1_input(ctype: str, headers: dict[str, str], body: bytes, query: dict[str, str]
                 ) -> tuple[np.ndarray, int, bool]:
        """A /v1 predict body -> (array, top_k, probs)."""
        top_k = _query_int(query, "top_k", 3, 1, 1000)
        if ctype.startswith("image/"):
            raise Refused(415, f"image type {ctype[:100]!r} not supported: send image/jpeg, image/png or image/webp")
        if ctype == "application/x-npy":
            x = _load_npy(body, cfg.max_body_bytes)
        elif ctype == "application/octet-stream":
            x = _array_from_bytes(body, headers.get("x-dtype", "uint8"), _raw_shape(headers.get("x-shape", "")),
                                  cfg.max_body_bytes)
        else:
            if len(body) > json_list_limit and b'"inputs"' in body:
                raise Refused(413, f"nested-list JSON bodies are limited to {json_list_limit} bytes (parsing one "
                                   "costs about 8x its size in memory); send larger batches as 'array' (base64) "
                                   "or application/x-npy")
            if ctype and ctype != "application/json" and not ctype.endswith("+json"):
                raise Refused(415, f"content-type {ctype[:100]!r} not supported: send application/json, "
                                   "application/x-npy, application/octet-stream, image/jpeg, image/png, "
                                   "image/webp or multipart/form-data")
            try:
                req = PredictRequest.model_validate_json(body)
            except Exception as exc:
                raise Refused(422, f"invalid JSON request: {str(exc)[:500]}") from exc
            if (req.inputs is None) == (req.array is None):
                raise InputError("give exactly one of 'inputs' (nested lists) or 'array' (base64)")
            x = _from_lists(req.inputs, expected) if req.inputs is not None else \
                _decode_array(req.array, cfg.max_body_bytes)
            return x, req.top_k, req.probs
        if x.dtype.kind not in "uif" or (x.dtype.kind in "iu" and x.dtype != np.uint8):
            raise InputError(f"array dtype {x.dtype} not supported; use uint8, float32 or float16")
        return x, top_k, _query_bool(query, "probs", False)

    decoder = ImageDecoder(manifest.input)
    decode_pool = ThreadPoolExecutor(max_workers=max(1, min(4, cfg.threads)), thread_name_prefix="image-decode")

    async def decode(files: list[bytes]) -> np.ndarray:
        if sum(len(f) for f in files) <= DECODE_INLINE_BYTES:
            return decoder.decode_many(files)
        loop = asyncio.get_running_loop()
        if len(files) == 1:
            return (await loop.run_in_executor(decode_pool, decoder.decode, files[0]))[None]
        parts = await asyncio.gather(*(loop.run_in_executor(decode_pool, decoder.decode, f) for f in files),
                                     return_exceptions=True)
        for i, part in enumerate(parts):
            if isinstance(part, ImageError):
                raise ImageError(f"file {i + 1} of {len(files)}: {part}", part.status)
            if isinstance(part, BaseException):
                raise part
        return np.stack(parts)

    async def image_input(ctype: str, headers: dict[str, str], body: bytes, query: dict[str, str]
                          ) -> tuple[np.ndarray, int, bool]:
        """An image body (one file) or a multipart form (one or more) -> (uint8 batch, top_k, probs)."""
        if ctype == "multipart/form-data":
            files, fields = parse_multipart(body, headers.get("content-type", ""), cfg.max_request_samples)
            query = {**{k: v for k, v in fields.items() if k in ("top_k", "probs")}, **query}
        else:
            files = [body]
        top_k, want_probs = _query_int(query, "top_k", 3, 1, 1000), _query_bool(query, "probs", False)
        return await decode(files), top_k, want_probs

    async def predict_v1(scope: Scope, headers: dict[str, str], receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        qs = scope.get("query_string", b"")
        query = dict(parse_qsl(qs.decode("latin-1"), keep_blank_values=True)) if qs else {}
        try:
            body = await read_body(receive, cfg.max_body_bytes)
            ctype = _media_type(headers)
            if ctype in IMAGE_TYPES or ctype == "multipart/form-data":
                x, top_k, want_probs = await image_input(ctype, headers, body, query)
            else:
                x, top_k, want_probs = v1_input(ctype, headers, body, query)
            out = v1_payload(await serve(x), manifest.model_name, top_k, want_probs)
        except ClientGone:
            return
        except InputError as exc:
            status = getattr(exc, "status", 400)  # an ImageError says 413 or 415 where that is the reason
            m.requests.labels(str(status)).inc()
            m.inputs_refused.labels(_refusal_kind(str(exc))).inc()
            await respond(send, status, orjson.dumps({"detail": str(exc)}))
            return
        except Refused as exc:
            m.requests.labels(str(exc.status)).inc()
            await respond(send, exc.status, orjson.dumps({"detail": str(exc)}))
            return
        except Exception as exc:
            m.requests.labels("500").inc()
            log.exception("predict failed: %s", exc)
            await respond(send, 500, orjson.dumps({"detail": f"internal error: {type(exc).__name__}: {exc}"}))
            return
        served_ok.inc()
        m.latency.observe(time.perf_counter() - t0)
        await respond(send, 200, out)

    model_name, model_version = manifest.model_name, manifest.model_version

    async def infer_v2(scope: Scope, headers: dict[str, str], receive: Receive, send: Send, name: str,
                       version: str | None) -> None:
        """``POST /v2/models/{name}[/versions/{version}]/infer``: JSON tensors or the binary tensor extension."""
        t0 = time.perf_counter()
        try:
            if name != model_name or version not in (None, model_version):
                raise oip.ProtocolError(f"Request for unknown model: '{name[:100]}'"
                                        + (f" version {version[:20]}" if version else "") + " is not found", 404)
            if headers.get("content-encoding", "identity").strip().lower() != "identity":
                raise oip.ProtocolError("compressed inference requests are not supported (Content-Encoding)", 415)
            body = await read_body(receive, cfg.max_body_bytes)
            req = oip.decode_request(body, headers.get("inference-header-content-length"), cfg.max_body_bytes,
                                     json_list_limit, cfg.max_request_samples)
            if req.array is not None and list(req.array.shape[1:]) != list(expected) or \
                    (req.array is not None and req.array.ndim != len(expected) + 1):
                raise oip.ProtocolError(f"unexpected shape for input '{oip.INPUT_NAME}' for model '{model_name}': "
                                        f"expected {[-1, *expected]}, got {list(req.array.shape)}")
            x = req.array if req.files is None else await decode(req.files)
            out, head_len = oip.encode_response(await serve(x), req, model_name, model_version)
        except ClientGone:
            return
        except (InputError, Refused) as exc:
            status = getattr(exc, "status", 400)
            m.requests.labels(str(status)).inc()
            if isinstance(exc, InputError):
                m.inputs_refused.labels(_refusal_kind(str(exc))).inc()
            await respond(send, status, oip.error_body(str(exc)))
            return
        except Exception as exc:
            m.requests.labels("500").inc()
            log.exception("v2 infer failed: %s", exc)
            await respond(send, 500, oip.error_body(f"internal error: {type(exc).__name__}: {exc}"))
            return
        served_ok.inc()
        m.latency.observe(time.perf_counter() - t0)
        if head_len is None:
            await respond(send, 200, out)
        else:
            await respond(send, 200, out, b"application/octet-stream",
                          ((b"inference-header-content-length", b"%d" % head_len),))

    async def front(scope: Scope, receive: Receive, send: Send) -> bool:
        headers = _headers(scope)
        path = scope["path"]
        refused = guard(path, headers)
        if refused is not None:
            status, message = refused
            if status in (403, 413):
                m.requests.labels(str(status)).inc()
            key = "error" if path.startswith("/v2") else "detail"  # each protocol's own error document
            await respond(send, status, orjson.dumps({key: message}))
            return True
        if path == "/v1/predict":
            if scope["method"] != "POST":
                await respond(send, 405, b'{"detail":"Method Not Allowed"}', extra=((b"allow", b"POST"),))
            else:
                inflight[0] += 1
                try:
                    await predict_v1(scope, headers, receive, send)
                finally:
                    inflight[0] -= 1
            return True
        if path.startswith("/v2/models/") and path.endswith("/infer"):
            parts = path[len("/v2/models/") : -len("/infer")].split("/")
            if len(parts) == 1 or (len(parts) == 3 and parts[1] == "versions"):
                if scope["method"] != "POST":
                    await respond(send, 405, oip.error_body("Method Not Allowed"), extra=((b"allow", b"POST"),))
                else:
                    inflight[0] += 1
                    try:
                        await infer_v2(scope, headers, receive, send, parts[0],
                                       parts[2] if len(parts) == 3 else None)
                    finally:
                        inflight[0] -= 1
                return True
        return False

    app.front = front

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
        # the version manager's switch: under the update lock, ends a watch, blocks the version left and pins the
        # versions it left, with an event, with or without an updater
        from edgeadapt.device.version_manager import RollbackRefused

        if daemon.version_manager is None:
            raise HTTPException(409, "no writable state directory: no versions on disk")
        try:
            return daemon.version_manager.switch_by_hand(req.to)
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
        """Liveness (it answers) with what part of the job fails now: ``status`` is ``degraded`` with reasons
        (each with since-when and a count under ``degraded``), and whether it can serve predictions (``ready``)."""
        degraded = daemon.degraded()
        not_ready = daemon.not_ready()
        return {"ok": True, "status": "not ready" if not_ready else "degraded" if degraded else "ok",
                "ready": not_ready is None, "not_ready": not_ready, "param_version": daemon.engine.param_version,
                "reasons": {k: v["reason"] for k, v in degraded.items()}, "degraded": degraded}

    @app.get("/livez")
    def livez():
        """Liveness for an orchestrator: the process answers (restart it when this fails)."""
        return {"ok": True}

    @app.get("/readyz")
    def readyz():
        """Readiness: 200 when predictions can be served (engine built, batch worker running), else 503 with why
        (take it out of the load balancer; a degraded device is still ready)."""
        why = daemon.not_ready()
        if why is not None:
            return JSONResponse({"ready": False, "reason": why}, status_code=503)
        return {"ready": True}

    @app.get("/metrics")
    def metrics():
        daemon.status()  # refresh gauges
        return Response(daemon.metrics.render(), media_type="text/plain; version=0.0.4")

    # -- the Open Inference Protocol's documents (the infer route is in front) ------------------------------
    def _model_or_404(name: str, version: str | None) -> JSONResponse | None:
        if name != model_name or version not in (None, model_version):
            what = f"'{name[:100]}'" + (f" version {version[:20]}" if version else "")
            return JSONResponse({"error": f"Request for unknown model: {what} is not found"}, status_code=404)
        return None

    def _ready() -> bool:
        return daemon.batcher.alive

    @app.get("/v2", summary="Open Inference Protocol: server metadata")
    def v2_server():
        from edgeadapt import __version__

        return oip.server_metadata(__version__)

    @app.get("/v2/health/live", summary="Open Inference Protocol: liveness")
    def v2_live():
        return Response(status_code=200)

    @app.get("/v2/health/ready", summary="Open Inference Protocol: readiness (the batch worker runs)")
    def v2_ready():
        return Response(status_code=200 if _ready() else 503)

    @app.get("/v2/models/{name}", summary="Open Inference Protocol: model metadata")
    def v2_model(name: str):
        return _model_or_404(name, None) or oip.model_metadata(manifest)

    @app.get("/v2/models/{name}/versions/{version}", summary="Open Inference Protocol: model metadata")
    def v2_model_version(name: str, version: str):
        return _model_or_404(name, version) or oip.model_metadata(manifest)

    @app.get("/v2/models/{name}/ready", summary="Open Inference Protocol: model readiness")
    def v2_model_ready(name: str):
        return _model_or_404(name, None) or Response(status_code=200 if _ready() else 503)

    @app.get("/v2/models/{name}/versions/{version}/ready", summary="Open Inference Protocol: model readiness")
    def v2_model_version_ready(name: str, version: str):
        return _model_or_404(name, version) or Response(status_code=200 if _ready() else 503)

    @app.get("/v2/models/{name}/config", summary="Triton's model configuration extension")
    def v2_model_config(name: str):
        return _model_or_404(name, None) or oip.model_config(manifest, cfg.max_request_samples, cfg.max_batch,
                                                             cfg.max_wait_ms, cfg.method, cfg.threads)

    def openapi() -> dict:
        # the hot routes are answered in front of FastAPI's router: their descriptions are added here
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            js = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(js.pop("$defs", {}))
            comps["PredictRequest"] = js
            comps["InferRequest"] = _infer_request_schema()
            paths = schema.setdefault("paths", {})
            paths.update(_hot_paths())
            for path, item in paths.items():  # the one model served, by name and version
                if path.startswith("/v2/models/{name}"):
                    for op in item.values():
                        for p in op.get("parameters", []):
                            if p.get("in") == "path" and p.get("name") in ("name", "version"):
                                p["schema"] = {"type": "string", "enum": [
                                    model_name if p["name"] == "name" else model_version]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def _error_responses(key: str) -> dict:
    err = {"application/json": {"schema": {"type": "object", "properties": {key: {"type": "string"}}}}}
    return {str(code): {"description": what, "content": err} for code, what in (
        (400, "the input does not match the model's input spec"), (413, "too large"),
        (415, "unsupported content type"), (422, "malformed request"))}


def _infer_request_schema() -> dict:
    """The v2 inference request (JSON part), as far as this model takes it."""
    return {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
            "type": "object", "required": ["name", "shape", "datatype"], "properties": {
                "name": {"type": "string", "enum": [oip.INPUT_NAME]},
                "shape": {"type": "array", "maxItems": 8, "items": {"type": "integer", "minimum": 0}},
                "datatype": {"type": "string", "enum": [*oip.DATATYPES, "BYTES"]},
                "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer",
                                                                                     "minimum": 0}}},
                "data": {"type": "array", "items": {"type": "number"}}}}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "enum": list(oip.OUTPUTS)},
            "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}}}}}}


def _infer_op(versioned: bool) -> dict:
    params = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    if versioned:
        params.append({"name": "version", "in": "path", "required": True, "schema": {"type": "string"}})
    params.append({"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                   "description": "binary tensor extension: bytes of JSON before the tensors' raw data",
                   "schema": {"type": "integer", "minimum": 0}})
    ok = {"application/json": {"schema": {"type": "object"}},
          "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    return {"post": {
        "summary": "Open Inference Protocol: infer (JSON tensors, or the binary tensor extension)",
        "operationId": "v2_infer" + ("_version" if versioned else ""),
        "parameters": params,
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {"200": {"description": "outputs", "content": ok}, "404": {"description": "unknown model"},
                      **_error_responses("error")}}}


def _hot_paths() -> dict:
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {"/v2/models/{name}/infer": _infer_op(False), "/v2/models/{name}/versions/{version}/infer": _infer_op(True),
            "/v1/predict": {"post": {
        "summary": "Predict a batch (JSON: inputs or base64 array; binary .npy / raw bytes; image files)",
        "operationId": "predict_v1_predict_post",
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
            "application/x-npy": binary, "application/octet-stream": binary,
            "image/jpeg": binary, "image/png": binary, "image/webp": binary,
            "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {
                "type": "array", "items": {"type": "string", "format": "binary"}}}, "required": ["file"]}}}},
        "parameters": [
            {"name": "top_k", "in": "query", "required": False, "description": "binary bodies: top classes to list",
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
            {"name": "probs", "in": "query", "required": False,
             "description": "binary bodies: return the full probability vector", "schema": {"type": "boolean"}},
            {"name": "X-Dtype", "in": "header", "required": False, "description": "octet-stream bodies",
             "schema": {"type": "string", "enum": sorted(ALLOWED)}},
            {"name": "X-Shape", "in": "header", "required": False,
             "description": "octet-stream bodies: comma-separated dimensions", "schema": {"type": "string"}}],
        "responses": {"200": {"description": "predictions", "content": {"application/json": {"schema": {
            "type": "object"}}}}, **_error_responses("detail")}}}}
