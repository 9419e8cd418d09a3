"""FMNIST loading, the FMNIST-C stream build (tiny), caching and the `edgeadapt data fmnist-c` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeadapt.cli import app
from edgeadapt.datasets import fmnist
from edgeadapt.datasets.fmnist import CORRUPTIONS, build_fmnist_c, load_fmnist, load_stream, stream_filename

HAVE_FMNIST = all(
    (fmnist.fmnist_dir() / f).exists() or (fmnist.fmnist_dir() / (f + ".gz")).exists()
    for f in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte")
)
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist is not installed")

TWO = ["impulse_noise", "frost"]  # one with a per-image seed, one with the frost-photo cache


def test_corruption_list_is_the_standard_order():
    assert len(CORRUPTIONS) == 15
    assert CORRUPTIONS[0] == "gaussian_noise" and CORRUPTIONS[-1] == "jpeg_compression"
    from imagecorruptions import get_corruption_names

    assert list(CORRUPTIONS) == get_corruption_names("common")


@needs_fmnist
def test_load_fmnist_pads_to_32():
    x, y = load_fmnist("test")
    assert x.shape == (10000, 1, 32, 32) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
    border = np.concatenate([x[:, :, :2].ravel(), x[:, :, -2:].ravel(), x[:, :, :, :2].ravel(), x[:, :, :, -2:].ravel()])
    assert border.max() == 0
    assert x[:, :, 2:-2, 2:-2].max() == 255
    with pytest.raises(ValueError, match="split"):
        load_fmnist("val")


def test_missing_dataset_message(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEADAPT_FMNIST_DIR", str(tmp_path))
    with pytest.raises(fmnist.FMNISTMissingError, match="dataset-fashion-mnist"):
        load_fmnist("test")


@needs_fmnist
def test_tiny_build_is_deterministic_and_cached(tmp_path, monkeypatch):
    a = build_fmnist_c(tmp_path / "a", per_corruption=20, corruptions=TWO, seed=0, progress=False)
    b = build_fmnist_c(tmp_path / "b", per_corruption=20, corruptions=TWO, seed=0, progress=False)
    c = build_fmnist_c(tmp_path / "c", per_corruption=20, corruptions=TWO, seed=1, progress=False)
    assert a.name == stream_filename(5, 20, TWO, 0) == b.name
    assert (tmp_path / "a" / "fmnist_train.npz").exists() and (tmp_path / "a" / "fmnist_test.npz").exists()
    sa, sb, sc = load_stream(a), load_stream(b), load_stream(c)
    assert sa["x"].shape == (40, 1, 32, 32) and sa["x"].dtype == np.uint8
    assert sa["y"].dtype == np.int64 and sa["corruption"].dtype == np.int64
    assert sa["corruption_names"] == TWO and sa["corruption"].tolist() == [0] * 20 + [1] * 20
    assert sa["severity"] == 5 and sa["seed"] == 0 and sa["per_corruption"] == 20
    x_test, y_test = load_fmnist("test")
    assert np.array_equal(sa["y"], np.concatenate([y_test[:20]] * 2))
    for key in ("x", "y", "corruption"):
        assert np.array_equal(sa[key], sb[key])
    assert not np.array_equal(sa["x"], sc["x"])
    assert not np.array_equal(sa["x"][:20], x_test[:20]) and not np.array_equal(sa["x"][20:], x_test[:20])
    # loadable without pickle, names stored as fixed-width unicode
    with np.load(a, allow_pickle=False) as raw:
        assert raw["corruption_names"].dtype.kind == "U"
    # a corruption's images do not depend on the other corruptions, and a smaller build is a prefix
    d = build_fmnist_c(tmp_path / "d", per_corruption=10, corruptions=["frost"], seed=0, progress=False)
    assert np.array_equal(load_stream(d)["x"], sa["x"][20:30])

    # cached: a second call returns at once without corrupting anything
    def boom(*args, **kwargs):
        raise AssertionError("rebuilt a cached stream")

    monkeypatch.setattr(fmnist, "_corrupt_chunk", boom)
    assert build_fmnist_c(tmp_path / "a", per_corruption=20, corruptions=TWO, seed=0, progress=False) == a


def test_build_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="gaussian_noise"):
        build_fmnist_c(tmp_path, corruptions=["nope"], progress=False)
    with pytest.raises(ValueError, match="severity"):
        build_fmnist_c(tmp_path, severity=6, corruptions=["fog"], progress=False)


def test_cli_rejects_unknown_corruption(tmp_path):
    result = CliRunner().invoke(app, ["data", "fmnist-c", "--out", str(tmp_path), "--corruptions", "fog,bogus"])
    assert result.exit_code == 2
    assert "bogus" in result.output and "gaussian_noise" in result.output and "jpeg_compression" in result.output


def test_cli_missing_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEADAPT_FMNIST_DIR", str(tmp_path / "none"))
    result = CliRunner().invoke(app, ["data", "fmnist-c", "--out", str(tmp_path), "--corruptions", "fog"])
    assert result.exit_code == 2
    assert "dataset-fashion-mnist" in result.output and "scripts/setup" in result.output


@needs_fmnist
def test_cli_json_and_cache(tmp_path):
    args = ["data", "fmnist-c", "--out", str(tmp_path), "--corruptions", "contrast,fog", "--per-corruption", "5",
            "--json"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    info = json.loads(first.stdout)
    assert info["n"] == 10 and info["cached"] is False and info["seconds"] >= 0
    assert load_stream(info["path"])["x"].shape == (10, 1, 32, 32)
    second = json.loads(CliRunner().invoke(app, args).stdout)
    assert second["cached"] is True and second["path"] == info["path"]
