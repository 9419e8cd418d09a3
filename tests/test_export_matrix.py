"""Export matrix (issue 15 item 7): every architecture family people deploy (small versions in export_zoo), gray
1x32x32 and RGB 3x64x64, 10 and 120 classes: export -> torch-free verify -> the device engine predicts batch 1
and batch 5 with finite outputs and torch's answers.

Default suite: each family at (gray, 10 classes) and (RGB, 120 classes); the two other corners are `slow`.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgeadapt.core.bundle import Bundle
from edgeadapt.device.backend import session_options
from edgeadapt.device.engine import AdaptiveEngine, EngineConfig
from edgeadapt.export.exporter import ExportSpec, export_bundle
from edgeadapt.export.profile import ExportProfile
from edgeadapt.export.verify import relative_tolerance, verify_bundle
from tests.export_zoo import AFFINE_FAMILIES, BN_FAMILIES, build

GRAY, RGB = (1, 32, 32), (3, 64, 64)
#: a forward-only method that works for the family: BN nets adapt statistics; LN/GN nets have none to adapt
METHOD = {"resnet": "ema_stats", "mobilenetv3": "ema_stats", "efficientnet": "ema_stats",
          "convnext": "feature_shift", "vit": "lame", "groupnorm": "feature_shift"}
PROFILE = ExportProfile(calib_samples=96, parity_batch=16)
FAMILIES = BN_FAMILIES + AFFINE_FAMILIES


def _cases():
    for fam in FAMILIES:
        yield pytest.param(fam, GRAY, 10, id=f"{fam}-gray-10")
        yield pytest.param(fam, RGB, 120, id=f"{fam}-rgb-120")
        yield pytest.param(fam, GRAY, 120, id=f"{fam}-gray-120", marks=pytest.mark.slow)
        yield pytest.param(fam, RGB, 10, id=f"{fam}-rgb-10", marks=pytest.mark.slow)


def _export(tmp_path, fam: str, shape: tuple[int, int, int], classes: int):
    model = build(fam, shape, classes)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (PROFILE.calib_samples, *shape), dtype=np.uint8)
    y = rng.integers(0, classes, len(x))
    spec = ExportSpec(arch=f"tests.export_zoo:{fam}", model_name=fam, labels=[f"c{i}" for i in range(classes)],
                      input_shape=list(shape))
    manifest = export_bundle(model, spec, x, y, tmp_path / "b", PROFILE)
    return model, manifest, tmp_path / "b"


@pytest.mark.parametrize("fam,shape,classes", list(_cases()))
def test_export_verify_predict(tmp_path, fam, shape, classes):
    model, manifest, path = _export(tmp_path, fam, shape, classes)
    kinds = {t.kind for t in manifest.adaptable}
    if fam in BN_FAMILIES:
        assert kinds == {"norm_affine", "norm_stats"} and manifest.norm_layers
    else:  # LN/GN: affine parameters only, no batch statistics to mix
        assert kinds == {"norm_affine"} and not manifest.norm_layers
    res = verify_bundle(path, student_model=f"tests.export_zoo:{fam}")
    assert res["ok"], res["problems"]
    bundle = Bundle(path)
    assert bundle.calib["parity.input"].dtype == np.uint8
    # class-conditional OOD detectors: 96 samples for 120 classes fall back (warned); for 10 classes they fit
    if classes == 120:
        assert any("class-agnostic" in w for w in manifest.warnings)
        assert "ood.rmds.threshold" not in bundle.calib and "ood.mahalanobis.threshold" in bundle.calib
    else:
        assert not any("class-agnostic" in w for w in manifest.warnings)
        assert "ood.rmds.threshold" in bundle.calib

    engine = AdaptiveEngine(bundle, EngineConfig(method=METHOD[fam], threads=1))
    rng = np.random.default_rng(7)
    for n in (1, 5):
        x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        with torch.no_grad():
            want = model(torch.from_numpy(x.astype(np.float32) / 255)).numpy()
        plain = engine.process(x, adapt=False)  # the serving path with the bundle's state: torch's answers
        assert plain.logits.shape == (n, classes)
        tol = relative_tolerance(PROFILE.parity_tolerance, want)
        assert np.abs(plain.logits - want).max() <= tol
        top2 = np.sort(want, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * tol  # argmax compared where torch's top two are not a tie
        assert (plain.pred[clear] == want.argmax(1)[clear]).all()
        adapted = engine.process(x)  # the method's own path (adaptive graph for BN nets): finite
        assert adapted.logits.shape == (n, classes) and np.isfinite(adapted.logits).all()
        assert np.isfinite(adapted.ood_score).all()


@pytest.mark.parametrize("fam", AFFINE_FAMILIES)
def test_affine_norm_params_drive_the_adaptive_graph(tmp_path, fam):
    """LN/GN affine parameters are real inputs of the adaptive graph: a changed weight changes the logits (the
    cloud distils them and the device applies them), and the given values reproduce the static graph."""
    _, manifest, path = _export(tmp_path, fam, GRAY, 10)
    bundle = Bundle(path)
    so = session_options(1)
    adaptive = ort.InferenceSession(str(bundle.adaptive_graph), so, providers=["CPUExecutionProvider"])
    static = ort.InferenceSession(str(bundle.static_graph), so, providers=["CPUExecutionProvider"])
    x = bundle.preprocess(np.random.default_rng(3).integers(0, 256, (4, *GRAY), dtype=np.uint8))
    base = adaptive.run(["logits"], {"input": x, **bundle.params})[0]
    assert np.abs(base - static.run(["logits"], {"input": x})[0]).max() < 1e-4
    layers = {t.layer for t in manifest.adaptable}
    assert len(layers) >= 2
    for t in manifest.adaptable:
        if t.name.endswith(".weight"):
            moved = dict(bundle.params)
            moved[t.name] = moved[t.name] * 1.5
            out = adaptive.run(["logits"], {"input": x, **moved})[0]
            assert np.abs(out - base).max() > 1e-4, t.name
