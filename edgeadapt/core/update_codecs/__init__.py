"""The update-package compression modes, one codec each, by the name a package header's ``compression`` gives.

A new mode is one file here with a ``Codec`` subclass and one line in ``_CODECS``; ``core.update_package`` frames,
signs, bounds and verifies whatever a registered codec writes, and knows no mode by name.
"""

from __future__ import annotations

from edgeadapt.core.update_codecs.base import DEFAULT_DENSITY, Codec, CodecRejected
from edgeadapt.core.update_codecs.bitmask_fp16 import BitmaskFp16Codec
from edgeadapt.core.update_codecs.ecq import EcqCodec
from edgeadapt.core.update_codecs.fp16 import Fp16Codec
from edgeadapt.core.update_codecs.fp32 import Fp32Codec
from edgeadapt.core.update_codecs.int4 import Int4Codec
from edgeadapt.core.update_codecs.int8 import Int8Codec
from edgeadapt.core.update_codecs.ternary import TernaryCodec

#: in the order ``MODES`` has always listed them (the CLI's choices and the benchmarks' rows follow it)
_CODECS: tuple[Codec, ...] = (Fp32Codec(), Fp16Codec(), Int8Codec(), Int4Codec(), EcqCodec(), TernaryCodec(),
                              BitmaskFp16Codec())
REGISTRY: dict[str, Codec] = {c.name: c for c in _CODECS}


def codec(mode: str) -> Codec:
    """The codec for ``mode``; KeyError for a mode no codec is registered under."""
    return REGISTRY[mode]


def modes() -> tuple[str, ...]:
    return tuple(REGISTRY)


__all__ = ["DEFAULT_DENSITY", "REGISTRY", "Codec", "CodecRejected", "codec", "modes"]
