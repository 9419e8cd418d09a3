"""The bundle's input contract (core/input_codec.py) on more than the reference shape: an RGB 3x224x224 model with
120 classes reaches the cloud through the whole upload path (it used to be refused, silently, by a fixed 64 KiB
per-sample limit), and out-of-range uploads are refused at ingest by the same contract."""

from __future__ import annotations

import io

import numpy as np
import pytest

from edgeadapt.core.bundle import Bundle
from edgeadapt.core.input_codec import InputCodec
from tests.procs import device_proc, wait_for

pytest_plugins = ["tests.cloud_fixtures"]

RGB_SHAPE = [3, 224, 224]
RGB_CLASSES = 120


def _tiny_rgb_model():
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=4, padding=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=4, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, RGB_CLASSES))


@pytest.fixture(scope="module")
def rgb_bundle(cloud_env, tmp_path_factory):
    import torch

    from edgeadapt.export.exporter import ExportSpec, export_bundle
    from edgeadapt.export.profile import ExportProfile

    torch.manual_seed(0)
    model = _tiny_rgb_model()
    model.train()
    with torch.no_grad():
        model(torch.rand(32, *RGB_SHAPE))
    model.eval()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, *RGB_SHAPE), dtype=np.uint8)
    y = rng.integers(0, RGB_CLASSES, 64)
    out = tmp_path_factory.mktemp("rgb") / "bundle"
    export_bundle(model, ExportSpec(arch="tests.test_input_contract:_tiny_rgb_model", model_name="rgb-120",
                                    labels=[f"c{i}" for i in range(RGB_CLASSES)], input_shape=RGB_SHAPE,
                                    cloud_public_key=cloud_env.public_key),
                  x, y, out, ExportProfile(calib_samples=64))
    return out


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def test_codec_limits_follow_the_spec(rgb_bundle):
    codec = InputCodec(Bundle(rgb_bundle).manifest.input)
    assert codec.sample_bytes() == 3 * 224 * 224
    assert codec.max_upload_sample_bytes == 2 * 3 * 224 * 224  # float16 uploads, the widest the contract allows


def test_rgb_224_uploads_reach_the_cloud_and_out_of_range_is_refused(rgb_bundle, live_cloud, kit, tmp_path):
    cloud = live_cloud(bundle=str(rgb_bundle), student_model="tests.test_input_contract:_tiny_rgb_model")
    token = cloud.add_device("cam-rgb")
    dev = device_proc(rgb_bundle, tmp_path / "state", tmp_path / "device.log", cloud_url=cloud.url, token=token,
                      upload_all=1, upload_interval_s=0.2).start()
    try:
        rng = np.random.default_rng(1)
        sent = 0
        for _ in range(3):
            x = rng.integers(0, 256, (8, *RGB_SHAPE), dtype=np.uint8)
            r = dev.post("/v1/predict", content=_npy(x), headers={"content-type": "application/x-npy"})
            assert r.status_code == 200, r.text
            assert len(r.json()["predictions"][0]["top_k"]) == 3
            sent += 8
        xf = rng.uniform(0, 1, (4, *RGB_SHAPE)).astype(np.float32)
        assert dev.post("/v1/predict", content=_npy(xf), headers={"content-type": "application/x-npy"}).status_code == 200
        sent += 4
        wait_for(lambda: cloud.service.store.count_samples() >= sent, 60, f"{sent} RGB samples in the cloud store")
        up = dev.get("/v1/status").json()["uploader"]
        assert up["rejected"] == 0 and up["last_status"] == 200, up
    finally:
        dev.stop()
    assert cloud.service.store.count_samples() == sent
    # a device that uploads values outside the declared range is refused by the same contract (float16 uploads)
    bad = np.full(RGB_SHAPE, 40.0, np.float16)
    with cloud.client(token) as c:
        r = c.post("/v1/samples", json=kit.batch_body(bad[None], model="rgb-120"))
    assert r.status_code == 422 and "declared range" in r.text, r.text
