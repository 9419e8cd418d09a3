"""The shipped reference weights: used only when intact and current, and the teacher is the stronger model under
corruption (what the loop's value rests on)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgeadapt import assets
from edgeadapt.models.training import load_weights, metadata_matches, read_metadata, resolve_config


@pytest.mark.parametrize("arch", [assets.EDGE_ARCH, assets.TEACHER_ARCH])
def test_shipped_weights_are_current(arch):
    path, why = assets.embedded_weights(arch)
    # fails when DEFAULTS in models/training.py change without the shipped files being retrained
    assert path is not None, why
    assert metadata_matches(read_metadata(path), resolve_config(arch))


def test_first_use_copies_the_shipped_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEADAPT_CACHE", str(tmp_path / "cache"))
    out = assets._ensure_model(assets.EDGE_ARCH)
    assert out == assets.model_path(assets.EDGE_ARCH)
    assert out.read_bytes() == (assets.EMBEDDED_DIR / f"{assets.EDGE_ARCH}.safetensors").read_bytes()


def test_altered_or_disabled_weights_are_not_used(tmp_path, monkeypatch):
    shipped = tmp_path / "pretrained"
    shutil.copytree(assets.EMBEDDED_DIR, shipped)
    monkeypatch.setattr(assets, "EMBEDDED_DIR", shipped)
    assert assets.embedded_weights(assets.EDGE_ARCH)[0] is not None
    data = bytearray((shipped / f"{assets.EDGE_ARCH}.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight
    (shipped / f"{assets.EDGE_ARCH}.safetensors").write_bytes(bytes(data))
    path, why = assets.embedded_weights(assets.EDGE_ARCH)
    assert path is None and "checksum" in why
    monkeypatch.setenv("EDGEADAPT_EMBEDDED_WEIGHTS", "0")
    assert assets.embedded_weights(assets.TEACHER_ARCH) == (None, "EDGEADAPT_EMBEDDED_WEIGHTS=0")
    assert assets.embedded_weights("vit_tiny")[0] is None


def test_teacher_is_stronger_than_the_edge_model_under_corruption():
    pytest.importorskip("imagecorruptions")
    from edgeadapt.datasets.fmnist import _corrupt_chunk, load_fmnist
    from edgeadapt.models.reference import build_arch
    from edgeadapt.models.training import evaluate

    try:
        x, y = load_fmnist("test")
    except Exception as exc:  # the dataset package is installed by scripts/setup
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    rng = np.random.default_rng(1)
    idx = rng.choice(len(x), 150, replace=False)
    models = {}
    for arch in (assets.EDGE_ARCH, assets.TEACHER_ARCH):
        m = build_arch(arch)
        load_weights(m, assets.EMBEDDED_DIR / f"{arch}.safetensors")
        models[arch] = m
    gaps = []
    for i, name in enumerate(("gaussian_noise", "contrast", "fog")):
        xc = _corrupt_chunk((name, 5, 0, i, x[idx]))
        accs = {a: evaluate(m, xc, y[idx]) for a, m in models.items()}
        gaps.append(accs[assets.TEACHER_ARCH] - accs[assets.EDGE_ARCH])
    # on the full stream the teacher is 63% vs 27%: far more than noise on 150 images per corruption
    print("teacher - edge per corruption:", gaps)
    assert min(gaps) > 0.1, gaps
    assert evaluate(models[assets.EDGE_ARCH], x[idx], y[idx]) > 0.8  # and the edge model is a real model
