"""The Open Inference Protocol (KServe v2, REST, as Triton serves it) on the device: request decoding, response
encoding and the metadata documents. The server (device/server.py) wires them to ``/v2``.

Why it is here: users of Triton, KServe, Seldon or OpenVINO Model Server point their clients (``tritonclient``,
``kserve``) at the device unchanged. The binary tensor extension is what makes it fast: a JSON header of
``Inference-Header-Content-Length`` bytes, then each tensor's raw bytes (``binary_data_size`` on an input,
``binary_data`` asked for on an output), so nothing is turned into lists of numbers.

The model has one input (``input``: the bundle's input spec, batch first) and these outputs: ``logits`` and
``probs`` (FP32 [N, C], after the adaptation method's output adjustment), ``class`` (INT64 [N]), ``label``
(BYTES [N]), ``ood_score`` and ``entropy`` (FP32 [N]), ``ood`` (BOOL [N]); the parameter version that answered
is the response parameter ``param_version``. An input may also be ``BYTES`` [N]: N encoded image files (JPEG,
PNG, WebP), decoded as the spec says.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from edgeadapt.core.bundle import BundleManifest
from edgeadapt.core.input_codec import InputError
from edgeadapt.device.predictions import Predictions

INPUT_NAME = "input"
#: request datatypes -> numpy (the codec takes uint8, or floats in value units)
DATATYPES: dict[str, Any] = {"UINT8": np.uint8, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
OUTPUTS: dict[str, str] = {"logits": "FP32", "probs": "FP32", "class": "INT64", "label": "BYTES",
                           "ood_score": "FP32", "ood": "BOOL", "entropy": "FP32"}
_SPEC_TO_V2 = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8", "float64": "FP64"}


class ProtocolError(InputError):
    """A v2 request that cannot be served; answered ``{"error": message}`` with ``status``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class InferRequest:
    """A decoded request: the input tensor (or the image files of a BYTES input) and what to answer."""

    array: np.ndarray | None
    files: list[bytes] | None
    outputs: list[tuple[str, bool]]  # (name, binary)
    id: str | None = None
    parameters: dict = field(default_factory=dict)


def _dims(shape: Any) -> list[int]:
    if not isinstance(shape, list) or not shape or len(shape) > 8 or \
            not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError(f"input shape must be a list of at most 8 integers, not {str(shape)[:100]}")
    if any(d < 0 for d in shape):
        raise ProtocolError(f"input shape {shape} has a negative dimension")
    return shape


