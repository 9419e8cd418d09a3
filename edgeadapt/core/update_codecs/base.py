"""What an update-package codec is: the payload parts it writes, how it encodes Δ and how the device decodes it.

A codec sees every tensor of a package at once: each payload part is one array, the concatenation over all
tensors in header order (sorted names); tensor boundaries come from the header's shapes (and ``nnz`` counts for
the sparse codecs). One safetensors entry per tensor would cost ~70 bytes of header per tensor, more than a small
model's whole update. The cloud builds a package by encoding and then decoding it itself (the hash the device
checks is that reconstruction's), so ``decode`` is the one numpy code path both sides run: bit-identical.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from edgeadapt.core.tensorfile import ParamSet

#: header ``tensors`` entries as the package carries them: {name, shape, dtype, encoding[, nnz]}
Entries = list[dict]
Arrays = dict[str, np.ndarray]


class CodecRejected(Exception):
    """A payload this codec cannot decode honestly (bad code, counts that disagree with the header): the package
    layer turns it into an ``UpdateRejected`` with the same reason."""


class Codec:
    """One compression mode. Subclasses set ``name`` and ``parts`` and implement ``encode_delta``,
    ``delta_shapes`` and ``decode_delta`` (Δ = target − base), or override ``encode``/``decode`` whole when the
    mode does not carry a delta (``fp32``)."""

    name: ClassVar[str]
    #: payload array name -> numpy dtype name, the parts a package of this mode holds (no more, no fewer)
    parts: ClassVar[dict[str, str]]
    #: the device reconstructs the target exactly (``target.lossless`` in the header)
    lossless: ClassVar[bool] = False

    # ------------------------------------------------------------------------------------------- cloud
    def encode(self, names: list[str], base: ParamSet, target: ParamSet, opts: dict) -> tuple[Arrays, Entries]:
        """-> (payload arrays, header tensor entries). ``base``/``target`` are contiguous float32 by name."""
        entries = [{"name": n, "shape": list(base[n].shape), "dtype": "float32", "encoding": self.name}
                   for n in names]
        deltas = [(target[n] - base[n]).reshape(-1).astype(np.float32) for n in names]
        return self.encode_delta(names, base, deltas, entries, opts), entries

    def encode_delta(self, names: list[str], base: ParamSet, deltas: list[np.ndarray], entries: Entries,
                     opts: dict) -> Arrays:
        """Per-tensor flat float32 deltas -> payload arrays; may add fields (``nnz``) to ``entries``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- device
    def part_shapes(self, entries: Entries) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Payload array name -> (dtype, shape) a header's tensor list implies: checked before decoding, and
        the decompression cap is derived from it."""
        sizes = [math.prod(e["shape"]) for e in entries]  # Python ints: no int64 overflow
        shapes = self.delta_shapes(entries, sizes)
        return {k: (self.parts[k], shp) for k, shp in shapes.items()}

    def delta_shapes(self, entries: Entries, sizes: list[int]) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def decode(self, entries: Entries, base: ParamSet, arrays: Arrays) -> ParamSet:
        """The reconstruction ``base + Δ`` in float32, by tensor name. Raises CodecRejected."""
        sizes = [math.prod(e["shape"]) for e in entries]
        offsets = tensor_offsets(sizes)
        delta = self.decode_delta(entries, sizes, offsets, arrays)
        out: ParamSet = {}
        for i, e in enumerate(entries):
            b = np.asarray(base[e["name"]], np.float32).reshape(-1)
            out[e["name"]] = (b + delta[offsets[i] : offsets[i + 1]]).reshape(e["shape"])
        return out

    def decode_delta(self, entries: Entries, sizes: list[int], offsets: np.ndarray, arrays: Arrays) -> np.ndarray:
        """Payload arrays -> Δ for all tensors, one flat float32 array."""
        raise NotImplementedError


def tensor_offsets(sizes: list[int]) -> np.ndarray:
    """Where each tensor starts in the concatenated parts (and, last, their total)."""
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)


def concat(parts: list[np.ndarray], dtype: str) -> np.ndarray:
    """The concatenation of per-tensor arrays; an empty array of ``dtype`` for a package with no tensors."""
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def quantize(deltas: list[np.ndarray], scales: np.ndarray, limit: int) -> list[np.ndarray]:
    """Symmetric integer codes ``round(Δ / s)`` clipped to ±``limit``; all zero for a tensor with step 0."""
    return [np.zeros(d.size, np.int8) if sc == 0 else np.clip(np.rint(d / sc), -limit, limit).astype(np.int8)
            for d, sc in zip(deltas, scales, strict=True)]


def pack_bits(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask.astype(np.uint8), bitorder="little")


def unpack_bits(packed: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(packed, count=n, bitorder="little").astype(bool)


class SparseCodec(Codec):
    """A codec that keeps some entries per tensor (a packed bitmask of them over all tensors) and carries
    ``nnz`` per tensor in the header, so every part's size is known before decompression."""

    def encode_delta(self, names: list[str], base: ParamSet, deltas: list[np.ndarray], entries: Entries,
                     opts: dict) -> Arrays:
        density = float(opts.get("density", DEFAULT_DENSITY))
        threshold = opts.get("threshold")
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], not {density}")
        masks = [topk_mask(np.abs(d), density, None if threshold is None else float(threshold)) for d in deltas]
        for e, m in zip(entries, masks, strict=True):
            e["nnz"] = int(m.sum())
        mask_all = concat(masks, "bool")
        return self.encode_kept(deltas, masks, mask_all, concat(deltas, "float32")[mask_all])

    def encode_kept(self, deltas: list[np.ndarray], masks: list[np.ndarray], mask_all: np.ndarray,
                    kept: np.ndarray) -> Arrays:
        """The parts for the kept entries: ``masks`` per tensor, ``mask_all`` their concatenation, ``kept`` the
        kept deltas in that order."""
        raise NotImplementedError

    def delta_shapes(self, entries: Entries, sizes: list[int]) -> dict[str, tuple[int, ...]]:
        nnz = 0
        for e, size in zip(entries, sizes, strict=True):
            k = e.get("nnz")
            if type(k) is not int or not 0 <= k <= size:
                raise CodecRejected(f"tensor {e['name']}: bad nnz {k!r}")
            nnz += k
        return self.sparse_shapes(entries, sum(sizes), nnz)

    def sparse_shapes(self, entries: Entries, n: int, nnz: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def decode_delta(self, entries: Entries, sizes: list[int], offsets: np.ndarray, arrays: Arrays) -> np.ndarray:
        n = int(offsets[-1])
        mask = unpack_bits(arrays["mask"], n)
        for i, e in enumerate(entries):
            got = int(mask[offsets[i] : offsets[i + 1]].sum())
            if got != e["nnz"]:
                raise CodecRejected(f"tensor {e['name']}: bitmask has {got} entries, header says {e['nnz']}")
        delta = np.zeros(n, np.float32)
        delta[mask] = self.kept_values(entries, mask, arrays)
        return delta

    def kept_values(self, entries: Entries, mask: np.ndarray, arrays: Arrays) -> np.ndarray:
        """Δ of the kept entries, in mask order."""
        raise NotImplementedError


DEFAULT_DENSITY = 0.10


def topk_mask(absd: np.ndarray, density: float, threshold: float | None) -> np.ndarray:
    """The entries a sparse codec keeps: |Δ| > ``threshold`` when given, else the top ``density`` fraction
    (at least one), never an unchanged entry."""
    if threshold is not None:
        return absd > threshold
    n = absd.size
    k = min(n, max(1, int(math.ceil(density * n)))) if n else 0
    mask = np.zeros(n, dtype=bool)
    if k == 0:
        return mask
    if k < n:
        idx = np.argpartition(-absd, k - 1)[:k]
    else:
        idx = np.arange(n)
    mask[idx] = True
    mask &= absd > 0  # never "keep" an unchanged entry
    return mask
