"""``ternary``: sparse ternary (ComPEFT). The top ``density`` fraction of |Δ| per tensor kept as sign × one scale
per tensor (the mean |Δ| of the kept entries): a packed bitmask of the kept entries + their packed signs."""

from __future__ import annotations

import numpy as np

from edgeadapt.core.update_codecs.base import Arrays, Entries, SparseCodec, pack_bits, unpack_bits


class TernaryCodec(SparseCodec):
    name = "ternary"
    parts = {"mask": "uint8", "sign": "uint8", "scale": "float32"}

    def encode_kept(self, deltas: list[np.ndarray], masks: list[np.ndarray], mask_all: np.ndarray,
                    kept: np.ndarray) -> Arrays:
        scales = np.array([np.abs(d[m]).mean() if m.any() else 0.0 for d, m in zip(deltas, masks, strict=True)],
                          np.float32)
        return {"mask": pack_bits(mask_all), "sign": pack_bits(kept < 0), "scale": scales}

    def sparse_shapes(self, entries: Entries, n: int, nnz: int) -> dict[str, tuple[int, ...]]:
        return {"mask": ((n + 7) // 8,), "sign": ((nnz + 7) // 8,), "scale": (len(entries),)}

    def kept_values(self, entries: Entries, mask: np.ndarray, arrays: Arrays) -> np.ndarray:
        signs = unpack_bits(arrays["sign"], int(mask.sum()))
        per_entry_scale = np.repeat(arrays["scale"].astype(np.float32), [e["nnz"] for e in entries])
        return np.where(signs, -per_entry_scale, per_entry_scale).astype(np.float32)
