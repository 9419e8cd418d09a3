"""Upload encodings: how a device packs a sample's uint8 pixels for the cloud (raw, PNG, or lossy JPEG/WebP).

Why: a 3×224×224 sample is 150,528 raw bytes (200 KB as base64 JSON); PNG keeps it exact at a fraction of that
for natural images, JPEG/WebP trade a little fidelity for a large cut (docs/BENCHMARKS.md, "Upload encodings").
The encoding is chosen per deployment (the device config's ``upload_encoding``) and written on every sample
(``WireArray.encoding``), so the cloud decodes each sample by what it says and a fleet may mix encodings.

Defined once here and used by both sides: the device's daemon encodes (``UploadEncoder``), the cloud's ingest
decodes (``decode_upload``). Rules that keep the size limits derived from the input spec:

- only uint8 samples of 1 or 3 channels are images; anything else (float16 uploads, other channel counts)
  travels raw, and the encoder says so (``UploadEncoder.effective``);
- a sample whose encoded form is not smaller than its raw bytes travels raw: an encoded sample is never larger
  than the spec's uint8 sample, so the cloud refuses any larger one before it decodes a byte;
- the cloud reads the image header first and refuses a file whose format, size or colour mode is not exactly
  the declared sample's (a decompression bomb declares a huge size) before any pixel is decoded.
"""

from __future__ import annotations

import base64
import io
import warnings
from dataclasses import dataclass
from typing import get_args

import numpy as np

from edgeadapt.core.input_codec import InputCodec, InputError
from edgeadapt.core.wire import WireArray, WireEncoding

#: the encodings a sample may carry on the wire (``WireArray.encoding``) and the Pillow format behind each
ENCODINGS: tuple[str, ...] = get_args(WireEncoding)
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
LOSSY = ("jpeg", "webp")
#: chosen by bytes vs loop accuracy (docs/BENCHMARKS.md, "Upload encodings (issue 15)"): lossless, so the cloud
#: trains on exactly what the device saw (loop accuracy = raw's by construction), with 1.8x fewer bytes than raw
#: on FMNIST-C (fewer than jpeg:90 there) and 8.8x on a smooth RGB 224 stream; jpeg:90 is the choice for large
#: RGB inputs when its small loss is acceptable (4x fewer bytes than PNG there, a tenth of the encode time)
DEFAULT_UPLOAD_ENCODING = "png"


@dataclass(frozen=True)
class UploadEncoding:
    """One parsed ``upload_encoding`` setting: ``raw``, ``png``, ``jpeg:Q`` or ``webp:Q`` (Q = quality 1..100)."""

    kind: str
    quality: int | None = None

    @classmethod
    def parse(cls, text: str) -> UploadEncoding:
        name, _, q = str(text).strip().lower().partition(":")
        if name not in ENCODINGS:
            raise ValueError(f"upload encoding {text!r}: use raw, png, jpeg:QUALITY or webp:QUALITY")
        if name in LOSSY:
            if not q:
                raise ValueError(f"upload encoding {text!r}: a lossy encoding needs its quality, e.g. {name}:90")
            try:
                quality = int(q)
            except ValueError:
                raise ValueError(f"upload encoding {text!r}: quality must be a whole number 1..100") from None
            if not 1 <= quality <= 100:
                raise ValueError(f"upload encoding {text!r}: quality must be 1..100")
            return cls(name, quality)
        if q:
            raise ValueError(f"upload encoding {text!r}: {name} takes no quality")
        return cls(name)

    def __str__(self) -> str:
        return f"{self.kind}:{self.quality}" if self.quality is not None else self.kind


def image_axes(codec: InputCodec) -> tuple[int, bool] | None:
    """(channels, channels_first) of the spec's sample when it is an image of 1 or 3 channels, else None."""
    shape, layout = codec.shape, codec.spec.layout.upper()
    if len(shape) != 3:
        return None
    if layout in ("NCHW", "CHW"):
        c, first = shape[0], True
    elif layout in ("NHWC", "HWC"):
        c, first = shape[2], False
    else:
        return None
    return (c, first) if c in (1, 3) else None


def _hw(codec: InputCodec, first: bool) -> tuple[int, int]:
    return (codec.shape[1], codec.shape[2]) if first else (codec.shape[0], codec.shape[1])


