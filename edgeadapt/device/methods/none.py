"""``none``: the source model, unchanged."""

from __future__ import annotations

from edgeadapt.device.methods.base import AdaptationMethod
from edgeadapt.device.methods.registry import register


@register
class NoAdaptation(AdaptationMethod):
    name = "none"
