"""``fp32``: the raw float32 target values. The one lossless mode, and the fallback when a delta does not pay."""

from __future__ import annotations

import math

import numpy as np

from edgeadapt.core.tensorfile import ParamSet
from edgeadapt.core.update_codecs.base import Arrays, Codec, Entries, concat, tensor_offsets


class Fp32Codec(Codec):
    name = "fp32"
    parts = {"value": "float32"}
    lossless = True

    def encode(self, names: list[str], base: ParamSet, target: ParamSet, opts: dict) -> tuple[Arrays, Entries]:
        entries = [{"name": n, "shape": list(base[n].shape), "dtype": "float32", "encoding": self.name}
                   for n in names]
        return {"value": concat([target[n].reshape(-1) for n in names], "float32")}, entries

    def delta_shapes(self, entries: Entries, sizes: list[int]) -> dict[str, tuple[int, ...]]:
        return {"value": (sum(sizes),)}

    def decode(self, entries: Entries, base: ParamSet, arrays: Arrays) -> ParamSet:
        """The target itself: the base is not used."""
        offsets = tensor_offsets([math.prod(e["shape"]) for e in entries])
        return {e["name"]: arrays["value"][offsets[i] : offsets[i + 1]].astype(np.float32).reshape(e["shape"])
                for i, e in enumerate(entries)}
