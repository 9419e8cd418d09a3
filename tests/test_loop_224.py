"""The loop round trip at 3x224x224 with a torchvision-layout ResNet-18 (scripts/bench_archs.py, 1,000 classes, random
weights): device and cloud as separate processes over HTTP, RGB uploads in the default encoding accepted (none
rejected), a round trained, published and applied on the device. Every in-distribution sample is uploaded
(``upload_all``): the selection's budgets are not what is tested here. The teacher is the same architecture with the
same random weights: what this shows is that the loop works at that size, not that a random teacher teaches.

``slow`` (EDGEADAPT_SLOW=1 / ``-m slow``): one 224 export (~1 min) and cloud rounds on a ResNet-18 (~2 min each on
2 cores). The recorded run with every upload encoding is in docs/BENCHMARKS.md "Architectures at 224 (issue 15)".
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
STUDENT = "scripts.bench_archs:resnet18"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_archs

    from edgeadapt.cloud.admin import init_home

    root = tmp_path_factory.mktemp("loop224")
    home = root / "signing-home"
    key = init_home(home)["public_key"]
    bundle = root / "resnet18"
    _export_signed(bench_archs, bundle, key)
    weights = bench_archs.save_weights("resnet18", root / "teacher.safetensors")
    stream = np.load(bench_archs.loop_stream(root / "stream.npz", per_domain=64))
    return {"home": home, "bundle": bundle, "weights": weights, "x": stream["x"], "y": stream["y"],
            "domains": stream["corruption"]}


def _export_signed(bench_archs, out: Path, key: str) -> None:
    from edgeadapt.export.exporter import ExportSpec, export_bundle
    from edgeadapt.export.profile import ExportProfile

    model = bench_archs.build("resnet18")
    x, y = bench_archs.calibration(64, like_stream=True)  # the stream is in-distribution: its uploads train
    export_bundle(model, ExportSpec(arch="bench:resnet18", model_name="resnet18",
                                    labels=[f"c{i}" for i in range(1000)], input_shape=[3, 224, 224],
                                    cloud_public_key=key),
                  x, y, out, ExportProfile(calib_samples=64, parity_batch=16))


def test_resnet18_224_loop_round_trip(assets, tmp_path, monkeypatch):
    from edgeadapt.bench.loop import run_loop

    # the cloud builds the student from the script (module:factory), importable from the repository root
    monkeypatch.setenv("EDGEADAPT_CLOUD_STUDENT_MODEL", STUDENT)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("EDGEADAPT_CLOUD_TRAINER__MIN_STEPS_PER_ROUND", "4")  # a round in well under a minute
    # the device's novelty flag: MSP. The default (Mahalanobis) fitted from 64 calibration samples for 512-dim
    # features is rank-deficient (export warns, bundle inspect shows it) and flags every upload novel, and a novel
    # upload is stored, never trained on: calibrating it properly takes >= 1,024 images at 224
    monkeypatch.setenv("EDGEADAPT_OOD_DETECTOR", "msp")
    r = run_loop(assets["bundle"], STUDENT, assets["weights"], assets["home"], assets["x"], assets["y"],
                 batch=16, sync_every=4, upload_all=True, work=tmp_path / "work", domains=assets["domains"])
    assert r["uploads_sent"] > 0 and r["uploads_rejected"] == 0, r
    assert r["trainings"] >= 1, r
    assert r["versions_applied"] >= 1 and r["final_version"] >= 1, r
    enc = r["upload_encoding"]  # the default, png, applies at 224: smaller than the raw sample
    assert enc["configured"] == "png" and enc["raw_fallbacks"] == 0 and enc["raw_bytes"] == 3 * 224 * 224, enc
    assert 0 < enc["mean_bytes"] < enc["raw_bytes"], enc
