"""Images in (issue 16): JPEG/PNG/WebP bodies and multipart forms on /v1/predict, decoded as the bundle's input spec
says and then served exactly like the same pixels sent as an array; bombs, truncated and corrupt files and other
formats refused with their own 4xx while the daemon keeps serving."""

from __future__ import annotations

import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from edgeadapt.bench.load import start_device
from edgeadapt.core.bundle import InputSpec
from edgeadapt.device.image_decode import ImageDecoder, ImageError


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    """A valid greyscale PNG of ``width`` × ``height`` black pixels: a few KB that decode to width·height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# -- the decoder, in-process ------------------------------------------------------------------------------------
def test_defaults_reproduce_the_reference_preprocessing():
    """Grey 32×32 spec, no image fields: a grey 32×32 file comes through bit for bit; anything else is converted
    to L and resized straight to 32×32, as Pillow does it by hand."""
    dec = ImageDecoder(InputSpec(shape=[1, 32, 32]))
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    out = dec.decode(_encode(Image.fromarray(grey), "PNG"))
    assert out.shape == (1, 32, 32) and out.dtype == np.uint8 and np.array_equal(out[0], grey)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    want = np.asarray(rgb.convert("L").resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(dec.decode(_encode(rgb, "PNG"))[0], want)
    assert np.array_equal(dec.decode(_encode(rgb, "WEBP", lossless=True))[0], want)
    # 16-bit grey is scaled to 8 bits, not clipped at 255
    deep = Image.fromarray((grey.astype(np.uint16) << 8) | 0x7F)
    assert deep.mode.startswith("I")
    assert np.array_equal(dec.decode(_encode(deep, "PNG"))[0], grey)


def test_rgb_spec_resizes_the_shorter_side_and_centre_crops():
    spec = InputSpec(shape=[3, 224, 224], image_resize=256, image_crop="center", mean=[0.5] * 3, std=[0.25] * 3)
    dec = ImageDecoder(spec)
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    out = dec.decode(_encode(img, "PNG"))
    assert out.shape == (3, 224, 224)
    r = img.resize((341, 256), Image.Resampling.BILINEAR)  # shorter side 300 -> 256: 400 -> 341
    want = np.asarray(r.crop((58, 16, 58 + 224, 16 + 224))).transpose(2, 0, 1)
    assert np.array_equal(out, want)
    grey_file = Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8))
    assert dec.decode(_encode(grey_file, "JPEG")).shape == (3, 224, 224)  # L files become RGB
    nhwc = ImageDecoder(InputSpec(shape=[224, 224, 3], layout="NHWC", image_crop="center"))
    assert nhwc.decode(_encode(img, "JPEG", quality=90)).shape == (224, 224, 3)
    # a large JPEG is decoded at a reduced scale first (draft) and still lands on the spec's size
    big = Image.fromarray(np.tile(rng.integers(0, 256, (1, 2000, 3), dtype=np.uint8), (1500, 1, 1)))
    assert dec.decode(_encode(big, "JPEG")).shape == (3, 224, 224)


def test_hostile_files_are_refused_with_their_own_reason():
    dec = ImageDecoder(InputSpec(shape=[1, 32, 32]))
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jpeg = _encode(img, "JPEG")
    png = _encode(img, "PNG")
    corrupt_png = bytearray(png)
    corrupt_png[len(png) // 2 : len(png) // 2 + 64] = b"\xff" * 64
    cases = {
        "bomb: 5000x5000 in a few KB": (_png_bomb(5000, 5000), 413, "exceeds this model's limit"),
        "truncated JPEG": (jpeg[: len(jpeg) // 2], 400, "truncated"),
        "truncated PNG": (png[: len(png) // 3], 400, "truncated or corrupt"),
        "corrupt PNG data": (bytes(corrupt_png), 400, "truncated or corrupt"),
        "GIF": (_encode(img, "GIF"), 415, "GIF images are not supported"),
        "BMP": (_encode(img, "BMP"), 415, "BMP images are not supported"),
        "TIFF": (_encode(img, "TIFF"), 415, "TIFF images are not supported"),
        "not an image": (b"hello, world" * 10, 400, "not a JPEG, PNG or WebP"),
        "empty": (b"", 400, "empty"),
    }
    assert len(_png_bomb(5000, 5000)) < 100_000
    for what, (data, status, message) in cases.items():
        with pytest.raises(ImageError) as err:
            dec.decode(data)
        assert err.value.status == status and message in str(err.value), (what, err.value.status, str(err.value))
    # the spec's own limit: a model that declares a smaller one refuses a smaller image
    small = ImageDecoder(InputSpec(shape=[1, 32, 32], max_image_pixels=1000))
    with pytest.raises(ImageError, match="exceeds"):
        small.decode(png)
    assert small.decode(_encode(img.resize((30, 30)), "PNG")).shape == (1, 32, 32)
    # a model whose input is not an image says so
    with pytest.raises(ImageError, match="not an image") as err:
        ImageDecoder(InputSpec(shape=[20])).decode(png)
    assert err.value.status == 415


# -- through the daemon -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def device(tiny_bundle, tmp_path_factory):
    # no adaptation: the same pixels must get the same answer whichever request carried them
    with start_device(tiny_bundle, tmp_path_factory.mktemp("img") / "state", "--method", "none") as dev:
        yield dev


def test_image_bodies_and_multipart_are_served_like_the_same_pixels_as_arrays(device):
    rng = np.random.default_rng(3)
    greys = [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(3)]
    with httpx.Client(base_url=device.url, timeout=30) as c:
        want = c.post("/v1/predict?probs=true", content=_npy(np.stack(greys)[:, None]),
                      headers={"content-type": "application/x-npy"})
        assert want.status_code == 200, want.text
        want_probs = np.array([p["probs"] for p in want.json()["predictions"]])
        for fmt, ctype, kw in (("PNG", "image/png", {}), ("WEBP", "image/webp", {"lossless": True})):
            r = c.post("/v1/predict", params={"probs": "1", "top_k": 2}, content=_encode(Image.fromarray(greys[0]),
                       fmt, **kw), headers={"content-type": ctype})
            assert r.status_code == 200, (fmt, r.text)
            pred = r.json()["predictions"]
            assert len(pred) == 1 and len(pred[0]["top_k"]) == 2
            np.testing.assert_allclose(pred[0]["probs"], want_probs[0], atol=1e-5)
        r = c.post("/v1/predict", content=_encode(Image.fromarray(greys[1]), "JPEG", quality=95),
                   headers={"content-type": "image/jpeg"})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1
        files = [("file", (f"{i}.png", _encode(Image.fromarray(g), "PNG"), "image/png")) for i, g in enumerate(greys)]
        r = c.post("/v1/predict", files=files, data={"probs": "true", "top_k": "1"})
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"]
        assert len(pred) == 3 and all(len(p["top_k"]) == 1 for p in pred)
        np.testing.assert_allclose(np.array([p["probs"] for p in pred]), want_probs, atol=1e-5)
        # a colour photo of another size goes through the spec's conversion
        photo = Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))
        r = c.post("/v1/predict", files=[("file", ("p.jpg", _encode(photo, "JPEG"), "image/jpeg"))])
        assert r.status_code == 200, r.text


def test_hostile_image_requests_get_a_4xx_and_the_daemon_keeps_serving(device):
    img = Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 40), dtype=np.uint8))
    jpeg = _encode(img, "JPEG")
    png = _encode(img, "PNG")
    boundary = "xYzZY"
    unterminated = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                    "Content-Type: image/png\r\n\r\n").encode() + png
    cases = {
        "bomb": (dict(content=_png_bomb(6000, 6000), headers={"content-type": "image/png"}), 413, "pixels"),
        "truncated": (dict(content=jpeg[:200], headers={"content-type": "image/jpeg"}), 400, "truncated"),
        "GIF body": (dict(content=_encode(img, "GIF"), headers={"content-type": "image/png"}), 415, "GIF"),
        "image/gif type": (dict(content=_encode(img, "GIF"), headers={"content-type": "image/gif"}), 415,
                           "not supported"),
        "image/svg+xml type": (dict(content=b"<svg/>", headers={"content-type": "image/svg+xml"}), 415,
                               "not supported"),
        "empty image": (dict(content=b"", headers={"content-type": "image/webp"}), 400, "empty"),
        "multipart without files": (dict(content=(
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n2\r\n--{boundary}--\r\n").encode(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"}), 400, "no file"),
        "multipart, one bad file of two": (dict(files=[("file", ("a.png", png, "image/png")),
                                                       ("file", ("b.png", png[:50], "image/png"))]), 400,
                                           "file 2 of 2"),
        "multipart without boundary": (dict(content=b"abc", headers={"content-type": "multipart/form-data"}), 400,
                                       "boundary"),
        "multipart cut short": (dict(content=unterminated, headers={
            "content-type": f"multipart/form-data; boundary={boundary}"}), 400, "closing boundary"),
        "too many files": (dict(files=[("file", (f"{i}.png", png, "image/png")) for i in range(300)]), 413,
                           "files"),
        "probs not a boolean": (dict(content=png, params={"probs": "maybe"}, headers={"content-type": "image/png"}),
                                400, "true or false"),
    }
    with httpx.Client(base_url=device.url, timeout=30) as c:
        # a multipart form from a browser is a "simple request": refused by its Origin like any other
        r = c.post("/v1/predict", files=[("file", ("a.png", png, "image/png"))],
                   headers={"origin": "http://evil.example"})
        assert r.status_code == 403
        for what, (kw, status, message) in cases.items():
            r = c.post("/v1/predict", **kw)
            assert r.status_code == status, (what, r.status_code, r.text[:300])
            assert message in r.json()["detail"], (what, r.json())
        assert c.post("/v1/predict", content=png, headers={"content-type": "image/png"}).status_code == 200
        metrics = c.get("/metrics").text
        assert 'edgeadapt_inputs_refused_total{reason="image"}' in metrics
    assert device.proc.poll() is None