def _bytes_elements(raw: memoryview, count: int) -> list[bytes]:
    """The binary form of a BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ProtocolError("BYTES tensor data ends inside an element's length prefix")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ProtocolError(f"BYTES element {len(out) + 1} declares {n} bytes; {len(raw) - pos} remain")
        out.append(bytes(raw[pos : pos + n]))
        pos += n
    if len(out) != count:
        raise ProtocolError(f"BYTES tensor holds {len(out)} elements; its shape says {count}")
    return out


def decode_request(body: bytes, header_length: str | None, max_bytes: int, json_limit: int,
                   max_files: int) -> InferRequest:
    """The body of ``POST /v2/models/{name}/infer`` (JSON, or JSON + binary tensors) -> an InferRequest."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length {header_length[:40]!r} is not an integer") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    if len(head) > json_limit:
        raise ProtocolError(f"the JSON part of an inference request is limited to {json_limit} bytes (numbers as "
                            "JSON cost about 8x their size to parse); send tensors as binary data", 413)
    try:
        req = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"inference request is not valid JSON: {exc}") from None
    if not isinstance(req, dict):
        raise ProtocolError("inference request must be a JSON object")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("request 'parameters' must be an object")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"the model takes exactly one input, {INPUT_NAME!r}: 'inputs' must list one tensor")
    t = inputs[0]
    if t.get("name") != INPUT_NAME:
        raise ProtocolError(f"unexpected inference input {str(t.get('name'))[:100]!r}: the model's input is "
                            f"{INPUT_NAME!r}")
    dtype = t.get("datatype")
    shape = _dims(t.get("shape"))
    tparams = t.get("parameters") or {}
    if not isinstance(tparams, dict):
        raise ProtocolError("input 'parameters' must be an object")
    size = tparams.get("binary_data_size")
    count = math.prod(shape)
    array = files = None
    if dtype == "BYTES":  # encoded image files
        if len(shape) != 1:
            raise ProtocolError(f"a BYTES input is a list of image files: shape [N], not {shape}")
        if count > max_files:
            raise ProtocolError(f"{count} files in one request; the limit is {max_files}", 413)
        if size is not None:
            raw = _binary(binary, size)
            files = _bytes_elements(raw, count)
            used = size
        else:
            raise ProtocolError("a BYTES input of image files must be sent as binary data (binary_data_size)")
    elif dtype in DATATYPES:
        dt = np.dtype(DATATYPES[dtype]).newbyteorder("<")
        need = count * dt.itemsize
        if need > max_bytes:
            raise ProtocolError(f"input of {need} bytes exceeds the {max_bytes}-byte limit", 413)
        if size is not None:
            raw = _binary(binary, size)
            if size != need:
                raise ProtocolError(f"binary_data_size {size}: shape {shape} of {dtype} needs {need} bytes")
            array = np.frombuffer(raw, dtype=dt).reshape(shape)
            used = size
        else:
            data = t.get("data")
            if not isinstance(data, list):
                raise ProtocolError("input has neither 'data' nor a binary_data_size parameter")
            try:
                array = np.asarray(data, dtype=np.float64 if dt.kind == "f" else np.int64)
            except (ValueError, TypeError, OverflowError) as exc:
                raise ProtocolError(f"input data is not a list of numbers: {str(exc)[:200]}") from None
            if array.size != count:
                raise ProtocolError(f"input data holds {array.size} values; shape {shape} needs {count}")
            if dt.kind == "u" and array.size and (array.min() < 0 or array.max() > 255):
                raise ProtocolError("UINT8 input values must be in 0..255")
            array = array.reshape(shape).astype(dt)
            used = 0
        if dt.itemsize > 1:
            array = array.astype(dt.newbyteorder("="))
    else:
        raise ProtocolError(f"input datatype {str(dtype)[:20]!r} not supported: use UINT8, FP16, FP32 or FP64 "
                            "(or BYTES for image files)")
    if used != len(binary):
        raise ProtocolError(f"the request carries {len(binary)} bytes of binary data; its inputs declare {used}")
    outputs = _requested(req.get("outputs"), bool(params.get("binary_data_output", False)))
    rid = req.get("id")
    return InferRequest(array, files, outputs, rid if isinstance(rid, str) else None, params)


