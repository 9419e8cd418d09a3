"""Hostile input on the serving routes (issue 16), against a real daemon: the image and v2 operations fuzzed from
the daemon's own OpenAPI description (schemathesis, schema-valid and schema-violating cases), then mutated
image files (bit flips, truncations, forged dimensions, bombs) and mutated v2 binary framings (header lengths,
binary sizes, shapes, datatypes) -> never a 5xx, never a hang, and the daemon answers afterwards."""

from __future__ import annotations

import collections
import io
import json
import struct
import zlib

import httpx
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgeadapt.bench.load import start_device

pytestmark = pytest.mark.timeout(600)
MODEL = "fmnist-edge"
REQUEST_TIMEOUT_S = 20.0


class Tally:
    def __init__(self) -> None:
        self.codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.failures: list[str] = []

    def record(self, what: str, r: httpx.Response | None, detail: str) -> None:
        if r is None:
            self.failures.append(f"{what}: no answer ({detail})"[:300])
            return
        self.codes[what][r.status_code] += 1
        if r.status_code >= 500:
            self.failures.append(f"{what} -> {r.status_code}: {r.text[:200]} ({detail[:200]})")

    def summary(self) -> dict:
        return {"requests": sum(sum(c.values()) for c in self.codes.values()),
                "5xx": sum(n for c in self.codes.values() for code, n in c.items() if code >= 500),
                "failures": len(self.failures), "operations": {k: dict(sorted(v.items())) for k, v in self.codes.items()}}


def _post(c: httpx.Client, tally: Tally, what: str, path: str, **kw) -> None:
    try:
        r = c.post(path, timeout=REQUEST_TIMEOUT_S, **kw)
    except httpx.HTTPError as exc:  # a hang, a reset, a crash
        tally.record(what, None, f"{type(exc).__name__}: {exc}")
        return
    tally.record(what, r, str(kw.get("headers")))


def _schema_fuzz(base_url: str, tally: Tally, examples: int) -> None:
    """schemathesis' cases for the serving operations of the daemon's /openapi.json."""
    import requests
    import schemathesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    spec = httpx.get(f"{base_url}/openapi.json", timeout=30).raise_for_status().json()
    spec["paths"] = {p: v for p, v in spec["paths"].items() if p.startswith("/v2") or p == "/v1/predict"}
    schema = schemathesis.openapi.from_dict(spec)
    session = requests.Session()
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 10, [op.label for op in ops]

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True, print_blob=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(data=st.data())
    def run(data, op, mode) -> None:
        case = data.draw(op.as_strategy(generation_mode=mode))
        name = f"{op.method.upper()} {op.path}"
        try:
            r = case.call(base_url=base_url, session=session, timeout=REQUEST_TIMEOUT_S)
        except requests.RequestException as exc:
            tally.failures.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
            return
        tally.codes[name][r.status_code] += 1
        if r.status_code >= 500:
            tally.failures.append(f"{name} -> {r.status_code}: {r.text[:200]} (body {str(case.body)[:200]!r}, "
                                  f"headers {case.headers})")

    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                run(op=op, mode=mode)
            except Unsatisfiable:
                assert mode == GenerationMode.NEGATIVE, op.label
    session.close()


def _files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    out = {}
    for fmt in ("JPEG", "PNG", "WEBP"):
        buf = io.BytesIO()
        img.save(buf, fmt)
        out[fmt] = buf.getvalue()
    return out


def _forge_png_size(png: bytes, w: int, h: int) -> bytes:
    """The same PNG with its IHDR saying ``w`` x ``h`` (CRC fixed, so only the size lies)."""
    ihdr = bytearray(png[16:29])
    ihdr[0:8] = struct.pack(">II", w, h)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return png[:16] + bytes(ihdr) + crc + png[33:]


