"""Training a reference model (tiny), safetensors weights with metadata, loading, and the `edgeadapt train` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgeadapt.cli import app
from edgeadapt.datasets import fmnist
from edgeadapt.models import training
from edgeadapt.models.reference import build_arch

HAVE_FMNIST = all(
    (fmnist.fmnist_dir() / f).exists() or (fmnist.fmnist_dir() / (f + ".gz")).exists()
    for f in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte")
)
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist is not installed")


@pytest.fixture(scope="module")
def tiny_data():
    if not HAVE_FMNIST:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    x_tr, y_tr = fmnist.load_fmnist("train")
    x_te, y_te = fmnist.load_fmnist("test")
    return x_tr[:512], y_tr[:512], x_te[:256], y_te[:256]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("w") / "edge.safetensors"
    summary = training.train_model("resnet_edge", out, epochs=1, seed=0, progress=False, threads=2, data=tiny_data)
    return out, summary


def test_train_writes_safetensors_with_metadata(trained):
    out, summary = trained
    assert out.exists() and summary["path"] == str(out)
    assert summary["train_n"] == 512 and summary["test_n"] == 256 and summary["steps"] == 4
    assert 0.0 <= summary["clean_acc"] <= 1.0
    meta = training.read_metadata(out)
    assert meta["arch"] == "resnet_edge" and meta["epochs"] == 1.0 and meta["augment"] is False
    assert meta["clean_acc"] == pytest.approx(summary["clean_acc"])
    assert meta["format"] == training.WEIGHTS_FORMAT and meta["arch_kwargs"] == {}
    assert out.read_bytes()[8:9] == b"{"  # safetensors header, not a pickle


def test_load_weights_roundtrip(trained, tmp_path, tiny_data):
    out, summary = trained
    model = training.load_weights(build_arch("resnet_edge"), out).eval()
    ref = training.load_reference_model(out)
    x = tiny_data[2][:64]
    assert np.array_equal(training.predict(model, x), training.predict(ref, x))
    assert training.evaluate(ref, tiny_data[2], tiny_data[3]) == pytest.approx(summary["clean_acc"])
    # .pt state dicts load with weights_only=True, including a DataParallel "module." prefix
    pt = tmp_path / "w.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, pt)
    again = training.load_weights(build_arch("resnet_edge"), pt)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_load_weights_errors(trained, tmp_path):
    out, _ = trained
    with pytest.raises(FileNotFoundError, match="not found"):
        training.load_weights(build_arch("resnet_edge"), tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="missing key") as err:
        training.load_weights(build_arch("resnet_teacher"), out)
    assert "layers." in str(err.value)
    with pytest.raises(ValueError, match="unexpected key"):
        training.load_weights(build_arch("mobilenet_tiny"), out)
    bad = tmp_path / "model.pt"
    torch.save({"not": "tensors", "n": 3}, bad)
    with pytest.raises(ValueError, match="state dict"):
        training.load_weights(build_arch("resnet_edge"), bad)
    txt = tmp_path / "w.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match="unsupported"):
        training.load_weights(build_arch("resnet_edge"), txt)


def test_unknown_arch():
    with pytest.raises(ValueError, match="resnet_edge"):
        training.train_model("resnet_huge", "/tmp/never.safetensors", progress=False)
    result = CliRunner().invoke(app, ["train", "--arch", "resnet_huge", "--out", "/tmp/never.safetensors"])
    assert result.exit_code == 2
    assert "resnet_huge" in result.output and "resnet_teacher" in result.output


def test_generic_augment_is_deterministic_and_bounded():
    x = torch.rand(32, 1, 32, 32)
    a = training.generic_augment(x, torch.Generator().manual_seed(3))
    b = training.generic_augment(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0 and not torch.equal(a, x)


@needs_fmnist
def test_cli_train_then_cached(tmp_path):
    out = tmp_path / "e.safetensors"
    args = ["train", "--arch", "resnet_edge", "--out", str(out), "--limit", "256", "--test-limit", "128",
            "--epochs", "1", "--threads", "2", "--json"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    info = json.loads(first.stdout)
    assert info["cached"] is False and info["train_n"] == 256 and out.exists()
    second = json.loads(CliRunner().invoke(app, args).stdout)
    assert second["cached"] is True and second["clean_acc"] == pytest.approx(info["clean_acc"])
    bad = CliRunner().invoke(app, ["train", "--arch", "resnet_edge", "--out", str(tmp_path / "x.pt")])
    assert bad.exit_code == 2 and ".safetensors" in bad.output
