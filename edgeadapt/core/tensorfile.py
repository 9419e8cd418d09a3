"""Safetensors I/O and a canonical hash of a parameter set (what update packages name as their base)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from safetensors.numpy import load, load_file, save, save_file

ParamSet = dict[str, np.ndarray]


def save_params(params: ParamSet, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, str(path), metadata=metadata)


def load_params(path: str | Path) -> ParamSet:
    return dict(load_file(str(path)))


def params_to_bytes(params: ParamSet) -> bytes:
    return save({k: np.ascontiguousarray(v) for k, v in sorted(params.items())})


def params_from_bytes(data: bytes) -> ParamSet:
    return dict(load(data))


def params_hash(params: ParamSet) -> str:
    """sha256 over names, dtypes, shapes and float32 bytes in sorted order (independent of file layout)."""
    h = hashlib.sha256()
    for name in sorted(params):
        arr = np.ascontiguousarray(params[name], dtype=np.float32)
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
