"""Update packages: a signed, compressed delta between two parameter sets (DESIGN §8). Torch-free; both sides.

File layout (integers big-endian)::

    b"EAUP1\\n" | u32 header length | header | u64 payload length | payload | 64-byte ed25519 signature

The signature covers every byte before it and is checked before anything else is parsed. The header is JSON
(utf-8), stored zstd-compressed when that is smaller (readers accept both; ``read_header`` returns the dict):
format, model, base {version, params_hash}, target {version, params_hash, exact_hash, lossless},
compression, mode_opts, tensors [{name, shape, dtype, encoding, nnz}], payload {codec, raw_bytes}, created.
The payload is zstd-compressed safetensors (never pickle) with one array per part (``value``, ``delta``,
``q``, ``scale``, ``mask``, ``sign``, ``values``), each the concatenation over all tensors in header order.

Compression modes (Δ = target − base, per tensor), one codec each in ``core.update_codecs`` (its parts, encode,
decode), looked up by the header's ``compression``:

- ``fp32``: the raw float32 target values (lossless).
- ``fp16``: Δ in float16.
- ``int8``: Δ quantized symmetric per tensor: ``q = round(Δ / s)``, ``s = max|Δ| / 127``.
- ``int4``: the same with 4-bit codes (``s = max|Δ| / 7``, or the ``clip`` quantile of |Δ| instead of the
  max), two codes per byte: for updates of thousands of parameters (adapters), ~9x at ~0.2 points.
- ``ecq``: entropy-coded quantization. int8 codes as in ``int8``, but the step comes from the tensor's RMS
  delta, not its maximum: ``s = rms(Δ) / k`` (never below ``max|Δ| / 127``, so nothing clips). 1-D tensors
  (normalization scale/shift and statistics: few values, each one matters) use ``k = vector_k`` (24);
  matrices use ``k = matrix_k · sqrt(max(1, small_n / n))`` (1, 1024): a tensor's total effect on the output
  does not grow with its size, so each value of a small matrix (an adapter's up-projection) matters more and
  gets a finer step. The codes concentrate on a few small integers, which zstd's entropy coder packs to 2-3
  bits each on adapter updates. The device decodes it exactly like ``int8``.
- ``ternary``: sparse ternary (ComPEFT): the top ``density`` fraction of |Δ| per tensor kept as sign × one
  scale per tensor (the mean |Δ| of the kept entries): a packed bitmask of kept entries + packed signs.
- ``bitmask_fp16``: (AMS) a packed bitmask of the changed entries (the top ``density`` fraction of |Δ| per
  tensor, or all entries with |Δ| > ``threshold`` when given) + their Δ in float16.

The device reconstructs ``base + decode(Δ)`` in float32 (the same numpy code on both sides, so the result is
bit-identical); ``target.params_hash`` is the hash of that reconstruction, which the cloud computes by applying
its own package, so the device verifies every mode. ``target.exact_hash`` is the hash of the uncompressed
target (equal to ``params_hash`` for ``fp32``). Sizes are bounded before decompression (header ≤ 4 MiB,
payload ≤ the size the header's tensor list implies, no decompression bombs). The header is data from the
link: every field is type-checked strictly (a version is a JSON integer, not ``0.9``; a dimension is an
integer, sizes are Python ints, so ``[2**70]`` cannot overflow), and whatever a malformed header makes the
parser raise (deep nesting: RecursionError) is an ``UpdateRejected``. The reconstructed parameters must also
be plausible (``param_bounds``: variances > 0, each tensor within 100x of the bundle's + 10) before they are used.
"""

from __future__ import annotations

import io
import json
import math
import struct
import time
from dataclasses import dataclass

import numpy as np
import zstandard
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from edgeadapt.core import param_bounds, signing, update_codecs
from edgeadapt.core.tensorfile import ParamSet, params_hash
from edgeadapt.core.update_codecs import CodecRejected

