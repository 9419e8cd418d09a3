"""`run_update_bench` (what `edgeadapt bench update --json` prints) on a tiny synthetic stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest_plugins = ["tests.cloud_fixtures"]  # the cloud fixtures (cloud_env, kit)
pytestmark = pytest.mark.timeout(300)  # includes building the shared trained-bundle fixture on a loaded machine


def test_update_bench_report(cloud_env, kit, tmp_path):
    from edgeadapt.cloud.bench_update import run_update_bench
    from edgeadapt.core.bundle import read_manifest
    from edgeadapt.core.update_package import MODES

    xs, ys, cs = [], [], []
    for c in range(2):  # two "corruptions" of 96 images each
        x, y = kit.synthetic_task(96, seed=70 + c, shift=kit.TEST_SHIFT)
        xs.append(x)
        ys.append(y)
        cs.append(np.full(96, c))
    stream = tmp_path / "stream.npz"
    np.savez(stream, x=np.concatenate(xs), y=np.concatenate(ys), corruption=np.concatenate(cs),
             corruption_names=np.array(["a", "b"]))
    report = run_update_bench(cloud_env.bundle, "resnet_edge", cloud_env.teacher_weights, stream)
    assert set(report["modes"]) == set(MODES)
    assert report["train_samples"] == 96 and report["eval_samples"] == 96
    raw = report["raw_fp32_bytes"]
    assert raw == sum(int(np.prod(t.shape)) * 4 for t in read_manifest(cloud_env.bundle).adaptable)
    fp32 = report["modes"]["fp32"]
    assert fp32["lossless"] and fp32["acc_delta"] == 0.0 and fp32["max_abs_err"] == 0.0
    for mode, r in report["modes"].items():
        assert r["bytes"] > 0 and abs(r["ratio"] - raw / r["bytes"]) < 1e-9, mode
        assert -100 <= r["acc_delta"] <= 100
    assert report["modes"]["int8"]["bytes"] < report["modes"]["fp16"]["bytes"] < fp32["bytes"]
    assert report["best"]["mode"] in MODES
    assert report["scoring"] == "domain"
    # scored per domain, batch statistics alone already undo most of this synthetic shift: the update must not hurt
    assert report["updated_acc"] >= report["source_acc"] - 0.03
    # scored with the update's own statistics (eval mode), the update helps on the shifted stream
    evaluated = run_update_bench(cloud_env.bundle, "resnet_edge", cloud_env.teacher_weights, stream, scoring="eval",
                                 modes=["fp32"])
    assert evaluated["scoring"] == "eval"
    assert evaluated["updated_acc"] > evaluated["source_acc"]
    with pytest.raises(ValueError, match="scoring"):
        run_update_bench(cloud_env.bundle, "resnet_edge", cloud_env.teacher_weights, stream, scoring="bogus")


def test_teacher_from_pt_file(cloud_env, tmp_path):
    from safetensors.torch import load_file

    from edgeadapt.cloud.edge_model import ModelError, load_teacher

    state = load_file(str(cloud_env.teacher_weights))
    torch.save({"state_dict": state}, tmp_path / "t.pt")
    a = load_teacher("resnet_edge", cloud_env.teacher_weights)
    b = load_teacher("resnet_edge", tmp_path / "t.pt")
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    with pytest.raises(ModelError, match="does not fit"):
        load_teacher("resnet_teacher", cloud_env.teacher_weights)
    with pytest.raises(ValueError, match="unknown arch"):
        load_teacher("nope", None)
