"""`edgeadapt bench encodings`: bytes per uploaded sample per upload encoding (core/upload_encoding.py) on a stream,
with the device's encode time, the cloud's decode time and, for lossy encodings, the error they introduce.

The samples go through the same path a device's uploads take (``UploadEncoder``, then the cloud's
``decode_upload``), so "bytes" are what travels: the payload (image file or raw array) and the JSON body of one
``UploadSample`` (base64, logits and all).

``rgb_size``: the stream's grey images upscaled (bilinear) to ``rgb_size`` and colourized (each image maps grey to
a line between two random colours): a synthetic RGB stream at model resolution. Upscaled 32×32 images are smoother
than photos, so PNG's and JPEG's ratios on it are optimistic; raw bytes are exact.
"""

from __future__ import annotations

import time

import numpy as np

from edgeadapt.core.bundle import InputSpec
from edgeadapt.core.input_codec import InputCodec
from edgeadapt.core.upload_encoding import UploadEncoder, decode_upload
from edgeadapt.core.wire import UploadSample

DEFAULT_ENCODINGS = ("raw", "png", "jpeg:90", "jpeg:75", "webp:80")


def colourized(x: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [N, 1, h, w] grey -> uint8 [N, 3, size, size]: bilinear upscaling, each image between two random
    colours (see the module docstring)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((len(x), 3, size, size), np.uint8)
    for i, img in enumerate(x):
        g = np.asarray(Image.fromarray(img[0]).resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255
        c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        out[i] = np.clip(c0[:, None, None] * (1 - g) + c1[:, None, None] * g, 0, 255).astype(np.uint8)
    return out


def run_encodings_bench(x: np.ndarray, encodings: tuple[str, ...] = DEFAULT_ENCODINGS,
                        num_classes: int = 10) -> dict:
    """``x``: uint8 [N, C, H, W] samples (C = 1 or 3). -> per encoding: payload and body bytes per sample (mean,
    p50, max), the ratio to raw, encode/decode ms per sample, samples sent raw because the image was not smaller,
    and for lossy encodings the mean absolute error and PSNR of the decoded samples."""
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"samples must be uint8 [N, C, H, W], got {x.dtype} {list(x.shape)}")
    codec = InputCodec(InputSpec(shape=list(x.shape[1:])))
    logits = [-1.2345678] * num_classes
    out: dict = {"n": int(len(x)), "shape": list(x.shape[1:]), "raw_bytes": codec.sample_bytes(), "encodings": {}}
    for enc in encodings:
        e = UploadEncoder(codec, enc)
        payload, body, err, sq, enc_s, dec_s = [], [], [], [], 0.0, 0.0
        for xi in x:
            t = time.perf_counter()
            wire = e.encode(xi)
            enc_s += time.perf_counter() - t
            t = time.perf_counter()
            back = decode_upload(codec, wire)
            dec_s += time.perf_counter() - t
            payload.append(len(wire.data) * 3 // 4 - wire.data[-2:].count("="))
            body.append(len(UploadSample(id="0" * 32, input=wire, logits=logits, entropy=0.5, ood_score=0.5)
                             .model_dump_json()))
            d = back.astype(np.float64) - xi
            err.append(float(np.abs(d).mean()))
            sq.append(float((d * d).mean()))
        p = np.asarray(payload)
        row = {"payload_bytes_mean": round(float(p.mean()), 1), "payload_bytes_p50": int(np.median(p)),
               "payload_bytes_max": int(p.max()), "body_bytes_mean": round(float(np.mean(body)), 1),
               "ratio_to_raw": round(float(p.mean()) / codec.sample_bytes(), 4),
               "encode_ms": round(enc_s / len(x) * 1e3, 3), "decode_ms": round(dec_s / len(x) * 1e3, 3),
               "raw_fallbacks": e.raw_fallbacks}
        if e.encoding.kind in ("jpeg", "webp"):
            mse = float(np.mean(sq))
            row["mean_abs_error"] = round(float(np.mean(err)), 3)
            row["psnr_db"] = round(float(10 * np.log10(255**2 / max(mse, 1e-12))), 2)
        out["encodings"][enc] = row
    return out


def stream_sample(data: dict, limit: int | None) -> np.ndarray:
    """The first ``limit`` images of each domain of a stream .npz (all with None), in stream order."""
    x = data["x"]
    if limit is None or "corruption" not in data:
        return x if limit is None else x[:limit]
    dom = np.asarray(data["corruption"])
    keep = np.concatenate([np.flatnonzero(dom == d)[:limit] for d in dict.fromkeys(dom.tolist())])
    return x[np.sort(keep)]