MAGIC = b"EAUP1\n"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
FORMAT_VERSION = 1
CODECS = update_codecs.REGISTRY
MODES = update_codecs.modes()  # ("fp32", "fp16", "int8", "int4", "ecq", "ternary", "bitmask_fp16")
LOSSLESS_MODES = tuple(m for m, c in CODECS.items() if c.lossless)
SIG_BYTES = 64
MAX_HEADER_BYTES = 4 << 20
MAX_PAYLOAD_BYTES = 512 << 20
MAX_DECOMPRESSED_BYTES = 1 << 30
MAX_TENSORS = 100_000
MAX_TENSOR_ELEMENTS = 1 << 28
MAX_VERSION = 2**62  # as in core.wire: versions are SQLite INTEGERs on the cloud
DEFAULT_DENSITY = update_codecs.DEFAULT_DENSITY


class UpdateRejected(Exception):
    """A package the device must not apply; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class BuiltPackage:
    data: bytes
    header: dict
    params: ParamSet  # what the device reconstructs (== target for fp32)

    @property
    def size(self) -> int:
        return len(self.data)


# --------------------------------------------------------------------------------------------- encoding
# One codec per mode (``core.update_codecs``): its payload parts, how it encodes Δ and how the device decodes it.
# The payload holds one array per part, each the concatenation over all tensors in header order (sorted names).


def _encode(names: list[str], base: ParamSet, target: ParamSet, mode: str, opts: dict) -> tuple[dict, list[dict]]:
    """-> (payload arrays, header tensor entries)."""
    if mode not in CODECS:
        raise ValueError(f"unknown compression mode {mode!r}; use one of {MODES}")
    return CODECS[mode].encode(names, base, target, opts)


def _expected_parts(mode: str, entries: list[dict]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Payload array name -> (dtype, shape) for a header's tensor list."""
    try:
        return CODECS[mode].part_shapes(entries)
    except CodecRejected as exc:
        raise UpdateRejected(str(exc)) from exc


def _decode(mode: str, entries: list[dict], base: ParamSet, arrays: dict[str, np.ndarray]) -> ParamSet:
    try:
        return CODECS[mode].decode(entries, base, arrays)
    except CodecRejected as exc:
        raise UpdateRejected(str(exc)) from exc


# --------------------------------------------------------------------------------------------- building
def _check_param_sets(base: ParamSet, target: ParamSet) -> None:
    if set(base) != set(target):
        missing, extra = sorted(set(base) - set(target)), sorted(set(target) - set(base))
        raise ValueError(f"base and target name different tensors (only in base: {missing[:5]}, only in target: "
                         f"{extra[:5]})")
    for name in base:
        if tuple(base[name].shape) != tuple(target[name].shape):
            raise ValueError(f"{name}: base shape {list(base[name].shape)} != target shape {list(target[name].shape)}")
        if not np.all(np.isfinite(target[name])):
            raise ValueError(f"{name}: target has non-finite values")


def _frame(header: dict, payload: bytes, private_key) -> bytes:
    hjson = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    zh = zstandard.ZstdCompressor(level=19).compress(hjson)
    hbytes = zh if len(zh) < len(hjson) else hjson  # the reader accepts both
    body = MAGIC + struct.pack(">I", len(hbytes)) + hbytes + struct.pack(">Q", len(payload)) + payload
    return body + signing.sign(private_key, body)


