"""``int8``: Δ quantized symmetric per tensor, ``q = round(Δ / s)`` with ``s = max|Δ| / 127`` (nothing clips)."""

from __future__ import annotations

import numpy as np

from edgeadapt.core.tensorfile import ParamSet
from edgeadapt.core.update_codecs.base import Arrays, Codec, Entries, concat, quantize


class Int8Codec(Codec):
    name = "int8"
    parts = {"q": "int8", "scale": "float32"}

    def steps(self, names: list[str], base: ParamSet, deltas: list[np.ndarray], opts: dict) -> np.ndarray:
        """One quantization step per tensor (float32)."""
        return np.array([np.abs(d).max() / 127.0 if d.size else 0.0 for d in deltas], np.float32)

    def encode_delta(self, names: list[str], base: ParamSet, deltas: list[np.ndarray], entries: Entries,
                     opts: dict) -> Arrays:
        scales = self.steps(names, base, deltas, opts)
        return {"q": concat(quantize(deltas, scales, 127), "int8"), "scale": scales}

    def delta_shapes(self, entries: Entries, sizes: list[int]) -> dict[str, tuple[int, ...]]:
        return {"q": (sum(sizes),), "scale": (len(entries),)}

    def decode_delta(self, entries: Entries, sizes: list[int], offsets: np.ndarray, arrays: Arrays) -> np.ndarray:
        scale = np.repeat(arrays["scale"].astype(np.float32), sizes)
        return arrays["q"].astype(np.float32) * scale
