"""edgeadapt: keep a deployed vision model accurate while the world drifts under it."""

__version__ = "0.1.0"
