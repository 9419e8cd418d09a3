"""Upload encodings (issue 15 item 2): raw / PNG / JPEG / WebP samples, encoded by the device's encoder and
decoded by the cloud under the bundle's input contract; refusals of corrupt files and decompression bombs."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from edgeadapt.core.bundle import InputSpec
from edgeadapt.core.input_codec import InputCodec, InputError
from edgeadapt.core.upload_encoding import UploadEncoder, UploadEncoding, decode_upload
from edgeadapt.core.wire import WireArray

pytest_plugins = ["tests.cloud_fixtures"]
pytestmark = pytest.mark.timeout(300)

GRAY = InputSpec(shape=[1, 32, 32])
RGB224 = InputSpec(shape=[3, 224, 224], mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def smooth(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth uint8 image (a few low-frequency waves): compresses the way photos do, unlike noise."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros(shape, np.float64)
    for ch in range(c):
        for _ in range(3):
            fy, fx, ph = rng.uniform(0.5, 4, 3)
            img[ch] += np.sin(2 * np.pi * (fy * yy + fx * xx) + ph)
    return np.clip((img - img.min()) / np.ptp(img) * 255, 0, 255).astype(np.uint8)


def file_wire(data: bytes, encoding: str, shape) -> WireArray:
    return WireArray(dtype="uint8", shape=list(shape), data=base64.b64encode(data).decode(), encoding=encoding)


def png_bytes(a: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, mode).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("text,norm", [("raw", "raw"), ("PNG", "png"), ("jpeg:90", "jpeg:90"), (" webp:80", "webp:80")])
def test_parse(text, norm):
    assert str(UploadEncoding.parse(text)) == norm


@pytest.mark.parametrize("bad", ["jpg", "jpeg", "jpeg:0", "jpeg:101", "webp:x", "png:5", "raw:1", ""])
def test_parse_refuses(bad):
    with pytest.raises(ValueError, match="upload encoding"):
        UploadEncoding.parse(bad)


@pytest.mark.parametrize("spec", [GRAY, RGB224], ids=["gray32", "rgb224"])
def test_round_trip_png_exact_lossy_close_and_smaller(spec):
    codec = InputCodec(spec)
    x = smooth(codec.shape)
    sizes = {}
    for enc in ("raw", "png", "jpeg:90", "webp:80"):
        e = UploadEncoder(codec, enc)
        wire = e.encode(x)
        assert wire.encoding == enc.split(":")[0] and e.effective == enc
        back = decode_upload(codec, WireArray.model_validate_json(wire.model_dump_json()))
        assert back.dtype == np.uint8 and back.shape == codec.shape
        if enc in ("raw", "png"):
            assert np.array_equal(back, x)
        else:  # lossy, but close on a smooth image
            assert np.abs(back.astype(int) - x).mean() < 4
        sizes[enc] = len(base64.b64decode(wire.data))
        assert e.mean_bytes == sizes[enc]
    assert sizes["raw"] == codec.sample_bytes()
    assert sizes["png"] < sizes["raw"] and sizes["jpeg:90"] < sizes["png"]


def test_noise_travels_raw_when_no_smaller():
    codec = InputCodec(GRAY)
    x = np.random.default_rng(0).integers(0, 256, codec.shape, dtype=np.uint8)
    e = UploadEncoder(codec, "png")
    wire = e.encode(x)
    assert wire.encoding == "raw" and e.raw_fallbacks == 1
    assert np.array_equal(decode_upload(codec, wire), x)


def test_non_image_inputs_travel_raw_and_say_why():
    wide = InputCodec(InputSpec(shape=[1, 8, 8], value_range=(-4.0, 4.0)))  # float16 uploads
    e = UploadEncoder(wide, "png")
    assert e.effective == "raw" and "float16" in e.why_raw and e.status()["why_raw"]
    x = wide.to_upload(np.zeros((1, 8, 8), np.float32))
    assert e.encode(x).encoding == "raw"
    four = InputCodec(InputSpec(shape=[4, 8, 8]))
    assert "not an image" in UploadEncoder(four, "jpeg:90").why_raw


def test_cloud_refuses_what_is_not_the_declared_sample():
    codec = InputCodec(RGB224)
    good = png_bytes(smooth((3, 224, 224)).transpose(1, 2, 0).copy(), "RGB")
    # a decompression bomb: 16 megapixels of one colour in ~50 KB, under the sample's byte limit
    bomb = png_bytes(np.zeros((4096, 4096), np.uint8), "L")
    assert len(bomb) < codec.sample_bytes()
    cases = {
        "bomb": (file_wire(bomb, "png", codec.shape), "undecodable as the declared sample"),
        "truncated": (file_wire(good[: len(good) // 2], "png", codec.shape), "undecodable: truncated or corrupt"),
        "not png": (file_wire(b"GIF89a" + bytes(100), "png", codec.shape), "undecodable: not a PNG"),
        "jpeg labelled png": (file_wire(_jpeg(smooth((3, 224, 224))), "png", codec.shape), "not a PNG"),
        "gray for rgb": (file_wire(png_bytes(np.zeros((224, 224), np.uint8), "L"), "png", codec.shape),
                         "the file is L 224x224"),
        "declared shape": (file_wire(good, "png", [3, 112, 112]), "the model takes uint8"),
        "too large": (file_wire(bytes(codec.sample_bytes() + 10), "png", codec.shape), "exceeds"),
    }
    for name, (wire, words) in cases.items():
        with pytest.raises(InputError, match=words):
            decode_upload(codec, wire)
        assert name


def _jpeg(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x.transpose(1, 2, 0).copy(), "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_live_cloud_decodes_each_sample_by_its_encoding(live_cloud, kit):
    """Over real HTTP: one batch mixing raw, PNG and JPEG samples is stored decoded (PNG exactly); a corrupt PNG is
    a 422 counted as ``undecodable`` in the cloud's metrics."""
    cloud = live_cloud()
    token = cloud.add_device("enc-1")
    codec = cloud.service.codec
    xs = kit.synthetic_images(3, seed=3)
    body = kit.batch_body(xs)
    for s, x, enc in zip(body["samples"], xs, ("raw", "png", "jpeg:95"), strict=True):
        s["input"] = json.loads(UploadEncoder(codec, enc).encode(x).model_dump_json())
    assert body["samples"][1]["input"]["encoding"] == "png"
    with cloud.client(token) as c:
        r = c.post("/v1/samples", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 3
        stored = {s.sample_id: s for s in cloud.service.store.recent_samples("train", 10)
                  + cloud.service.store.recent_samples("holdout", 10)}
        ids = [s["id"] for s in body["samples"]]
        got = cloud.service.store.load_inputs([stored[i] for i in ids])
        assert np.array_equal(got[0], xs[0]) and np.array_equal(got[1], xs[1])
        assert got[2].shape == xs[2].shape and np.abs(got[2].astype(int) - xs[2]).mean() < 8
        bad = kit.batch_body(xs[:1])
        bad["samples"][0]["input"] = {"dtype": "uint8", "shape": list(codec.shape), "encoding": "png",
                                      "data": base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(40)).decode()}
        r = c.post("/v1/samples", json=bad)
        assert r.status_code == 422 and "undecodable" in r.text, r.text
    metrics = cloud.client().get("/metrics").text
    assert 'edgeadapt_cloud_upload_refusals_total{model="fmnist-edge",reason="undecodable"} 1.0' in metrics


def test_device_config_validates_and_normalizes_the_encoding(tmp_path):
    from edgeadapt.device.config import ConfigError, load_config

    flags = {"bundle": tmp_path, "state_dir": tmp_path}
    assert load_config(flags, env={}).upload_encoding == "png"  # the default
    assert load_config(flags, env={"EDGEADAPT_UPLOAD_ENCODING": "JPEG:90"}).upload_encoding == "jpeg:90"
    with pytest.raises(ConfigError, match="lossy encoding needs its quality"):
        load_config(flags, env={"EDGEADAPT_UPLOAD_ENCODING": "webp"})
