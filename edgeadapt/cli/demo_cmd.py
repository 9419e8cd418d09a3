"""`edgeadapt demo`."""

from __future__ import annotations


def demo() -> None:
    """Not implemented yet."""
    raise SystemExit("edgeadapt demo: not implemented yet")