def test_fuzz_serving_routes(tiny_bundle, tmp_path):
    files = _files()
    tally = Tally()
    with start_device(tiny_bundle, tmp_path / "state") as dev:
        _schema_fuzz(dev.url, tally, examples=40)
        with httpx.Client(base_url=dev.url) as c:
            ctypes = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}

            @settings(max_examples=150, deadline=None, database=None, derandomize=True, print_blob=False,
                      suppress_health_check=list(HealthCheck))
            @given(fmt=st.sampled_from(sorted(files)), cut=st.integers(0, 4000),
                   flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 255)), max_size=8),
                   as_multipart=st.booleans(), declared=st.sampled_from(sorted(ctypes.values())))
            def mutated_images(fmt, cut, flips, as_multipart, declared):
                data = bytearray(files[fmt])
                for pos, bits in flips:
                    if pos < len(data):
                        data[pos] ^= bits
                data = bytes(data[: cut or len(data)])
                if as_multipart:
                    _post(c, tally, "mutated image (multipart)", "/v1/predict",
                          files=[("file", ("a", data, declared)), ("file", ("b", files["PNG"], "image/png"))])
                else:
                    _post(c, tally, "mutated image", "/v1/predict", content=data, headers={"content-type": declared})

            mutated_images()

            @settings(max_examples=60, deadline=None, database=None, derandomize=True, print_blob=False,
                      suppress_health_check=list(HealthCheck))
            @given(w=st.integers(0, 2**31 - 1), h=st.integers(0, 2**31 - 1))
            def forged_sizes(w, h):
                _post(c, tally, "PNG with a forged size", "/v1/predict", content=_forge_png_size(files["PNG"], w, h),
                      headers={"content-type": "image/png"})

            forged_sizes()

            x = np.zeros((1, 1, 32, 32), np.uint8).tobytes()
            dtypes = ["UINT8", "FP32", "FP16", "FP64", "BYTES", "INT8", "BOOL", "", None]

            @settings(max_examples=200, deadline=None, database=None, derandomize=True, print_blob=False,
                      suppress_health_check=list(HealthCheck))
            @given(shape=st.lists(st.integers(-2, 2**40), max_size=9), dtype=st.sampled_from(dtypes),
                   size=st.one_of(st.none(), st.integers(-5, 5000), st.text(max_size=3)),
                   header_delta=st.integers(-50, 50), payload=st.integers(0, 2048),
                   outputs=st.one_of(st.none(), st.lists(st.sampled_from(["probs", "class", "x", "label"]),
                                                         max_size=3)),
                   header_raw=st.one_of(st.none(), st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=6)))
            def mutated_v2(shape, dtype, size, header_delta, payload, outputs, header_raw):
                t = {"name": "input", "datatype": dtype, "shape": shape}
                if size is not None:
                    t["parameters"] = {"binary_data_size": size}
                doc = {"inputs": [t]}
                if outputs is not None:
                    doc["outputs"] = [{"name": n, "parameters": {"binary_data": i % 2 == 0}}
                                      for i, n in enumerate(outputs)]
                head = orjson.dumps(doc)
                body = head + (x * 3)[:payload]
                hlen = header_raw if header_raw is not None else str(len(head) + header_delta)
                _post(c, tally, "mutated v2 binary", f"/v2/models/{MODEL}/infer", content=body,
                      headers={"inference-header-content-length": hlen, "content-type": "application/octet-stream"})

            mutated_v2()
        print("serving fuzz:", json.dumps(tally.summary()))
        assert tally.failures == [], tally.failures[:10]
        ops = tally.codes
        assert sum(ops["mutated image"].values()) + sum(ops["mutated image (multipart)"].values()) >= 150
        assert sum(ops["mutated v2 binary"].values()) >= 200
        # the mutations were not all refused: some images still decode, some framings are right
        assert ops["mutated image"][200] + ops["mutated image (multipart)"][200] > 0
        assert ops["PNG with a forged size"][413] > 0
        assert dev.proc.poll() is None
        assert httpx.get(f"{dev.url}/healthz", timeout=10).status_code == 200
        r = httpx.post(f"{dev.url}/v1/predict", content=files["PNG"], headers={"content-type": "image/png"},
                       timeout=30)
        assert r.status_code == 200, r.text
