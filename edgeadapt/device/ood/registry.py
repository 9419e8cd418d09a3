"""Name -> detector class registry. Detector modules register themselves on import
(``edgeadapt.device.ood`` imports all of them)."""

from __future__ import annotations

from typing import TypeVar

from edgeadapt.device.ood.base import OODDetector

_REGISTRY: dict[str, type[OODDetector]] = {}

T = TypeVar("T", bound=type[OODDetector])


def register(cls: T) -> T:
    """Class decorator: add a detector class under its ``name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"OOD detector name {name!r} already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def get_detector(name: str) -> type[OODDetector]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown OOD detector {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def all_detectors() -> dict[str, type[OODDetector]]:
    """A copy of the registry, name -> class, in registration order."""
    return dict(_REGISTRY)