def build_package_full(model: str, base_version: int, base_params: ParamSet, target_version: int,
                       target_params: ParamSet, mode: str, private_key, **mode_opts) -> BuiltPackage:
    """Build a signed package and also return its header and the parameters the device will reconstruct."""
    if mode not in MODES:
        raise ValueError(f"unknown compression mode {mode!r}; use one of {MODES}")
    if int(target_version) <= int(base_version):
        raise ValueError(f"target version {target_version} must be newer than base version {base_version}")
    _check_param_sets(base_params, target_params)
    names = sorted(base_params)
    base = {n: np.ascontiguousarray(base_params[n], dtype=np.float32) for n in names}
    target = {n: np.ascontiguousarray(target_params[n], dtype=np.float32) for n in names}
    arrays, entries = _encode(names, base, target, mode, mode_opts)
    recon = _decode(mode, entries, base, arrays)
    raw = st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    payload = zstandard.ZstdCompressor(level=int(mode_opts.get("zstd_level", 19))).compress(raw)
    header = {
        "format": FORMAT_VERSION,
        "model": model,
        "base": {"version": int(base_version), "params_hash": params_hash(base)},
        "target": {"version": int(target_version), "params_hash": params_hash(recon),
                   "exact_hash": params_hash(target), "lossless": mode in LOSSLESS_MODES},
        "compression": mode,
        "mode_opts": {k: v for k, v in sorted(mode_opts.items()) if k != "zstd_level"},
        "tensors": entries,
        "payload": {"codec": "zstd+safetensors", "raw_bytes": len(raw)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return BuiltPackage(_frame(header, payload, private_key), header, recon)


def build_package(model: str, base_version: int, base_params: ParamSet, target_version: int, target_params: ParamSet,
                  mode: str, private_key, **mode_opts) -> bytes:
    """The package file bytes (see the module doc). ``mode_opts``: ``density`` (ternary, bitmask_fp16; default
    0.1), ``threshold`` (keep |Δ| > threshold instead of the top ``density``), ``clip`` (int4), ``zstd_level``."""
    return build_package_full(model, base_version, base_params, target_version, target_params, mode, private_key,
                              **mode_opts).data


# --------------------------------------------------------------------------------------------- reading
def split_package(data: bytes) -> tuple[bytes, bytes, bytes]:
    """-> (header bytes, payload, signature); raises UpdateRejected on bad framing."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UpdateRejected("package must be bytes")
    data = bytes(data)
    if len(data) < len(MAGIC) + 4 or data[: len(MAGIC)] != MAGIC:
        raise UpdateRejected("bad magic: not an edgeadapt update package")
    pos = len(MAGIC)
    (hlen,) = struct.unpack(">I", data[pos : pos + 4])
    pos += 4
    if hlen > MAX_HEADER_BYTES:
        raise UpdateRejected(f"header of {hlen} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    if len(data) < pos + hlen + 8:
        raise UpdateRejected("truncated package (header)")
    hjson = data[pos : pos + hlen]
    pos += hlen
    (plen,) = struct.unpack(">Q", data[pos : pos + 8])
    pos += 8
    if plen > MAX_PAYLOAD_BYTES:
        raise UpdateRejected(f"payload of {plen} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")
    if len(data) < pos + plen + SIG_BYTES:
        raise UpdateRejected("truncated package (payload or signature)")
    if len(data) != pos + plen + SIG_BYTES:
        raise UpdateRejected("trailing bytes after the signature")
    return hjson, data[pos : pos + plen], data[pos + plen :]


def _parse_header(hbytes: bytes) -> dict:
    """Header bytes (JSON, or zstd-compressed JSON) -> dict; anything malformed is an UpdateRejected."""
    if len(hbytes) > MAX_HEADER_BYTES:
        raise UpdateRejected(f"header of {len(hbytes)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    if hbytes[:4] == ZSTD_MAGIC:
        hbytes = _decompress(hbytes, MAX_HEADER_BYTES, what="header")
    try:
        header = json.loads(hbytes)
    # ValueError: JSON and utf-8 errors, int literals past Python's digit limit; RecursionError: deep nesting
    except (ValueError, RecursionError) as exc:
        raise UpdateRejected(f"header is not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(header, dict):
        raise UpdateRejected("header is not a JSON object")
    return header


def read_header(data: bytes) -> dict:
    """The header, parsed but NOT verified (for display only)."""
    hbytes, _, _ = split_package(data)
    return _parse_header(hbytes)


def _decompress(payload: bytes, cap: int, what: str = "payload") -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload))
    out = bytearray()
    try:
        while True:
            chunk = reader.read(1 << 16)
            if not chunk:
                break
            out += chunk
            if len(out) > cap:
                raise UpdateRejected(f"{what} decompresses to more than {cap} bytes (decompression bomb?)")
    except zstandard.ZstdError as exc:
        raise UpdateRejected(f"{what} does not decompress: {exc}") from exc
    return bytes(out)


def _is_int(v: object) -> bool:
    """A JSON integer: not a float (``0.9`` is not version 0), not a bool (``true`` is not 1)."""
    return type(v) is int


def _validate_header(header: dict) -> None:
    """Strict types and sizes for every field the device uses; raises UpdateRejected naming the field."""
    if not isinstance(header, dict):
        raise UpdateRejected("header is not a JSON object")
    fmt = header.get("format")
    if not _is_int(fmt) or fmt != FORMAT_VERSION:
        raise UpdateRejected(f"unsupported package format {str(fmt)[:50]!r}")
    if not isinstance(header.get("model"), str):
        raise UpdateRejected("malformed header: model is not a string")
    for part in ("base", "target"):
        sec = header.get(part)
        if not isinstance(sec, dict):
            raise UpdateRejected(f"malformed header: {part} is not an object")
        v = sec.get("version")
        if not _is_int(v) or not 0 <= v <= MAX_VERSION:
            raise UpdateRejected(f"malformed header: {part}.version {str(v)[:50]!r} is not an integer in "
                                 f"0..{MAX_VERSION}")
        if not isinstance(sec.get("params_hash"), str):
            raise UpdateRejected(f"malformed header: {part}.params_hash is not a string")
    mode, tensors = header.get("compression"), header.get("tensors")
    if not isinstance(mode, str) or mode not in MODES:
        raise UpdateRejected(f"unknown compression {str(mode)[:50]!r}")
    if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
        raise UpdateRejected("malformed header: bad tensor list")
    total = 0
    for t in tensors:
        if not (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("shape"), list)
                and len(t["shape"]) <= 8 and all(_is_int(d) and 0 <= d <= MAX_TENSOR_ELEMENTS for d in t["shape"])
                and t.get("dtype") == "float32"):
            raise UpdateRejected(f"malformed tensor entry {str(t)[:200]}")
        if t.get("encoding") != mode:
            raise UpdateRejected(f"tensor {t['name'][:100]}: encoding {str(t.get('encoding'))[:50]!r} differs "
                                 f"from {mode!r}")
        size = math.prod(t["shape"])  # Python ints: [2**70] cannot overflow into a small number
        if size > MAX_TENSOR_ELEMENTS:
            raise UpdateRejected(f"tensor {t['name'][:100]}: {size} elements exceeds {MAX_TENSOR_ELEMENTS}")
        total += size
    if total > MAX_TENSOR_ELEMENTS:
        raise UpdateRejected(f"malformed header: {total} elements in all exceeds {MAX_TENSOR_ELEMENTS}")


def verify_and_apply(data: bytes, public_key, model: str, base_version: int, base_params: ParamSet,
                     reference: ParamSet | None = None,
                     kinds: dict[str, str] | None = None) -> tuple[int, ParamSet, dict]:
    """Verify a package against the device's current state and reconstruct the new parameters.

    ``public_key``: an Ed25519PublicKey, 32 raw bytes or the manifest's base64 string. ``reference``: the
    bundle's version-0 parameters and ``kinds`` the manifest's tensor kinds, for the value bounds
    (``param_bounds``; without a reference only finiteness and positive variances are checked). Returns
    ``(target_version, new_params, header)``; raises ``UpdateRejected(reason)``. Nothing is applied here: the
    caller swaps the returned dict in."""
    try:
        return _verify_and_apply(data, public_key, model, base_version, base_params, reference, kinds)
    except UpdateRejected:
        raise
    # a check above missed a malformed field: still a rejection with its reason, never an escape from the
    # updater's rejection path (where it would go unrecorded and be retried every poll)
    except (KeyError, IndexError, TypeError, ValueError, OverflowError, RecursionError, MemoryError) as exc:
        raise UpdateRejected(f"malformed package: {type(exc).__name__}: {str(exc)[:200]}") from exc


def _verify_and_apply(data: bytes, public_key, model: str, base_version: int, base_params: ParamSet,
                      reference: ParamSet | None, kinds: dict[str, str] | None) -> tuple[int, ParamSet, dict]:
    if public_key is None:
        raise UpdateRejected("no cloud public key configured: cannot verify the update")
    try:
        key = signing.load_public_key(public_key)
    except (signing.SigningKeyError, ValueError) as exc:
        raise UpdateRejected(f"invalid public key: {exc}") from exc
    hbytes, payload, sig = split_package(data)
    if not signing.verify(key, sig, bytes(data[: len(data) - SIG_BYTES])):
        raise UpdateRejected("bad signature")
    header = _parse_header(hbytes)
    _validate_header(header)
    if header["model"] != model:
        raise UpdateRejected(f"wrong model: package is for {header.get('model')!r}, this device runs {model!r}")
    hb, ht = header["base"], header["target"]
    if hb["version"] != int(base_version):
        raise UpdateRejected(f"base version mismatch: package is against version {hb['version']}, device has "
                             f"{base_version}")
    if ht["version"] <= int(base_version):
        raise UpdateRejected(f"downgrade: target version {ht['version']} is not newer than {base_version}")
    entries = header["tensors"]
    names = [t["name"] for t in entries]
    if len(set(names)) != len(names) or set(names) != set(base_params) or names != sorted(names):
        raise UpdateRejected("tensor set mismatch between package and device parameters")
    for t in entries:
        if tuple(t["shape"]) != tuple(np.shape(base_params[t["name"]])):
            raise UpdateRejected(f"shape mismatch for {t['name']}: package {t['shape']}, device "
                                 f"{list(np.shape(base_params[t['name']]))}")
    if hb["params_hash"] != params_hash(base_params):
        raise UpdateRejected("base params hash mismatch: the device's parameters are not the package's base")
    mode = header["compression"]
    expected = _expected_parts(mode, entries)
    cap = sum(math.prod(s) * np.dtype(d).itemsize for d, s in expected.values())
    cap = min(MAX_DECOMPRESSED_BYTES, cap + 1024)
    raw = _decompress(payload, cap)
    try:
        arrays = st_load(raw)
    except Exception as exc:  # safetensors raises its own error types
        raise UpdateRejected(f"payload is not valid safetensors: {exc}") from exc
    if set(arrays) != set(expected):
        raise UpdateRejected("payload arrays do not match the header's tensor list")
    for k, (dt, shape) in expected.items():
        if str(arrays[k].dtype) != dt or tuple(arrays[k].shape) != shape:
            raise UpdateRejected(f"payload array {k}: {arrays[k].dtype}{list(arrays[k].shape)}, expected "
                                 f"{dt}{list(shape)}")
        if arrays[k].dtype.kind == "f" and not np.all(np.isfinite(arrays[k])):
            raise UpdateRejected(f"non-finite values in the payload ({k})")
    new_params = _decode(mode, entries, base_params, arrays)
    for name, arr in new_params.items():
        if not np.all(np.isfinite(arr)):
            raise UpdateRejected(f"non-finite values in reconstructed {name}")
    if params_hash(new_params) != ht["params_hash"]:
        raise UpdateRejected("target params hash mismatch after reconstruction")
    problem = param_bounds.violation(new_params, kinds, reference)
    if problem is not None:
        raise UpdateRejected(f"implausible values: {problem}")
    return ht["version"], new_params, header


def raw_fp32_bytes(params: ParamSet) -> int:
    """Size of the parameter set as raw float32 (the reference for compression ratios)."""
    return int(sum(np.asarray(v).size * 4 for v in params.values()))