class UploadEncoder:
    """The device side: a validated upload sample (``InputCodec.to_upload``) -> the ``WireArray`` it travels as."""

    def __init__(self, codec: InputCodec, encoding: str | UploadEncoding = DEFAULT_UPLOAD_ENCODING):
        self.codec = codec
        self.encoding = encoding if isinstance(encoding, UploadEncoding) else UploadEncoding.parse(encoding)
        self.axes = image_axes(codec)
        self.raw_bytes = codec.sample_bytes("uint8")
        self.why_raw = ""
        if self.encoding.kind != "raw":
            if self.axes is None:
                self.why_raw = f"the input {list(codec.shape)} ({codec.spec.layout}) is not an image of 1 or 3 channels"
            elif codec.to_upload(np.full(codec.shape, codec.low, np.float32)).dtype != np.uint8:
                self.why_raw = (f"the input range {codec.low:g}..{codec.high:g} does not fit uint8, so uploads "
                                "are float16")
        self.encoded = self.raw_fallbacks = self.total_bytes = self.samples = 0

    @property
    def effective(self) -> str:
        """The encoding samples travel in (``raw`` where the configured one cannot apply: ``why_raw``)."""
        return "raw" if self.why_raw else str(self.encoding)

    @property
    def mean_bytes(self) -> float:
        """Mean payload bytes per sample so far (the raw size before any): the selector's byte budget unit."""
        return self.total_bytes / self.samples if self.samples else float(self.raw_bytes)

    def encode(self, x: np.ndarray) -> WireArray:
        data = None
        if self.encoding.kind != "raw" and not self.why_raw and x.dtype == np.uint8:
            data = self._image_bytes(x)
            if len(data) > x.nbytes - 3:  # smaller than raw, base64 and all: the cloud's limit is the raw size
                data = None
                self.raw_fallbacks += 1
        self.samples += 1
        if data is None:
            self.total_bytes += x.nbytes
            return WireArray.from_numpy(x)
        self.encoded += 1
        self.total_bytes += len(data)
        return WireArray(dtype="uint8", shape=list(x.shape), data=base64.b64encode(data).decode(),
                         encoding=self.encoding.kind)

    def _image_bytes(self, x: np.ndarray) -> bytes:
        from PIL import Image

        c, first = self.axes
        hwc = x.transpose(1, 2, 0) if first else x
        img = Image.fromarray(np.ascontiguousarray(hwc[:, :, 0] if c == 1 else hwc), "L" if c == 1 else "RGB")
        buf = io.BytesIO()
        kind, q = self.encoding.kind, self.encoding.quality
        if kind == "png":
            img.save(buf, "PNG")
        elif kind == "jpeg":
            img.save(buf, "JPEG", quality=q)
        else:
            img.save(buf, "WEBP", quality=q)
        return buf.getvalue()

    def status(self) -> dict:
        """For the device's /v1/status: what is configured, what applies, and the bytes it costs."""
        out = {"configured": str(self.encoding), "effective": self.effective, "samples": self.samples,
               "encoded": self.encoded, "raw_fallbacks": self.raw_fallbacks,
               "mean_bytes": round(self.mean_bytes, 1), "raw_bytes": self.raw_bytes}
        if self.why_raw:
            out["why_raw"] = self.why_raw
        return out


def decode_upload(codec: InputCodec, arr: WireArray) -> np.ndarray:
    """The cloud side: one uploaded sample -> its array, checked against the bundle's input contract exactly as a
    raw one is (shape, dtype, range: ``InputCodec.check_upload``). Raises ValueError (InputError), a 4xx."""
    if arr.encoding == "raw":
        return codec.check_upload(arr.to_numpy(codec.max_upload_sample_bytes))
    kind = arr.encoding
    axes = image_axes(codec)
    if axes is None:
        raise InputError(f"{kind} upload refused: this model's input {list(codec.shape)} is not an image; send raw")
    if arr.dtype != "uint8" or tuple(arr.shape) != codec.shape:
        raise InputError(f"{kind} upload declares {arr.dtype} {arr.shape}; the model takes uint8 {list(codec.shape)}")
    limit = codec.sample_bytes("uint8")  # an encoder sends raw when the image would not be smaller
    if len(arr.data) > 4 * ((limit + 2) // 3):
        raise InputError(f"{kind} upload of ~{len(arr.data) * 3 // 4} bytes exceeds the {limit}-byte limit "
                         "(the raw sample's size)")
    try:
        data = base64.b64decode(arr.data, validate=True)
    except ValueError:
        raise InputError(f"{kind} upload: data is not base64") from None
    c, first = axes
    h, w = _hw(codec, first)
    return codec.check_upload(_decode_image(data, kind, c, h, w, first))


def _decode_image(data: bytes, kind: str, c: int, h: int, w: int, first: bool) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    fmt, mode = FORMATS[kind], "L" if c == 1 else "RGB"
    file_mode = "RGB" if kind == "webp" else mode  # WebP has no grey mode: a grey sample travels as RGB
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            # the header only so far: refuse what is not the declared sample before a pixel is decoded
            if img.size != (w, h) or img.mode != file_mode:
                raise InputError(f"{kind} upload undecodable as the declared sample: the file is {img.mode} "
                                 f"{img.size[0]}x{img.size[1]}, the model takes {file_mode} {w}x{h}")
            img.load()
            if img.mode != mode:
                img = img.convert(mode)
            a = np.asarray(img, dtype=np.uint8)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{kind} upload undecodable: not a {fmt} file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{kind} upload undecodable: refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
        raise InputError(f"{kind} upload undecodable: truncated or corrupt ({str(exc)[:160]})") from None
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape != (h, w, c):
        raise InputError(f"{kind} upload undecodable: decoded to {list(a.shape)}, expected [{h}, {w}, {c}]")
    return np.ascontiguousarray(a.transpose(2, 0, 1)) if first else a
