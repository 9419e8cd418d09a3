"""Forward-only test-time adaptation methods for the device (numpy only).

Build one with ``build_method("ema_stats+lame_guard", ctx)``; see ``base.AdaptationMethod`` for the hooks.
"""

from edgeadapt.device.methods import (  # noqa: F401  (importing fills the registry)
    collapse_reset,
    ema_stats,
    feature_shift,
    guard,
    lame,
    lame_skew,
    none,
    norm_stats,
    prior_correction,
    robust_bn,
    robust_stats,
    t3a,
)
from edgeadapt.device.methods.base import AdaptationMethod, AdaptContext, BatchInfo
from edgeadapt.device.methods.composite import CompositeMethod
from edgeadapt.device.methods.registry import available, build_method, get_method, parse_spec, register

__all__ = [
    "AdaptContext",
    "AdaptationMethod",
    "BatchInfo",
    "CompositeMethod",
    "available",
    "build_method",
    "get_method",
    "parse_spec",
    "register",
]
