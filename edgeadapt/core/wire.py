"""Wire schemas of the device <-> cloud protocol (JSON over HTTP). Defined once, used by both sides.

Arrays travel as base64 of their raw little-endian bytes with an explicit dtype and shape, so no side
ever unpickles anything.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from edgeadapt.core.safetext import MAX_NAME_CHARS, MAX_STATUS_CHARS, clean_text

MAX_SAMPLES_PER_BATCH = 512
MAX_BODY_BYTES = 16 * 1024 * 1024
ALLOWED_INPUT_DTYPES = ("uint8", "float16")
MAX_VERSION = 2**62  # versions are SQLite INTEGERs (64-bit): a larger number would be a 500, not a 422
MAX_PROBLEMS = 16  # degraded reasons a heartbeat carries at most (each cleaned and capped like ``status``)
MAX_SIGNATURE_DIM = 256  # numbers a domain signature carries at most
MAX_SIGNATURE_ABS = 1e4  # |value| above this is no normalization shift a working device reports
#: how an uploaded sample's bytes are packed (core/upload_encoding.py): raw array bytes or an image file
WireEncoding = Literal["raw", "png", "jpeg", "webp"]


class WireArray(BaseModel):
    dtype: Literal["uint8", "float16", "float32"]
    shape: list[int] = Field(max_length=8)
    data: str = Field(description="base64 of the raw little-endian bytes, or of an image file (``encoding``)")
    encoding: WireEncoding = Field("raw", description="raw, or the image format of ``data`` (uint8 samples of 1 or "
                                   "3 channels; decoded by core/upload_encoding.py)")

    @classmethod
    def from_numpy(cls, arr: np.ndarray) -> WireArray:
        arr = np.ascontiguousarray(arr)
        return cls(dtype=str(arr.dtype), shape=list(arr.shape), data=base64.b64encode(arr.tobytes()).decode())

    def to_numpy(self, max_bytes: int) -> np.ndarray:
        """The array, refused before decoding when it is larger than ``max_bytes`` (the receiver derives that
        from the bundle's input spec: ``InputCodec.max_upload_sample_bytes``). Raw arrays only: an image-encoded
        sample is decoded by ``core.upload_encoding.decode_upload``."""
        if self.encoding != "raw":
            raise ValueError(f"a {self.encoding}-encoded array is decoded with its input spec (decode_upload)")
        if any(d < 0 for d in self.shape):
            raise ValueError("negative dimension")
        dtype = np.dtype(self.dtype).newbyteorder("<")
        n = math.prod(self.shape)  # Python ints: a hostile shape cannot overflow into a small product
        if n * dtype.itemsize > max_bytes:
            raise ValueError(f"array of {n * dtype.itemsize} bytes exceeds the {max_bytes}-byte limit")
        raw = base64.b64decode(self.data, validate=True)
        if len(raw) != n * dtype.itemsize:
            raise ValueError(f"data has {len(raw)} bytes, shape {self.shape} x {self.dtype} needs {n * dtype.itemsize}")
        return np.frombuffer(raw, dtype=dtype).reshape(self.shape).astype(dtype.newbyteorder("="))


class UploadSample(BaseModel):
    id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    input: WireArray
    logits: list[float] = Field(max_length=4096)
    entropy: float
    ood_score: float = 0.0
    novel: bool = Field(False, description="flagged out-of-distribution: not adaptation data")
    param_version: int = Field(0, ge=0, le=MAX_VERSION)

    @field_validator("input")
    @classmethod
    def _input_dtype(cls, v: WireArray) -> WireArray:
        if v.dtype not in ALLOWED_INPUT_DTYPES:
            raise ValueError(f"input dtype must be one of {ALLOWED_INPUT_DTYPES}")
        return v


class SampleBatch(BaseModel):
    model: str
    samples: list[UploadSample] = Field(min_length=1, max_length=MAX_SAMPLES_PER_BATCH)


class SampleBatchResult(BaseModel):
    accepted: int
    duplicates: int
    ids: list[str]


class DomainSignature(BaseModel):
    """A device's current domain in a few dozen numbers (core/domain_signature.py), with the mean prediction
    entropy of its recent batches (an accuracy proxy: ``cloud groups`` shows it per group)."""

    scheme: str = Field(max_length=32, pattern=r"^[A-Za-z0-9_.\-]+$")
    values: list[float] = Field(min_length=1, max_length=MAX_SIGNATURE_DIM)
    entropy: float | None = Field(None, ge=0, le=1e3, description="mean prediction entropy (nats), recent batches")

    @field_validator("values")
    @classmethod
    def _finite(cls, v: list[float]) -> list[float]:
        if not all(math.isfinite(x) and abs(x) <= MAX_SIGNATURE_ABS for x in v):
            raise ValueError(f"signature values must be finite and at most {MAX_SIGNATURE_ABS:g} in magnitude")
        return v

    @field_validator("entropy")
    @classmethod
    def _finite_entropy(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("entropy must be finite")
        return v


class Heartbeat(BaseModel):
    model: str = Field(max_length=256)
    param_version: int = Field(ge=0, le=MAX_VERSION)
    counters: dict[str, float] = Field(default_factory=dict)
    status: str = "ok"
    problems: dict[str, str] = Field(default_factory=dict, description="the device's degraded reasons, by key "
                                     f"(at most {MAX_PROBLEMS}; short printable strings)")
    signature: DomainSignature | None = Field(None, description="the device's current domain (the cloud groups "
                                              "devices by it)")

    @field_validator("problems")
    @classmethod
    def _printable_problems(cls, v: dict[str, str]) -> dict[str, str]:
        """What ``cloud devices`` prints per device: bounded in number and length, control characters stripped."""
        return {clean_text(k, MAX_NAME_CHARS): clean_text(x, MAX_STATUS_CHARS)
                for k, x in list(v.items())[:MAX_PROBLEMS]}

    @field_validator("status")
    @classmethod
    def _printable_status(cls, v: str) -> str:
        """Printed in the admin's terminal: control characters stripped, length capped (core/safetext.py)."""
        return clean_text(v, MAX_STATUS_CHARS)

    @field_validator("counters")
    @classmethod
    def _printable_counter_names(cls, v: dict[str, float]) -> dict[str, float]:
        return {clean_text(k, MAX_NAME_CHARS): x for k, x in list(v.items())[:256]}


def upload_body_bytes(model: str, sample: np.ndarray, num_classes: int) -> int:
    """Bytes of a one-sample ``POST /v1/samples`` body (as the uploader builds it) for ``sample`` in its upload form
    (``InputCodec.to_upload``): what a cloud's ``max_body_bytes`` must hold for this bundle's uploads to get in.
    Logits are written at full float precision (their longest JSON form)."""
    s = UploadSample(id="0" * 32, input=WireArray.from_numpy(sample), logits=[-1.2345678901234567e-05] * num_classes,
                     entropy=1.2345678901234567, ood_score=-1.2345678901234567, novel=False, param_version=MAX_VERSION)
    head = b'{"model":' + json.dumps(model).encode() + b',"samples":['
    return len(head) + len(s.model_dump_json().encode()) + 2


class UpdateInfo(BaseModel):
    model: str
    version: int
    base_version: int
    mode: str
    size: int
