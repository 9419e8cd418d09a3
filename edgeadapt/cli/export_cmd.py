"""`edgeadapt export`."""

from __future__ import annotations


def export() -> None:
    """Not implemented yet."""
    raise SystemExit("edgeadapt export: not implemented yet")
