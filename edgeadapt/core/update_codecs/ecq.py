"""``ecq``: entropy-coded quantization. int8 codes decoded exactly like ``int8``, but the step comes from the
tensor's RMS delta, not its maximum: ``s = rms(Δ) / k`` (never below ``max|Δ| / 127``, so nothing clips).

1-D tensors (normalization scale/shift and statistics: few values, each one matters) use ``k = vector_k`` (24);
matrices use ``k = matrix_k · sqrt(max(1, small_n / n))`` (1, 1024): a tensor's total effect on the output does
not grow with its size, so each value of a small matrix (an adapter's up-projection) gets a finer step. The codes
concentrate on a few small integers, which zstd's entropy coder packs to 2-3 bits each on adapter updates.
"""

from __future__ import annotations

import math

import numpy as np

from edgeadapt.core.tensorfile import ParamSet
from edgeadapt.core.update_codecs.int8 import Int8Codec


def ecq_step(delta: np.ndarray, k: float) -> float:
    """rms(Δ)/k, but never so small that the largest |Δ| would be clipped at code 127."""
    if not delta.size:
        return 0.0
    rms = float(np.sqrt(np.mean(np.square(delta, dtype=np.float64))))
    return max(rms / k, float(np.abs(delta).max()) / 127.0)


class EcqCodec(Int8Codec):
    name = "ecq"

    def steps(self, names: list[str], base: ParamSet, deltas: list[np.ndarray], opts: dict) -> np.ndarray:
        vector_k, matrix_k = float(opts.get("vector_k", 24.0)), float(opts.get("matrix_k", 1.0))
        small_n = int(opts.get("small_n", 1024))
        if not (0 < vector_k <= 127 and 0 < matrix_k <= 127 and small_n >= 0):
            raise ValueError(f"vector_k and matrix_k must be in (0, 127] and small_n >= 0, not {vector_k}, "
                             f"{matrix_k}, {small_n}")
        ks = [vector_k if base[n].ndim <= 1 else matrix_k * math.sqrt(max(1.0, small_n / max(base[n].size, 1)))
              for n in names]
        return np.array([ecq_step(d, k) for d, k in zip(deltas, ks, strict=True)], np.float32)
