"""The bundle's input contract as code: the one place that validates an input, normalizes it for the graphs
and encodes it for upload. Both sides use it (device: numpy; cloud: the same arrays under ``torch.from_numpy``).

Why one codec: every part that used to do its own ``/ 255`` or shape check was a place where a hostile or merely
unusual input could slip past the others. An input that passes ``validate`` is, by construction, inside the
bundle's declared value range, so nothing a client sends can push the adaptation statistics somewhere no real
image could (DESIGN.md §11, §15).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from edgeadapt.core.bundle import InputSpec

RangePolicy = Literal["reject", "clip"]
RANGE_POLICIES: tuple[str, ...] = ("reject", "clip")
#: float inputs this close outside the declared range (as a fraction of its width) are float rounding of a
#: client's own preprocessing, not hostile: they are clipped under either policy
RANGE_TOLERANCE = 1e-3
#: dtypes a client may send; uint8 is the quantized form (``value = q * uint8_scale``), floats are in value units
CLIENT_DTYPES = ("uint8", "float16", "float32", "float64")
#: dtypes an upload to the cloud may carry (a device quantizes to uint8; float16 for ranges uint8 cannot hold)
UPLOAD_DTYPES = ("uint8", "float16")


class InputError(ValueError):
    """An input does not match the bundle's input spec (shape, dtype, finiteness, value range)."""


class InputCodec:
    """Validate / normalize / quantize inputs as the bundle's :class:`InputSpec` says."""

    def __init__(self, spec: InputSpec, range_policy: RangePolicy = "reject"):
        if range_policy not in RANGE_POLICIES:
            raise ValueError(f"range policy {range_policy!r}: use one of {RANGE_POLICIES}")
        self.spec = spec
        self.range_policy = range_policy
        self.shape = tuple(int(d) for d in spec.shape)
        self.sample_elems = math.prod(self.shape)
        lo, hi = (float(v) for v in spec.value_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"input value_range {spec.value_range} must be finite with low < high")
        self.low, self.high = lo, hi
        slack = RANGE_TOLERANCE * (hi - lo)
        self._lo_ok, self._hi_ok = lo - slack, hi + slack
        c = self.shape[0] if self.shape else 1
        mean = np.asarray(spec.mean, np.float32).reshape(-1)
        std = np.asarray(spec.std, np.float32).reshape(-1)
        if mean.size not in (1, c) or std.size not in (1, c) or not np.all(std > 0):
            raise ValueError(f"input mean/std must have 1 or {c} positive-std entries")
        bshape = (1, -1, *([1] * (len(self.shape) - 1)))
        self._mean = mean.reshape(bshape)
        self._std = std.reshape(bshape)
        self._uint8_scale = float(spec.uint8_scale)

    # -- sizes ---------------------------------------------------------------------------------------
    def sample_bytes(self, dtype: str = "uint8") -> int:
        """Bytes of one sample in ``dtype``: the base of every size limit (uploads, request bodies)."""
        return self.sample_elems * np.dtype(dtype).itemsize

    @property
    def max_upload_sample_bytes(self) -> int:
        """The largest upload sample the contract allows (float16, the widest upload dtype)."""
        return self.sample_bytes("float16")

    # -- validation ------------------------------------------------------------------------------------
    def as_batch(self, x: np.ndarray) -> np.ndarray:
        """[*shape] or [N, *shape] -> [N, *shape], or InputError naming what was expected."""
        if x.ndim == len(self.shape):
            x = x[None]
        if x.ndim != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            dims = ", ".join(map(str, self.shape))
            raise InputError(f"input has shape {list(x.shape)}, expected [N, {dims}] or [{dims}]")
        if x.shape[0] == 0:
            raise InputError("empty batch")
        return x

    def validate(self, x: np.ndarray) -> np.ndarray:
        """The input boundary: shape, dtype, finiteness and the declared value range. Returns uint8 unchanged
        (it is in range by construction) or float32 (clipped when the policy says so)."""
        return self.check(x)[0]

    def check(self, x: np.ndarray) -> tuple[np.ndarray, bool]:
        """``validate``, and whether values beyond the rounding tolerance were clipped (``clip`` policy): such an
        input is served but must not adapt anything, since no real image of this model looks like it."""
        x = self.as_batch(np.asarray(x))
        if x.dtype == np.uint8:
            return x, False
        if x.dtype.kind in "iub":
            raise InputError(f"input dtype {x.dtype} not supported: send uint8 (quantized) or float "
                             f"(values in {self.low:g}..{self.high:g})")
        if x.dtype.kind != "f":
            raise InputError(f"input dtype {x.dtype} not supported: send uint8 or float32/float16")
        x = x.astype(np.float32, copy=False)
        lo, hi = float(x.min()), float(x.max())  # NaN propagates through min/max; one pass each
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise InputError("input contains NaN or Inf")
        if lo >= self.low and hi <= self.high:
            return x, False
        beyond = lo < self._lo_ok or hi > self._hi_ok
        if self.range_policy == "reject" and beyond:
            raise InputError(f"input values span {lo:.6g}..{hi:.6g}, outside the model's declared range "
                             f"{self.low:g}..{self.high:g} (send values in range, or uint8)")
        return np.clip(x, self.low, self.high), beyond

    # -- conversion -----------------------------------------------------------------------------------
    def to_values(self, x: np.ndarray) -> np.ndarray:
        """Validated input -> float32 in value units (uint8 dequantized)."""
        if x.dtype == np.uint8:
            out = x.astype(np.float32)
            out *= self._uint8_scale
            return out
        return x.astype(np.float32, copy=False)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Validated input -> normalized float32, as the graphs (and the torch model) expect."""
        scale = (self._uint8_scale if x.dtype == np.uint8 else 1.0) / self._std  # one multiply-add per value
        out = x.astype(np.float32)
        out *= scale
        out -= self._mean / self._std
        return out

    def to_upload(self, x: np.ndarray) -> np.ndarray:
        """One validated sample (or batch) -> the form uploads carry: uint8 when the range fits the uint8
        scale, else float16 values."""
        if x.dtype == np.uint8:
            return x
        inv = 1.0 / self._uint8_scale
        if abs(inv - round(inv)) < 1e-6:
            inv = float(round(inv))  # 1/(1/255) is 255 up to rounding; multiply as the client's x*255 did
        if self.low >= 0 and self.high * inv <= 255.0 + 1e-6:
            return np.clip(np.rint(x * np.float32(inv)), 0, 255).astype(np.uint8)
        return x.astype(np.float16)

    def check_upload(self, x: np.ndarray) -> np.ndarray:
        """An uploaded sample on the cloud: its shape, dtype and range under the same contract (always
        ``reject``: a device that uploads out-of-range data is refused, not silently repaired)."""
        if tuple(x.shape) != self.shape:
            raise InputError(f"input shape {list(x.shape)}, the model takes {list(self.shape)}")
        if str(x.dtype) not in UPLOAD_DTYPES:
            raise InputError(f"upload dtype {x.dtype} not allowed; use one of {UPLOAD_DTYPES}")
        if x.dtype == np.uint8:
            return x
        v = x.astype(np.float32)
        lo, hi = float(v.min()), float(v.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise InputError("input has non-finite values")
        if lo < self._lo_ok or hi > self._hi_ok:
            raise InputError(f"input values span {lo:.6g}..{hi:.6g}, outside the model's declared range "
                             f"{self.low:g}..{self.high:g}")
        return x
