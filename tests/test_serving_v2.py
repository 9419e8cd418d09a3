"""The Open Inference Protocol (KServe v2 REST, as Triton serves it) on a real device process, through the real
``tritonclient.http`` package unchanged: health, metadata, JSON infer, binary infer, errors in Triton's form; and
the protocol's edges by hand (binary framing, image files as a BYTES input)."""

from __future__ import annotations

import io
import struct

import httpx
import numpy as np
import orjson
import pytest

from edgeadapt.bench.load import start_device

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "fmnist-edge"


@pytest.fixture(scope="module")
def device(tiny_bundle, tmp_path_factory):
    # no adaptation: the same input must get the same answer on either protocol
    with start_device(tiny_bundle, tmp_path_factory.mktemp("v2") / "state", "--method", "none") as dev:
        yield dev


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _v1(url: str, x: np.ndarray) -> dict:
    r = httpx.post(f"{url}/v1/predict?probs=true", content=_npy(x), headers={"content-type": "application/x-npy"},
                   timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_tritonclient_health_metadata_and_infer(device):
    client = tritonclient_http.InferenceServerClient(device.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready("another-model")
    meta = client.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata(MODEL)
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 32, 32]}]
    assert {o["name"] for o in model["outputs"]} == {"logits", "probs", "class", "label", "ood_score", "ood",
                                                     "entropy"}
    assert client.get_model_config(MODEL)["max_batch_size"] >= 64

    x = np.random.default_rng(0).integers(0, 256, (3, 1, 32, 32), dtype=np.uint8)
    want = _v1(device.url, x)
    want_probs = np.array([p["probs"] for p in want["predictions"]])

    # binary tensors both ways (the client's default when no outputs are named)
    inp = tritonclient_http.InferInput("input", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=True)
    res = client.infer(MODEL, [inp], request_id="req-1")
    assert res.get_response()["id"] == "req-1" and res.get_response()["parameters"]["param_version"] == 0
    assert res.as_numpy("probs").dtype == np.float32 and res.as_numpy("probs").shape == (3, 10)
    np.testing.assert_allclose(res.as_numpy("probs"), want_probs, atol=1e-6)
    assert res.as_numpy("class").tolist() == [p["class"] for p in want["predictions"]]
    assert [s.decode() for s in res.as_numpy("label")] == [p["label"] for p in want["predictions"]]
    assert res.as_numpy("ood").dtype == np.bool_ and res.as_numpy("ood").tolist() == [
        p["ood"] for p in want["predictions"]]
    np.testing.assert_allclose(res.as_numpy("ood_score"), [p["ood_score"] for p in want["predictions"]], atol=1e-6)
    np.testing.assert_allclose(res.as_numpy("probs"), np.exp(res.as_numpy("logits")) /
                               np.exp(res.as_numpy("logits")).sum(1, keepdims=True), atol=1e-5)

    # JSON tensors both ways, float input in value units, two outputs asked for (one of them binary)
    inp = tritonclient_http.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.astype(np.float32) / 255, binary_data=False)
    res = client.infer(MODEL, [inp], outputs=[tritonclient_http.InferRequestedOutput("probs", binary_data=False),
                                              tritonclient_http.InferRequestedOutput("class", binary_data=True)])
    names = [o["name"] for o in res.get_response()["outputs"]]
    assert names == ["probs", "class"] and "data" in res.get_response()["outputs"][0]
    np.testing.assert_allclose(res.as_numpy("probs"), want_probs, atol=1e-5)
    assert res.as_numpy("ood") is None  # not asked for, not sent

    # errors come back as Triton's: status and {"error": message}
    bad = tritonclient_http.InferInput("input", [1, 3, 32, 32], "UINT8")
    bad.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.uint8))
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [bad])
    assert err.value.status() == "400" and "expected [-1, 1, 32, 32]" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("another-model", [inp])
    assert err.value.status() == "404" and "unknown model" in err.value.message()
    nan = tritonclient_http.InferInput("input", [1, 1, 32, 32], "FP32")
    nan.set_data_from_numpy(np.full((1, 1, 32, 32), np.nan, np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [nan])
    assert err.value.status() == "400" and "NaN" in err.value.message()
    wrong_name = tritonclient_http.InferInput("images", list(x.shape), "UINT8")
    wrong_name.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="unexpected inference input"):
        client.infer(MODEL, [wrong_name])
    with pytest.raises(InferenceServerException, match="unknown output"):
        client.infer(MODEL, [inp], outputs=[tritonclient_http.InferRequestedOutput("features")])
    client.close()


def _framed(header: dict, *tensors: bytes, declared: int | None = None) -> tuple[bytes, dict]:
    head = orjson.dumps(header)
    n = len(head) if declared is None else declared
    return head + b"".join(tensors), {"Inference-Header-Content-Length": str(n),
                                      "content-type": "application/octet-stream"}


