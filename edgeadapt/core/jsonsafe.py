"""Make any status or event document serializable as strict JSON. Torch-free.

A status page must answer whatever its documents hold: one NaN entropy in an update event made
``/v1/status`` answer 500 (Starlette's JSON encoder refuses NaN), hiding the very problem it should show.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

_MAX_DEPTH = 32


def json_safe(obj: Any, _depth: int = 0) -> Any:
    """A copy of ``obj`` that strict JSON can encode: NaN and ±Inf become None, numpy scalars and arrays become
    Python numbers and lists, mapping keys strings, sets sorted lists; anything else its ``str()`` (cut to
    500 characters), and nesting beyond 32 levels the string "..."."""
    if _depth > _MAX_DEPTH:
        return "..."
    if obj is None or isinstance(obj, (bool, str, int)) and not isinstance(obj, np.generic):
        return obj
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist(), _depth + 1)
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, _depth + 1) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [json_safe(v, _depth + 1) for v in sorted(obj, key=repr)]
    return str(obj)[:500]
