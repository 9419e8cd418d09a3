"""Image files in: JPEG, PNG or WebP bytes -> the uint8 tensor the bundle's input spec describes (torch-free).

How a file becomes a tensor is the bundle's to say (``InputSpec.image_*``, DESIGN.md §11): the colour mode it is
converted to, an optional resize of the shorter side, and either a stretch or a centre crop to the spec's H×W.
The defaults reproduce what the reference model was trained on: grey, resized straight to 32×32.

Every file is hostile until decoded: the header is read first and an image of more pixels than the spec allows is
refused before a pixel is decoded (a 50 KB PNG can declare 100,000 × 100,000 pixels: a decompression bomb);
truncated and corrupt files, and formats other than the three, are refused with their own message. Pillow's own
bomb guard (``Image.MAX_IMAGE_PIXELS``) is set to the same limit behind that check.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from edgeadapt.core.bundle import InputSpec
from edgeadapt.core.input_codec import InputError

#: content types of the image bodies /v1/predict accepts, and the Pillow formats behind them
IMAGE_TYPES = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
FORMATS = ("JPEG", "PNG", "WEBP")
#: file signatures of formats that are refused by name rather than as "not an image"
_OTHER_SIGNATURES = ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
                     (b"\x00\x00\x01\x00", "ICO"), (b"%PDF", "PDF"), (b"<svg", "SVG"), (b"<?xml", "SVG/XML"))
#: the pixel limit when the spec does not give one: a 16-megapixel photo, or 64 model inputs, whichever is more
DEFAULT_MIN_PIXELS = 4096 * 4096


class ImageError(InputError):
    """An image body that cannot become an input; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImagePlan:
    """What the spec says, resolved once: output mode, H×W, layout and the steps between."""

    mode: str  # "L" or "RGB"
    height: int
    width: int
    channels_first: bool
    resize: int | None  # shorter side before a centre crop
    crop: str  # "none" (stretch to H×W) or "center"
    resample: int
    max_pixels: int


def plan_for(spec: InputSpec) -> ImagePlan | None:
    """The spec's image plan, or None when its input is not an image (not 1 or 3 channels of H×W)."""
    from PIL import Image

    shape = list(spec.shape)
    if len(shape) != 3:
        return None
    layout = spec.layout.upper()
    if layout in ("NCHW", "CHW"):
        c, h, w = shape
        first = True
    elif layout in ("NHWC", "HWC"):
        h, w, c = shape
        first = False
    else:
        return None
    if c not in (1, 3):
        return None
    mode = spec.image_mode or ("L" if c == 1 else "RGB")
    if (mode == "L") != (c == 1):
        raise ValueError(f"input image_mode {mode!r} does not fit {c} channels")
    resample = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}[spec.image_resample]
    limit = spec.max_image_pixels or max(DEFAULT_MIN_PIXELS, 64 * h * w)
    return ImagePlan(mode, h, w, first, spec.image_resize, spec.image_crop, resample, limit)


class ImageDecoder:
    """Decode image files as the bundle's input spec says (see the module docstring)."""

    def __init__(self, spec: InputSpec):
        from PIL import Image

        self.plan = plan_for(spec)
        if self.plan is not None:
            # Pillow's own guard, one process-wide setting: warns above it, refuses above twice it. Ours refuses
            # above it, from the header, before Pillow decodes anything.
            Image.MAX_IMAGE_PIXELS = max(self.plan.max_pixels, Image.MAX_IMAGE_PIXELS or 0)

    @property
    def available(self) -> bool:
        return self.plan is not None

    def decode(self, data: bytes) -> np.ndarray:
        """One file -> uint8 [C, H, W] (or [H, W, C] for an NHWC spec)."""
        from PIL import Image, ImageOps, UnidentifiedImageError

        p = self.plan
        if p is None:
            raise ImageError("this model's input is not an image (1 or 3 channels of H×W): send arrays", 415)
        if not data:
            raise ImageError("empty image file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data), formats=FORMATS)
                w, h = img.size
                if w * h > p.max_pixels:
                    raise ImageError(f"image of {w}x{h} = {w * h} pixels exceeds this model's limit of "
                                     f"{p.max_pixels} pixels (input spec max_image_pixels)", 413)
                target = self._scaled_size(w, h)
                if img.format == "JPEG":  # either orientation: the EXIF rotation comes after
                    img.draft(p.mode, (max(target), max(target)))  # decode at 1/2, 1/4 or 1/8 scale where that still covers target
                img = ImageOps.exif_transpose(img)  # phone photos: the pixels as the camera was held
                img = self._to_mode(img)
                return self._to_tensor(img)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"image refused as a decompression bomb: {exc}", 413) from exc
        except UnidentifiedImageError:
            other = next((name for sig, name in _OTHER_SIGNATURES if data[:len(sig)] == sig), None)
            if other is not None:
                raise ImageError(f"{other} images are not supported: send JPEG, PNG or WebP", 415) from None
            raise ImageError("body is not a JPEG, PNG or WebP image (unrecognized or corrupt header)") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
            # Pillow's words for truncated data, bad chunks and CRCs, impossible sizes
            raise ImageError(f"image file is truncated or corrupt: {str(exc)[:200]}") from exc

    def decode_many(self, files: list[bytes]) -> np.ndarray:
        """Several files -> uint8 [N, ...]: every one decoded, each refusal names the file's position."""
        if len(files) == 1:
            return self.decode(files[0])[None]
        out = []
        for i, data in enumerate(files):
            try:
                out.append(self.decode(data))
            except ImageError as exc:
                raise ImageError(f"file {i + 1} of {len(files)}: {exc}", exc.status) from exc
        return np.stack(out)

    # -- the steps -------------------------------------------------------------------------------
    def _scaled_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) the image is resized to before any crop."""
        p = self.plan
        if p.crop == "none":
            return p.width, p.height
        short = p.resize or max(p.height, p.width)
        s = short / min(w, h)
        return max(p.width, round(w * s)), max(p.height, round(h * s))

    def _to_mode(self, img):
        p = self.plan
        if img.mode.startswith("I"):  # 16-bit grey (I;16*, or I from older files): scaled to 8 bits, not clipped
            from PIL import Image

            a = np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8
            img = Image.fromarray(a.astype(np.uint8), "L")
        if img.mode in ("P", "PA") and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode != p.mode:
            img = img.convert(p.mode)  # alpha is dropped, as in most training pipelines
        return img

    def _to_tensor(self, img) -> np.ndarray:
        p = self.plan
        w, h = img.size
        sw, sh = self._scaled_size(w, h)
        if (sw, sh) != (w, h):
            img = img.resize((sw, sh), p.resample, reducing_gap=3.0 if min(w / sw, h / sh) > 3 else None)
        if (sw, sh) != (p.width, p.height):
            left, top = (sw - p.width) // 2, (sh - p.height) // 2
            img = img.crop((left, top, left + p.width, top + p.height))
        a = np.asarray(img, dtype=np.uint8)
        if a.ndim == 2:
            a = a[:, :, None]
        return np.ascontiguousarray(a.transpose(2, 0, 1)) if p.channels_first else a