def test_protocol_edges_by_hand(device):
    url = f"{device.url}/v2/models/{MODEL}/infer"
    x = np.random.default_rng(1).integers(0, 256, (2, 1, 32, 32), dtype=np.uint8)
    one = {"name": "input", "datatype": "UINT8", "shape": [2, 1, 32, 32],
           "parameters": {"binary_data_size": x.nbytes}}
    with httpx.Client(timeout=30) as c:
        # binary in, JSON out: the versioned path answers as the plain one does
        body, headers = _framed({"inputs": [one], "outputs": [{"name": "class"}]}, x.tobytes())
        r = c.post(f"{device.url}/v2/models/{MODEL}/versions/1/infer", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == [2] and len(r.json()["outputs"][0]["data"]) == 2
        # all outputs binary: the response is framed the same way
        body, headers = _framed({"inputs": [one], "parameters": {"binary_data_output": True}}, x.tobytes())
        r = c.post(url, content=body, headers=headers)
        n = int(r.headers["inference-header-content-length"])
        head = orjson.loads(r.content[:n])
        sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
        assert len(r.content) == n + sum(sizes)
        # image files as a BYTES input: decoded as the spec says
        from PIL import Image

        files = []
        for i in range(2):
            buf = io.BytesIO()
            Image.fromarray(x[i, 0]).save(buf, "PNG")
            files.append(buf.getvalue())
        raw = b"".join(struct.pack("<I", len(f)) + f for f in files)
        body, headers = _framed({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [2],
                                             "parameters": {"binary_data_size": len(raw)}}],
                                 "outputs": [{"name": "probs"}]}, raw)
        r = c.post(url, content=body, headers=headers)
        assert r.status_code == 200, r.text
        want = np.array([p["probs"] for p in _v1(device.url, x)["predictions"]])
        np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(2, 10), want, atol=1e-6)

        cases = {
            "header length beyond the body": _framed({"inputs": [one]}, x.tobytes(), declared=10**6),
            "header length not a number": (x.tobytes(), {"Inference-Header-Content-Length": "many"}),
            "header cut inside the JSON": _framed({"inputs": [one]}, x.tobytes(), declared=5),
            "binary size larger than sent": _framed({"inputs": [one]}, x.tobytes()[:100]),
            "bytes left over": _framed({"inputs": [one]}, x.tobytes(), b"extra"),
            "size disagrees with shape": _framed({"inputs": [{**one, "shape": [1, 1, 32, 32]}]}, x.tobytes()),
            "negative binary size": _framed({"inputs": [{**one, "parameters": {"binary_data_size": -1}}]}),
            "shape overflows int64": (orjson.dumps({"inputs": [{**one, "shape": [2**62, 2**62, 4, 1],
                                                                "parameters": {}, "data": [1]}]}), {}),
            "JSON data of the wrong length": (orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                                                        "shape": [1, 1, 32, 32], "data": [0.5]}]}), {}),
            "JSON data not numbers": (orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                                                "shape": [1], "data": ["a"]}]}), {}),
            "UINT8 out of range": (orjson.dumps({"inputs": [{"name": "input", "datatype": "UINT8",
                                                             "shape": [1, 1, 32, 32], "data": [300] * 1024}]}), {}),
            "unsupported datatype": (orjson.dumps({"inputs": [{"name": "input", "datatype": "INT64",
                                                               "shape": [1], "data": [1]}]}), {}),
            "two inputs": (orjson.dumps({"inputs": [one, one]}), {}),
            "not JSON": (b"{nope", {}),
            "JSON not an object": (b"[1, 2]", {}),
            "BYTES element cut short": _framed({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                                            "parameters": {"binary_data_size": 8}}]},
                                               struct.pack("<I", 100) + b"abcd"),
            "BYTES that are not images": _framed({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                                              "parameters": {"binary_data_size": 9}}]},
                                                 struct.pack("<I", 5) + b"hello"),
            "classification extension": (orjson.dumps({"inputs": [one], "outputs": [
                {"name": "probs", "parameters": {"classification": 3}}]}), {}),
        }
        for what, (body, headers) in cases.items():
            r = c.post(url, content=body, headers=headers)
            assert r.status_code == (413 if "overflows" in what else 400), (what, r.status_code, r.text[:300])
            assert isinstance(r.json()["error"], str) and r.json()["error"], what
        r = c.post(url, content=b"x" * 100, headers={"content-encoding": "gzip"})
        assert r.status_code == 415 and "error" in r.json()
        r = c.post(url, content=orjson.dumps({"inputs": [one]}), headers={"origin": "http://evil.example"})
        assert r.status_code == 403 and "error" in r.json()
        assert c.get(url).status_code == 405
        assert c.get(f"{device.url}/v2/models/another-model").status_code == 404
        assert c.get(f"{device.url}/v2/models/{MODEL}/versions/7/ready").status_code == 404
        assert c.get(f"{device.url}/v2/health/ready").status_code == 200
        body, headers = _framed({"inputs": [one]}, x.tobytes())
        assert c.post(url, content=body, headers=headers).status_code == 200  # still serving
    assert device.proc.poll() is None
