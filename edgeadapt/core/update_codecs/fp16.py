"""``fp16``: Δ in float16, half the bytes of ``fp32`` at float16's relative precision on the change only."""

from __future__ import annotations

import numpy as np

from edgeadapt.core.tensorfile import ParamSet
from edgeadapt.core.update_codecs.base import Arrays, Codec, Entries, concat


class Fp16Codec(Codec):
    name = "fp16"
    parts = {"delta": "float16"}

    def encode_delta(self, names: list[str], base: ParamSet, deltas: list[np.ndarray], entries: Entries,
                     opts: dict) -> Arrays:
        return {"delta": concat(deltas, "float32").astype(np.float16)}

    def delta_shapes(self, entries: Entries, sizes: list[int]) -> dict[str, tuple[int, ...]]:
        return {"delta": (sum(sizes),)}

    def decode_delta(self, entries: Entries, sizes: list[int], offsets: np.ndarray, arrays: Arrays) -> np.ndarray:
        return arrays["delta"].astype(np.float32)
