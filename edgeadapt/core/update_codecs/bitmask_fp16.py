"""``bitmask_fp16`` (AMS): a packed bitmask of the changed entries (the top ``density`` fraction of |Δ| per
tensor, or every entry with |Δ| > ``threshold`` when given) + their Δ in float16."""

from __future__ import annotations

import numpy as np

from edgeadapt.core.update_codecs.base import Arrays, Entries, SparseCodec, pack_bits


class BitmaskFp16Codec(SparseCodec):
    name = "bitmask_fp16"
    parts = {"mask": "uint8", "values": "float16"}

    def encode_kept(self, deltas: list[np.ndarray], masks: list[np.ndarray], mask_all: np.ndarray,
                    kept: np.ndarray) -> Arrays:
        return {"mask": pack_bits(mask_all), "values": kept.astype(np.float16)}

    def sparse_shapes(self, entries: Entries, n: int, nnz: int) -> dict[str, tuple[int, ...]]:
        return {"mask": ((n + 7) // 8,), "values": (nnz,)}

    def kept_values(self, entries: Entries, mask: np.ndarray, arrays: Arrays) -> np.ndarray:
        return arrays["values"].astype(np.float32)
