"""Export: parity on three architectures, adapters, verify/tamper, and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import onnx
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


# -- any vision model (issue 15 item 3): refusals, input contract, parity rules, bundle layout --------------------
def _zoo_export(tmp_path, model, shape=(1, 32, 32), classes=10, n=64, x=None, **spec_kw):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8) if x is None else x
    spec = ExportSpec(arch="tests.export_zoo:x", model_name="z", labels=[f"c{i}" for i in range(classes)],
                      input_shape=list(shape), **spec_kw)
    return export_bundle(model, spec, x, np.arange(len(x)) % classes, tmp_path / "b",
                         ExportProfile(calib_samples=max(64, len(x)), parity_batch=16))


def test_vit_with_multihead_attention_exports_and_fast_path_flag_is_restored(tmp_path):
    from tests.export_zoo import build

    assert torch.backends.mha.get_fastpath_enabled()
    manifest = _zoo_export(tmp_path, build("vit", (1, 32, 32), 10))
    assert torch.backends.mha.get_fastpath_enabled()  # export switched it off only while tracing
    assert {t.kind for t in manifest.adaptable} == {"norm_affine"}
    assert verify_bundle(tmp_path / "b", student_model="tests.export_zoo:x")["ok"]


def test_groupnorm_affine_is_adaptable_without_batch_statistics(tmp_path):
    from tests.export_zoo import build

    model = build("groupnorm", (1, 32, 32), 10)
    manifest = _zoo_export(tmp_path, model)
    gn = [n for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    assert {t.layer for t in manifest.adaptable} == set(gn)
    assert {t.name for t in manifest.adaptable} == {f"{n}.{r}" for n in gn for r in ("weight", "bias")}
    assert manifest.norm_layers == []  # no statistics to mix: the device's BN machinery stays out of it


def test_baked_batch_size_is_refused_with_the_fix(tmp_path):
    from tests.export_zoo import BakedBatchNet, ShapeBatchNet

    with pytest.raises(ParityError, match="fixes the batch size at 16") as info:
        _zoo_export(tmp_path, BakedBatchNet().eval())
    assert "len(x)" in str(info.value) and "x.reshape(x.shape[0], -1)" in str(info.value)
    assert not (tmp_path / "b").exists()
    _zoo_export(tmp_path, ShapeBatchNet().eval())  # the suggested fix exports
    assert verify_bundle(tmp_path / "b", student_model="tests.export_zoo:x")["ok"]


def test_parity_is_relative_to_the_logits_scale(tmp_path):
    from tests.export_zoo import build

    model = build("resnet", (1, 32, 32), 10)
    with torch.no_grad():  # logits in the thousands: float32 rounding alone exceeds an absolute 1e-4
        model.fc.weight.mul_(3000)
        model.fc.bias.mul_(3000)
    manifest = _zoo_export(tmp_path, model)
    assert manifest.parity_max_abs_logit_diff > 1e-4
    res = verify_bundle(tmp_path / "b", student_model="tests.export_zoo:x")
    assert res["ok"], res["problems"]
    with pytest.raises(ParityError, match=r"max\(1, max\|logit\|.*parity_tolerance"):
        export_bundle(model, _spec("x"), np.zeros((64, 1, 32, 32), np.uint8), np.zeros(64, int),
                      tmp_path / "c", ExportProfile(calib_samples=64, parity_batch=16, parity_tolerance=1e-12))


def test_unsupported_operator_is_one_line_without_ir_dump(tmp_path, capfd):
    from tests.export_zoo import ErfinvNet

    with pytest.raises(ExportError) as info:
        _zoo_export(tmp_path, ErfinvNet().eval())
    msg = str(info.value)
    assert "\n" not in msg and "aten::erfinv" in msg and "supported:" in msg and "Rewrite" in msg
    out, err = capfd.readouterr()
    assert "Torch IR graph" not in out + err and "graph(" not in out + err
    assert not (tmp_path / "b").exists()


def test_unsupported_norm_layer_is_refused(tmp_path):
    from tests.export_zoo import BatchNorm1dNet

    with pytest.raises(ExportError, match=r"unsupported normalization layer bn \(BatchNorm1d\).*supported:"):
        _zoo_export(tmp_path, BatchNorm1dNet().eval())


def test_mean_std_normalize_on_the_device_as_in_training(tmp_path):
    """The manifest carries mean/std/value range; the device's codec feeds the graphs what torch saw in
    training: torch((x/255 - mean)/std), not torch(x/255)."""
    from edgeadapt.core.bundle import InputSpec
    from tests.export_zoo import build

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    model = build("resnet", (3, 32, 32), 10)
    _zoo_export(tmp_path, model, shape=(3, 32, 32), input=InputSpec(shape=[3, 32, 32], mean=mean, std=std))
    b = Bundle(tmp_path / "b")
    assert b.manifest.input.mean == mean and b.manifest.input.std == std
    x = np.random.default_rng(5).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    want_in = (x.astype(np.float32) / 255 - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[
        :, None, None]
    with torch.no_grad():
        want = model(torch.from_numpy(want_in)).numpy()
    import onnxruntime as ort

    from edgeadapt.device.backend import session_options

    s = ort.InferenceSession(str(b.static_graph), session_options(1), providers=["CPUExecutionProvider"])
    got = s.run(["logits"], {"input": b.preprocess(x)})[0]
    assert np.abs(got - want).max() < 1e-4


def test_float_calibration_data_outside_the_declared_range_is_refused(tmp_path):
    from tests.export_zoo import build

    x = np.random.default_rng(0).uniform(0, 255, (64, 1, 32, 32)).astype(np.float32)  # 0-255 floats, range 0-1
    with pytest.raises(ExportError, match="outside the model's declared range.*--value-range"):
        _zoo_export(tmp_path, build("resnet", (1, 32, 32), 10), x=x)


def test_parity_inputs_stored_compactly_and_verified(tmp_path):
    """uint8 images stay uint8; a float range uint8 cannot hold is kept as float16 — both verify."""
    from edgeadapt.core.bundle import InputSpec
    from edgeadapt.core.tensorfile import load_params
    from tests.export_zoo import build

    x = np.random.default_rng(0).uniform(-1, 1, (64, 1, 32, 32)).astype(np.float32)
    _zoo_export(tmp_path, build("groupnorm", (1, 32, 32), 10), x=x,
                input=InputSpec(shape=[1, 32, 32], value_range=(-1.0, 1.0)))
    calib = load_params(tmp_path / "b" / "calib.safetensors")
    assert calib["parity.input"].dtype == np.float16 and calib["parity.input"].shape == (16, 1, 32, 32)
    assert all(v.dtype != np.float64 for v in calib.values())  # calibration state is float32
    assert verify_bundle(tmp_path / "b", student_model="tests.export_zoo:x")["ok"]


def test_legacy_float32_parity_inputs_still_verify(tmp_path):
    """Bundles written before the codec stored parity inputs as normalized float32: verify reads both."""
    from edgeadapt.core import bundle as B
    from edgeadapt.core.tensorfile import load_params, save_params
    from tests.export_zoo import build

    _zoo_export(tmp_path, build("resnet", (1, 32, 32), 10))
    path = tmp_path / "b"
    calib = load_params(path / B.CALIB)
    calib["parity.input"] = Bundle(path).preprocess(calib["parity.input"])
    save_params(calib, path / B.CALIB)
    manifest = B.read_manifest(path)
    manifest.files.update(B.hash_files(path, [B.CALIB]))
    B.write_manifest(path, manifest)
    res = verify_bundle(path, student_model="tests.export_zoo:x")
    assert res["ok"], res["problems"]


def test_weights_stored_once_graphs_reference_source(tmp_path):
    """Both graphs keep no inline copy of the weights: their initializers point into source.safetensors."""
    from edgeadapt.core import bundle as B
    from tests.export_zoo import build

    _zoo_export(tmp_path, build("resnet", (1, 32, 32), 10))
    path = tmp_path / "b"
    source = (path / B.SOURCE_WEIGHTS).stat().st_size
    for graph in (B.ADAPTIVE_GRAPH, B.STATIC_GRAPH):
        m = onnx.load(str(path / graph), load_external_data=False)
        inline = sum(len(t.raw_data) for t in m.graph.initializer)
        external = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {
            B.SOURCE_WEIGHTS}
        assert inline < 0.1 * source, (graph, inline, source)  # static: only the adaptable tensors inline
    # a changed weights file is a changed bundle
    data = bytearray((path / B.SOURCE_WEIGHTS).read_bytes())
    data[-5] ^= 0x01
    (path / B.SOURCE_WEIGHTS).write_bytes(bytes(data))
    res = verify_bundle(path, student_model="tests.export_zoo:x")
    assert not res["ok"] and any("source.safetensors" in p for p in res["problems"])


def test_ood_fit_plan_falls_back_and_warns():
    from edgeadapt.export.exporter import ood_fit_plan

    names = ["msp", "energy", "mahalanobis", "rmds", "vim"]
    y = np.arange(64) % 1000  # 64 samples for 1,000 classes
    plain, agnostic, notes = ood_fit_plan(y, 1000, 512, names, 51)
    assert agnostic == ["mahalanobis"] and "rmds" not in plain and "mahalanobis" not in plain
    assert {"msp", "energy", "vim"} <= set(plain)
    assert any("class-agnostic" in n and "rmds left out" in n for n in notes)
    assert any("< 2 x 512" in n for n in notes)
    y = np.arange(2000) % 10  # plenty: no fallback, no warning
    plain, agnostic, notes = ood_fit_plan(y, 10, 64, names, 1600)
    assert plain == names and agnostic == [] and notes == []
    y = np.concatenate([np.arange(1000) % 9, [9, 9]])  # one rare class: warned, still class-conditional
    plain, agnostic, notes = ood_fit_plan(y, 10, 64, names, 800)
    assert plain == names and agnostic == [] and len(notes) == 1 and "1 of 10 classes" in notes[0]


def test_too_few_calibration_samples_per_class_recorded(tmp_path):
    import json

    from safetensors import safe_open

    from edgeadapt.device.ood import load_all
    from tests.export_zoo import build

    manifest = _zoo_export(tmp_path, build("resnet", (1, 32, 32), 40), classes=40)
    assert any("class-agnostic" in w for w in manifest.warnings)
    with safe_open(str(tmp_path / "b" / "calib.safetensors"), "np") as f:
        assert json.loads(f.metadata()["warnings"]) == manifest.warnings
    b = Bundle(tmp_path / "b")
    dets = load_all(b.calib, b.calib["head.weight"], b.calib["head.bias"])
    assert "rmds" not in dets and int(b.calib["ood.mahalanobis.present"].sum()) == 1  # one Gaussian


def test_float32_ood_state_scores_like_float64():
    from edgeadapt.device.ood import fit_all, load_all

    rng = np.random.default_rng(0)
    f = np.maximum(rng.normal(size=(80, 48)) @ rng.normal(size=(48, 48)) * 0.1, 0).astype(np.float32)  # N < 2D
    w, b = rng.normal(size=(10, 48)).astype(np.float32), rng.normal(size=10).astype(np.float32)
    state = fit_all(f, f @ w.T + b, np.arange(80) % 10, w, b, names=["mahalanobis", "rmds", "vim"])
    d64 = load_all(state, w, b)
    d32 = load_all({k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in state.items()}, w, b)
    ft = np.maximum(rng.normal(size=(50, 48)) @ rng.normal(size=(48, 48)) * 0.1, 0).astype(np.float32)
    for name in d64:
        s64, s32 = d64[name].score(ft @ w.T + b, ft), d32[name].score(ft @ w.T + b, ft)
        assert np.abs(s64 - s32).max() <= 1e-5 * np.abs(s64).max(), name


@pytest.fixture(scope="module")
def rgb_cli_files(tmp_path_factory):
    from tests.export_zoo import ErfinvNet, RGBResNet

    d = tmp_path_factory.mktemp("rgbcli")
    torch.manual_seed(0)
    save_file(RGBResNet().state_dict(), str(d / "rgb.safetensors"))
    save_file(ErfinvNet().state_dict(), str(d / "erf.safetensors"))
    rng = np.random.default_rng(0)
    np.savez(d / "rgb.npz", x=rng.integers(0, 256, (64, 3, 40, 40), dtype=np.uint8), y=rng.integers(0, 7, 64))
    np.savez(d / "gray.npz", x=rng.integers(0, 256, (64, 1, 32, 32), dtype=np.uint8), y=rng.integers(0, 10, 64))
    (d / "profile.toml").write_text('[profile]\nname = "t"\ncalib_samples = 64\nparity_batch = 16\n')
    names = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark", "tiger shark",
             "hammerhead, hammerhead shark", "electric ray, crampfish", "stingray"]
    (d / "labels.txt").write_text("\n".join(names) + "\n\n")
    return d, names


def test_cli_input_spec_labels_file_and_shape_from_model(rgb_cli_files):
    import json

    d, names = rgb_cli_files
    out = d / "bundle"
    r = runner.invoke(app, ["export", "--model", "tests.export_zoo:RGBResNet", "--weights", str(d / "rgb.safetensors"),
                            "--calib", str(d / "rgb.npz"), "--profile", str(d / "profile.toml"), "--out", str(out),
                            "--labels-file", str(d / "labels.txt"), "--mean", "0.485,0.456,0.406",
                            "--std", "0.229,0.224,0.225", "--value-range", "0,1"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["labels"] == names  # names with commas survive
    assert m["input"]["shape"] == [3, 40, 40]  # read from the model (no --input-shape)
    assert m["input"]["mean"] == [0.485, 0.456, 0.406] and m["input"]["std"] == [0.229, 0.224, 0.225]
    assert m["input"]["value_range"] == [0.0, 1.0] and m["input"]["uint8_scale"] == pytest.approx(1 / 255)
    r = runner.invoke(app, ["bundle", "verify", str(out), "--student-model", "tests.export_zoo:RGBResNet"])
    assert r.exit_code == 0, r.output
    # values in 0..255: uint8 maps 1:1 (uint8 scale 1), and float calibration data must then be in 0..255
    r = runner.invoke(app, ["export", "--model", "tests.export_zoo:RGBResNet", "--weights", str(d / "rgb.safetensors"),
                            "--calib", str(d / "rgb.npz"), "--profile", str(d / "profile.toml"), "--out",
                            str(d / "b255"), "--value-range", "0,255", "--mean", "120", "--std", "60", "--json"])
    assert r.exit_code == 0, r.output
    spec = json.loads(r.stdout)["input"]
    assert spec["uint8_scale"] == 1.0 and spec["value_range"] == [0.0, 255.0] and spec["mean"] == [120.0]
    assert [f"class_{i}" for i in range(7)] == json.loads(r.stdout)["labels"]  # 7 classes, no labels given


@pytest.mark.parametrize("args,message", [
    (["--model", "tests.export_zoo:ErfinvNet", "--weights", "erf.safetensors", "--calib", "gray.npz"],
     "operator aten::erfinv cannot be exported"),
    (["--model", "tests.export_zoo:RGBResNet", "--weights", "rgb.safetensors", "--calib", "rgb.npz",
      "--mean", "0.5,0.5"], "--mean/--std"),
    (["--model", "tests.export_zoo:RGBResNet", "--weights", "rgb.safetensors", "--calib", "rgb.npz",
      "--value-range", "1,0"], "LOW < HIGH"),
    (["--model", "tests.export_zoo:RGBResNet", "--weights", "rgb.safetensors", "--calib", "rgb.npz",
      "--labels-file", "missing.txt"], "does not exist"),
])
def test_cli_refusals_are_one_line_exit_2(rgb_cli_files, args, message):
    d, _ = rgb_cli_files
    args = [str(d / a) if a.endswith((".safetensors", ".npz", ".txt")) else a for a in args]
    r = runner.invoke(app, ["export", *args, "--profile", str(d / "profile.toml"), "--out", str(d / "bad")])
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output and "graph(" not in r.output
    assert not (d / "bad").exists()


def test_default_adapter_targets_unchanged():
    """Bundles record only the patterns; the cloud re-inserts adapters from them, so the default selection
    (no kind selector) must stay what it was: dense k>1 convolutions but the stem."""
    from edgeadapt.models.adapters import adapter_targets

    for arch in ("resnet_edge", "mobilenet_tiny", "resnet_teacher"):
        m = build_arch(arch)
        old = [n for n, c in m.named_modules() if isinstance(c, torch.nn.Conv2d) and c.groups == 1
               and c.kernel_size != (1, 1)]
        assert adapter_targets(m) == old[1:]
        assert adapter_targets(m, ["layer*"]) == [n for n in old if n.startswith("layer")]


@pytest.mark.parametrize("fam,patterns", [("mobilenetv3", ["kind:pointwise"]), ("vit", ["kind:linear"])])
def test_pointwise_and_linear_adapters_export_and_rebuild_in_the_cloud(tmp_path, fam, patterns):
    from edgeadapt.cloud.edge_model import rebuild_edge_model
    from edgeadapt.core import bundle as B
    from edgeadapt.core.tensorfile import load_params
    from edgeadapt.export.verify import parity_input
    from tests.export_zoo import build

    kwargs = {"family": fam, "input_shape": [1, 32, 32], "num_classes": 10}
    model = build(**kwargs)
    targets = insert_adapters(model, 2, patterns)
    mods = dict(model.named_modules())
    if fam == "mobilenetv3":  # every dense 1x1 conv, no depthwise one
        assert targets and all(mods[t].kernel_size == (1, 1) and mods[t].groups == 1 for t in targets)
    else:  # the token MLPs; not the head, not the attention projections (MHA never calls their forward)
        assert targets == [f"layers.{i}.mlp.{j}" for i in range(2) for j in (0, 2)]
    manifest = _zoo_export(tmp_path, model, arch_kwargs=kwargs,
                           adapters={"rank": 2, "patterns": patterns, "targets": targets})
    assert {t.layer for t in manifest.adaptable if t.kind == "adapter"} == {f"{t}.adapter" for t in targets}
    path = tmp_path / "b"
    assert verify_bundle(path, student_model="tests.export_zoo:build")["ok"]
    # the cloud rebuilds the same adapters from the recorded patterns, and the weights from source.safetensors
    rebuilt = rebuild_edge_model(path, student_model="tests.export_zoo:build")
    calib = load_params(path / B.CALIB)
    with torch.no_grad():
        out = rebuilt(torch.from_numpy(parity_input(calib, manifest))).numpy()
    assert np.abs(out - calib["parity.logits"]).max() < 1e-4
    # an adapter update reaches the device's graph: a non-zero up-projection changes the logits
    import onnxruntime as ort

    from edgeadapt.device.backend import session_options

    b = Bundle(path)
    s = ort.InferenceSession(str(b.adaptive_graph), session_options(1), providers=["CPUExecutionProvider"])
    x = parity_input(calib, manifest)[:4]
    feeds = {"input": x, **b.params}
    if manifest.norm_layers:
        feeds["stat_mix"] = np.zeros(len(manifest.norm_layers), np.float32)
    base = s.run(["logits"], feeds)[0]
    up = f"{targets[-1]}.adapter.up.weight"
    moved = {**b.params, up: np.random.default_rng(0).normal(0, 0.5, b.params[up].shape).astype(np.float32)}
    assert np.abs(s.run(["logits"], {**feeds, **moved})[0] - base).max() > 1e-4


@pytest.mark.parametrize("opset", [18, 21])
def test_batchnorm_adaptive_graph_at_newer_opsets(tmp_path, opset):
    """ReduceMean takes its axes as an input from opset 18: the adaptive graph's statistics nodes follow."""
    from tests.export_zoo import build

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 1, 32, 32), dtype=np.uint8)
    manifest = export_bundle(build("resnet", (1, 32, 32), 10), _spec("tests.export_zoo:x"), x, np.arange(64) % 10,
                             tmp_path / "b", ExportProfile(calib_samples=64, parity_batch=16, opset=opset))
    assert manifest.norm_layers
    assert verify_bundle(tmp_path / "b", student_model="tests.export_zoo:x")["ok"]
    from edgeadapt.device.backend import make_backend

    backend = make_backend(Bundle(tmp_path / "b"), threads=1)
    xf = Bundle(tmp_path / "b").preprocess(x[:8])
    mixed = backend.run_adaptive(xf, Bundle(tmp_path / "b").params, np.ones(len(manifest.norm_layers), np.float32))
    assert np.abs(mixed.logits - backend.run_static(xf).logits).max() > 1e-3  # batch statistics really used
    assert all(np.isfinite(v).all() for pair in mixed.batch_stats.values() for v in pair)
