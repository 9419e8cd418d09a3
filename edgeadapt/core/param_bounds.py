"""Value bounds for adaptable tensors: what a signed update may set them to (DESIGN §15). Torch-free.

A signature says who made an update, not that it is sane: a compromised trainer or an operator's mistake can
sign ``running_var = -1`` or a weight x1e30, which are finite, pass every structural check and turn every
prediction into NaN. So each tensor of a new parameter set is checked against its kind (the bundle manifest's
``adaptable`` list) and against the bundle's own value of it (version 0):

- every value finite;
- variances (``norm_stats`` tensors named ``*running_var``, or any ``*running_var`` when the kind is unknown)
  strictly positive and at most ``MAX_VARIANCE``: a BatchNorm divides by sqrt(var + eps), and a negative
  variance is NaN;
- the tensor's RMS and its largest |value| each at most ``factor`` x the bundle's (default 100) plus an
  absolute ``floor`` (default 10).

Why 100x: adaptation moves these tensors by small factors (fine-tuned scales and shifts, statistics
re-estimated under a corruption), so two orders of magnitude leave every plausible update through and stop
the ones that can only be an attack or a bug (x1e30, or a variance turned negative).

Why a floor: a tensor whose bundle value is zero or near it (an adapter's up-projection starts at exactly 0;
the test bundle's BatchNorm shifts have an RMS of 0.01-0.05) has no scale to be relative to, and its first
trained values must pass. These tensors act on normalized activations of unit scale, where values up to ~10
are numerically harmless (whether they are any good is the watch's question: a version with shifts of RMS 3
is rolled back by it, test_update_loop), while what breaks a network is orders of magnitude beyond that. A
false rejection is not free either: a device that refuses a real update never improves.

Shrinking is not bounded: a smaller scale or variance cannot make outputs non-finite (BatchNorm's eps bounds
the division), and the watch catches a version that is merely worse.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

DEFAULT_FACTOR = 100.0
DEFAULT_FLOOR = 10.0
MAX_VARIANCE = 1e8  # activations are normalized inputs: a variance this large is never a real statistic


def is_variance(name: str, kind: str | None) -> bool:
    """A BatchNorm variance: must stay strictly positive."""
    return name.endswith("running_var") and kind in (None, "norm_stats")


def violation(params: Mapping[str, np.ndarray], kinds: Mapping[str, str] | None = None,
              reference: Mapping[str, np.ndarray] | None = None, factor: float = DEFAULT_FACTOR,
              floor: float = DEFAULT_FLOOR) -> str | None:
    """The first bound a parameter set breaks, as a reason naming the tensor; None when all hold.

    ``kinds``: tensor name -> manifest kind (norm_affine / norm_stats / adapter); ``reference``: the bundle's
    version-0 values, for the relative bounds (skipped for a tensor it does not hold)."""
    kinds = kinds or {}
    for name in sorted(params):
        arr = np.asarray(params[name])
        if arr.dtype.kind != "f":
            return f"tensor {name}: dtype {arr.dtype}, not floating point"
        a = arr.astype(np.float64, copy=False).reshape(-1)
        if not np.all(np.isfinite(a)):
            return f"tensor {name}: non-finite values"
        if not a.size:
            continue
        kind = kinds.get(name)
        if is_variance(name, kind):
            lo, hi = float(a.min()), float(a.max())
            if lo <= 0:
                return f"tensor {name} ({kind or 'variance'}): variance {lo:.4g} is not > 0"
            if hi > MAX_VARIANCE:
                return f"tensor {name} ({kind or 'variance'}): variance {hi:.4g} exceeds {MAX_VARIANCE:.0e}"
        if reference is None or name not in reference:
            continue
        ref = np.asarray(reference[name], np.float64).reshape(-1)
        if ref.shape != a.shape:
            return f"tensor {name}: shape {list(np.shape(arr))} differs from the bundle's {list(np.shape(reference[name]))}"
        rms, ref_rms = float(np.sqrt(np.mean(a * a))), float(np.sqrt(np.mean(ref * ref)))
        amax, ref_amax = float(np.abs(a).max()), float(np.abs(ref).max())
        if rms > factor * ref_rms + floor:
            return (f"tensor {name} ({kind or 'unknown kind'}): RMS {rms:.4g} exceeds {factor:g}x the bundle's "
                    f"{ref_rms:.4g} + {floor:g}")
        if amax > factor * ref_amax + floor:
            return (f"tensor {name} ({kind or 'unknown kind'}): max |value| {amax:.4g} exceeds {factor:g}x the "
                    f"bundle's {ref_amax:.4g} + {floor:g}")
    return None
