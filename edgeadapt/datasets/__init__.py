"""Datasets for the demo and benchmarks (numpy only, no torch).

``fmnist``: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` idx files, padded 28 -> 32, and the
FMNIST-C continual stream (15 common corruptions of ``imagecorruptions-imaug``, DESIGN.md §10).
"""

from edgeadapt.datasets.fmnist import (
    CORRUPTIONS,
    DEFAULT_FMNIST_DIR,
    FMNISTMissingError,
    build_fmnist_c,
    default_cache_dir,
    fmnist_dir,
    load_fmnist,
    load_stream,
    stream_filename,
    validate_corruptions,
    write_clean,
)

__all__ = [
    "CORRUPTIONS",
    "DEFAULT_FMNIST_DIR",
    "FMNISTMissingError",
    "build_fmnist_c",
    "default_cache_dir",
    "fmnist_dir",
    "load_fmnist",
    "load_stream",
    "stream_filename",
    "validate_corruptions",
    "write_clean",
]
