"""Export: parity on three architectures, adapters, verify/tamper, and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from edgeadapt.cli import app
from edgeadapt.core.bundle import Bundle
from edgeadapt.export.exporter import ExportError, ExportSpec, ParityError, export_bundle
from edgeadapt.export.profile import ExportProfile
from edgeadapt.export.verify import verify_bundle
from edgeadapt.models.adapters import insert_adapters
from edgeadapt.models.reference import FMNIST_LABELS, build_arch

runner = CliRunner()


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_arch(arch)
    m.train()
    with torch.no_grad():  # non-trivial BN statistics
        m(torch.rand(64, 1, 32, 32) * 0.8)
    return m.eval()


@pytest.fixture(scope="module")
def calib():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (192, 1, 32, 32), dtype=np.uint8), rng.integers(0, 10, 192)


def _spec(arch: str, **kw) -> ExportSpec:
    return ExportSpec(arch=arch, model_name=arch, labels=FMNIST_LABELS, input_shape=[1, 32, 32], **kw)


@pytest.mark.parametrize("arch,kinds", [
    ("resnet_edge", {"norm_affine", "norm_stats", "adapter"}),
    ("mobilenet_tiny", {"norm_affine", "norm_stats"}),
    ("vit_tiny", {"norm_affine"}),
])
def test_parity_three_architectures(tmp_path, calib, arch, kinds):
    model = _model(arch)
    adapters = {}
    if arch == "resnet_edge":
        targets = insert_adapters(model, 4)
        adapters = {"rank": 4, "targets": targets}
    manifest = export_bundle(model, _spec(arch, adapters=adapters), *calib, tmp_path / arch,
                             ExportProfile(calib_samples=192))
    assert manifest.parity_max_abs_logit_diff <= 1e-4
    assert {t.kind for t in manifest.adaptable} == kinds
    res = verify_bundle(tmp_path / arch)
    assert res["ok"], res
    assert res["parity"]["static"] <= 1e-4 and res["parity"]["adaptive"] <= 1e-4
    # the adaptive graph really mixes batch statistics: stat_mix=1 changes the output of a BN model
    b = Bundle(tmp_path / arch)
    import onnxruntime as ort

    from edgeadapt.device.backend import session_options

    s = ort.InferenceSession(str(b.adaptive_graph), session_options(), providers=["CPUExecutionProvider"])
    x = calib[0][:16].astype(np.float32) / 255
    names = [i.name for i in s.get_inputs()]
    feeds = {"input": x, **{k: v for k, v in b.params.items() if k in names}}
    if "stat_mix" in names:
        n = len(b.manifest.norm_layers)
        base = s.run(["logits"], {**feeds, "stat_mix": np.zeros(n, np.float32)})[0]
        mixed = s.run(["logits"], {**feeds, "stat_mix": np.ones(n, np.float32)})[0]
        assert np.abs(base - mixed).max() > 1e-3
    feats = s.run(["features"], {**feeds, **({"stat_mix": np.zeros(len(b.manifest.norm_layers), np.float32)}
                                             if "stat_mix" in names else {})})[0]
    assert feats.shape == (16, b.manifest.feature_dim)
    # OOD state and thresholds travel in the bundle
    assert "ood.energy.threshold" in b.calib and "ood.vim.threshold" in b.calib


def test_model_without_norm_layers_is_refused(tmp_path, calib):
    with pytest.raises(ExportError, match="no normalization layer"):
        export_bundle(build_arch("mlp_nonorm").eval(), _spec("mlp_nonorm"), *calib, tmp_path / "b",
                      ExportProfile(calib_samples=192))
    assert not (tmp_path / "b").exists()


def test_parity_failure_writes_nothing(tmp_path, calib):
    with pytest.raises(ParityError, match="static graph"):
        export_bundle(_model("resnet_edge"), _spec("resnet_edge"), *calib, tmp_path / "b",
                      ExportProfile(calib_samples=192, parity_tolerance=1e-12))
    assert not (tmp_path / "b").exists()


def test_wrong_calibration_shape(tmp_path, calib):
    x = np.zeros((128, 3, 32, 32), np.uint8)
    with pytest.raises(ExportError, match="shape"):
        export_bundle(_model("resnet_edge"), _spec("resnet_edge"), x, calib[1][:128], tmp_path / "b",
                      ExportProfile(calib_samples=128))


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, calib):
    d = tmp_path_factory.mktemp("cli")
    m = _model("resnet_edge")
    save_file(m.state_dict(), str(d / "w.safetensors"))
    np.savez(d / "calib.npz", x=calib[0], y=calib[1])
    (d / "profile.toml").write_text('[profile]\nname = "t"\ncalib_samples = 128\n')
    return d


def test_cli_export_verify_and_tamper(cli_files):
    d = cli_files
    out = d / "bundle"
    r = runner.invoke(app, ["export", "--arch", "resnet_edge", "--weights", str(d / "w.safetensors"),
                            "--calib", str(d / "calib.npz"), "--profile", str(d / "profile.toml"),
                            "--out", str(out), "--adapters", "2"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["bundle", "verify", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["bundle", "inspect", str(out), "--json"])
    assert r.exit_code == 0 and '"adapter"' in r.output
    # one changed byte -> verify fails naming the file
    p = out / "params.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01
    p.write_bytes(bytes(data))
    r = runner.invoke(app, ["bundle", "verify", str(out)])
    assert r.exit_code != 0
    assert "params.safetensors" in r.output


def test_cli_user_model_factory(cli_files):
    d = cli_files
    torch.manual_seed(1)
    save_file(build_arch("mobilenet_tiny").state_dict(), str(d / "mb.safetensors"))
    r = runner.invoke(app, ["export", "--model", "edgeadapt.models.reference:MobileNetTiny",
                            "--weights", str(d / "mb.safetensors"), "--calib", str(d / "calib.npz"),
                            "--profile", str(d / "profile.toml"), "--out", str(d / "mb")])
    assert r.exit_code == 0, r.output
    # an unregistered arch verifies once the cloud is told its builder (issue 22: never imported from a manifest)
    assert runner.invoke(app, ["bundle", "verify", str(d / "mb")]).exit_code == 1
    assert runner.invoke(app, ["bundle", "verify", str(d / "mb"), "--student-model",
                               "edgeadapt.models.reference:MobileNetTiny"]).exit_code == 0


@pytest.mark.parametrize("args,message", [
    (["--model", "no_such_pkg.mod:factory", "--weights", "W"], "cannot import module"),
    (["--model", "edgeadapt.models.reference:nope", "--weights", "W"], "has no callable"),
    (["--arch", "resnet_edge", "--weights", "/nonexistent.safetensors"], "does not exist"),
    (["--arch", "not_an_arch"], "unknown arch"),
    (["--arch", "mlp_nonorm"], "no normalization layer"),
    (["--arch", "resnet_edge", "--input-shape", "3,32,32"], "shape"),
    (["--arch", "resnet_edge", "--profile", "/nonexistent.toml"], "does not exist"),
])
def test_cli_bad_input_errors(cli_files, args, message):
    d = cli_files
    args = [a.replace("W", str(d / "w.safetensors")) if a == "W" else a for a in args]
    r = runner.invoke(app, ["export", *args, "--calib", str(d / "calib.npz"), "--profile", str(d / "profile.toml"),
                            "--out", str(d / "bad")] if "--profile" not in args else
                      ["export", *args, "--calib", str(d / "calib.npz"), "--out", str(d / "bad")])
    assert r.exit_code != 0
    assert message in r.output, r.output
    assert not (d / "bad").exists()


def test_cli_weights_mismatch(cli_files):
    d = cli_files
    r = runner.invoke(app, ["export", "--arch", "mobilenet_tiny", "--weights", str(d / "w.safetensors"),
                            "--calib", str(d / "calib.npz"), "--profile", str(d / "profile.toml"),
                            "--out", str(d / "bad2")])
    assert r.exit_code != 0 and "does not fit" in r.output


def test_tensorrt_profile_fails_clearly_without_gpu(cli_files):
    from edgeadapt.export.tensorrt_engine import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("tensorrt and a GPU are present: the engine build test covers this machine")
    d = cli_files
    r = runner.invoke(app, ["export", "--arch", "resnet_edge", "--weights", str(d / "w.safetensors"),
                            "--calib", str(d / "calib.npz"), "--profile", "export/tensorrt-fp16.toml",
                            "--out", str(d / "trt")])
    assert r.exit_code != 0
    assert "TensorRT" in r.output and reason.split()[0] in r.output
    assert not (d / "trt").exists()


@pytest.mark.gpu
def test_tensorrt_engine_builds_with_refit(cli_files):
    from edgeadapt.export.tensorrt_engine import tensorrt_unavailable_reason

    if tensorrt_unavailable_reason():
        pytest.skip(tensorrt_unavailable_reason())
    d = cli_files
    r = runner.invoke(app, ["export", "--arch", "resnet_edge", "--weights", str(d / "w.safetensors"),
                            "--calib", str(d / "calib.npz"), "--profile", "export/tensorrt-fp16.toml",
                            "--out", str(d / "trt")])
    assert r.exit_code == 0, r.output
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine((d / "trt" / "engine.plan").read_bytes())
    assert engine.refittable
    assert runner.invoke(app, ["bundle", "verify", str(d / "trt")]).exit_code == 0