def _binary(binary: memoryview, size: Any) -> memoryview:
    """The one input's bytes (the model has one input, so they start the binary part)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError(f"binary_data_size must be a non-negative integer, not {str(size)[:40]}")
    if size > len(binary):
        raise ProtocolError(f"binary_data_size {size} exceeds the {len(binary)} bytes of binary data sent")
    return binary[:size]


def _requested(outputs: Any, binary_default: bool) -> list[tuple[str, bool]]:
    if outputs is None:
        return [(name, binary_default) for name in OUTPUTS]
    if not isinstance(outputs, list) or not outputs:
        raise ProtocolError("'outputs' must be a non-empty list of {\"name\": ...}")
    out = []
    for o in outputs:
        if not isinstance(o, dict) or o.get("name") not in OUTPUTS:
            name = o.get("name") if isinstance(o, dict) else o
            raise ProtocolError(f"unknown output {str(name)[:100]!r}: the model's outputs are {list(OUTPUTS)}")
        p = o.get("parameters") or {}
        if not isinstance(p, dict):
            raise ProtocolError("output 'parameters' must be an object")
        if p.get("classification"):
            raise ProtocolError("the classification extension is not supported: ask for 'class' and 'probs'")
        out.append((o["name"], bool(p.get("binary_data", binary_default))))
    return out


def _tensor(name: str, preds: Predictions) -> np.ndarray | list[str]:
    if name == "label":
        return [preds.labels[c] for c in preds.pred.tolist()]
    arr = {"logits": preds.logits, "probs": preds.probs, "class": preds.pred, "ood_score": preds.ood_score,
           "ood": preds.ood, "entropy": preds.entropy}[name]
    want = {"FP32": np.float32, "INT64": np.int64, "BOOL": np.bool_}[OUTPUTS[name]]
    return np.ascontiguousarray(arr, dtype=np.dtype(want).newbyteorder("<"))


def encode_response(preds: Predictions, req: InferRequest, model_name: str, model_version: str
                    ) -> tuple[bytes, int | None]:
    """-> (body, JSON header length when binary outputs follow it, else None)."""
    outs, chunks = [], []
    for name, binary in req.outputs:
        t = _tensor(name, preds)
        shape = [len(preds)] if isinstance(t, list) else list(t.shape)
        o: dict[str, Any] = {"name": name, "datatype": OUTPUTS[name], "shape": shape}
        if binary:
            if isinstance(t, list):
                raw = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in t)
            else:
                raw = t.tobytes()
            o["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            o["data"] = t if isinstance(t, list) else t.reshape(-1)
        outs.append(o)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if req.id is not None:
        doc["id"] = req.id
    doc["parameters"] = {"param_version": preds.param_version}
    doc["outputs"] = outs
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


# -- metadata --------------------------------------------------------------------------------------
def server_metadata(version: str) -> dict:
    return {"name": "edgeadapt", "version": version, "extensions": ["binary_tensor_data", "model_configuration"]}


def _input_datatype(manifest: BundleManifest) -> str:
    return _SPEC_TO_V2.get(manifest.input.dtype, "FP32")


def _output_shapes(manifest: BundleManifest) -> dict[str, list[int]]:
    c = manifest.num_classes
    return {name: ([-1, c] if name in ("logits", "probs") else [-1]) for name in OUTPUTS}


def model_metadata(manifest: BundleManifest) -> dict:
    shapes = _output_shapes(manifest)
    return {"name": manifest.model_name, "versions": [manifest.model_version], "platform": "onnxruntime_onnx",
            "inputs": [{"name": INPUT_NAME, "datatype": _input_datatype(manifest),
                        "shape": [-1, *manifest.input.shape]}],
            "outputs": [{"name": n, "datatype": dt, "shape": shapes[n]} for n, dt in OUTPUTS.items()]}


def model_config(manifest: BundleManifest, max_request: int, max_batch: int, max_queue_delay_ms: float,
                 method: str, threads: int) -> dict:
    """Triton's model configuration (the ``model_configuration`` extension), as far as it describes this model:
    ``max_batch_size`` is the most samples one request may carry, the dynamic batcher's preferred (largest)
    batch is ``max_batch``; the engine's method and threads are parameters."""
    shapes = _output_shapes(manifest)
    return {"name": manifest.model_name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
            "max_batch_size": max_request,
            "input": [{"name": INPUT_NAME, "data_type": f"TYPE_{_input_datatype(manifest)}",
                       "dims": list(manifest.input.shape)}],
            "output": [{"name": n, "data_type": f"TYPE_{'STRING' if dt == 'BYTES' else dt}", "dims": shapes[n][1:] or [1]}
                       for n, dt in OUTPUTS.items()],
            "dynamic_batching": {"max_queue_delay_microseconds": int(max_queue_delay_ms * 1000),
                                 "preferred_batch_size": [max_batch]},
            "parameters": {"labels": {"string_value": ",".join(manifest.labels)},
                           "adaptation_method": {"string_value": method},
                           "engine_threads": {"string_value": str(threads)}}}
