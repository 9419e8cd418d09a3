"""Method registry and spec parsing.

A spec is ``name``, ``name:key=value,key=value`` or a composition of such parts joined by ``+``
(``"ema_stats:min_momentum=0.02+lame_guard"``). Values parse as bool (true/false), None, int, float, else string.
"""

from __future__ import annotations

from typing import Any

from edgeadapt.device.methods.base import AdaptationMethod, AdaptContext, parse_value

_REGISTRY: dict[str, type[AdaptationMethod]] = {}


def register(cls: type[AdaptationMethod]) -> type[AdaptationMethod]:
    """Class decorator: make ``cls`` buildable by its ``name``."""
    name = getattr(cls, "name", "")
    if not name or any(c in name for c in "+:,= "):
        raise ValueError(f"{cls.__name__}: invalid method name {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method name {name!r} already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[AdaptationMethod]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown adaptation method {name!r}; available: {', '.join(available())}") from None


def parse_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """``"a:x=1+b"`` -> ``[("a", {"x": 1}), ("b", {})]``."""
    if not spec or not spec.strip():
        raise ValueError("empty method spec")
    parts = []
    for part in spec.split("+"):
        part = part.strip()
        if not part:
            raise ValueError(f"method spec {spec!r}: empty part")
        name, _, rest = part.partition(":")
        opts: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"method spec {spec!r}: option {item!r} is not key=value")
            if key.strip() in opts:
                raise ValueError(f"method spec {spec!r}: option {key.strip()!r} given twice")
            opts[key.strip()] = parse_value(value)
        parts.append((name.strip(), opts))
    return parts


def build_method(spec: str, ctx: AdaptContext) -> AdaptationMethod:
    """Build a method (or a composite for ``a+b``) from a spec string."""
    parts = parse_spec(spec)
    members = [get_method(name)(ctx, **opts) for name, opts in parts]
    if len(members) == 1:
        return members[0]
    from edgeadapt.device.methods.composite import CompositeMethod

    return CompositeMethod(ctx, members=members, spec=spec.strip())
