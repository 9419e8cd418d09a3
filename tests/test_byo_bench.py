"""Bring your own model and data to the benchmarks (issue 15 item 6): `data folder` builds a stream from an
image-folder tree; `bench runtime` measures any bundle without a stream; `bench accuracy`'s loop rows take your
teacher (a module written here) and your bundle's architecture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgeadapt.cli import app

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "emu")  # written unsorted below: labels are the sorted names


def _tree(root: Path, n: int = 4, size=(20, 24), mode: str = "RGB") -> Path:
    """Class k's images are filled with grey level 60·k + 30 (noise ±10): the label can be read off the pixels."""
    rng = np.random.default_rng(0)
    for ci, name in reversed(list(enumerate(CLASSES))):
        (root / name / "sub").mkdir(parents=True)
        for i in range(n):
            shape = (*size, 3) if mode == "RGB" else size
            a = np.clip(60 * ci + 30 + rng.integers(-10, 11, shape), 0, 255).astype(np.uint8)
            where = root / name / ("sub" if i % 2 else "") / f"{i}.png"
            Image.fromarray(a, mode).save(where)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    return root


def _run(*args: str) -> dict:
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_data_folder_clean_stream(tmp_path):
    tree = _tree(tmp_path / "imgs")
    res = _run("data", "folder", str(tree), "--out", str(tmp_path / "s.npz"), "--size", "16,18")
    assert res["classes"] == list(CLASSES) and res["mode"] == "RGB" and res["skipped_files"] == 1
    d = np.load(tmp_path / "s.npz")
    assert d["x"].shape == (12, 3, 16, 18) and d["x"].dtype == np.uint8
    assert list(d["corruption_names"]) == ["clean"] and (d["corruption"] == 0).all()
    assert np.array_equal(np.round((d["x"].mean(axis=(1, 2, 3)) - 30) / 60), d["y"])  # each label fits its image
    assert not np.array_equal(d["y"], np.sort(d["y"]))  # shuffled, not class-sorted
    assert (tmp_path / "s.labels.txt").read_text().splitlines() == list(CLASSES)


def test_data_folder_corrupted_grey_domains(tmp_path):
    tree = _tree(tmp_path / "imgs", mode="L")
    out = tmp_path / "c.npz"
    r = CliRunner().invoke(app, ["data", "folder", str(tree), "--out", str(out), "--corrupt", "fog:3"])
    assert r.exit_code != 0 and "at least 32x32" in r.output  # imagecorruptions' limit, named
    res = _run("data", "folder", str(tree), "--out", str(out), "--gray", "--size", "32,40", "--corrupt",
               "gaussian_noise:5,fog:3")
    assert res["domains"] == ["gaussian_noise-s5", "fog-s3"] and res["shape"] == [1, 32, 40]
    d = np.load(out)
    assert d["x"].shape == (24, 1, 32, 40) and list(np.bincount(d["corruption"])) == [12, 12]
    assert np.array_equal(d["y"][:12], d["y"][12:])  # the same images in each domain
    noisy = d["x"][:12].astype(int)
    assert np.abs(noisy - np.round(noisy.mean(axis=(1, 2, 3), keepdims=True))).mean() > 15  # corrupted: noisy


@pytest.mark.parametrize("args,words", [
    (["--corrupt", "fog:7"], "severity must be 1..5"),
    (["--corrupt", "smudge:2"], "unknown corruption"),
    (["--size", "16"], "give H,W"),
])
def test_data_folder_refusals(tmp_path, args, words):
    tree = _tree(tmp_path / "imgs", n=1)
    r = CliRunner().invoke(app, ["data", "folder", str(tree), "--out", str(tmp_path / "s.npz"), *args])
    assert r.exit_code != 0 and words in r.output, r.output


def test_data_folder_needs_two_classes(tmp_path):
    (tmp_path / "one" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "one" / "a" / "x.png")
    r = CliRunner().invoke(app, ["data", "folder", str(tmp_path / "one"), "--out", str(tmp_path / "s.npz")])
    assert r.exit_code != 0 and "at least two subfolders" in r.output


TEACHER = '''
"""A user's own models (written by the test): the teacher and the bundle's architecture."""
from tests.export_zoo import build


def teacher():
    return build("resnet", (3, 32, 32), 3, seed=1)


def student(**kwargs):
    return build("resnet", (3, 32, 32), 3)
'''


@pytest.fixture
def rgb_bundle(tmp_path, monkeypatch):
    """A tiny 3x32x32, 3-class ResNet of the tests' architecture matrix, exported for a fresh cloud home; the
    user's module (``my_models``: teacher and student factories) written to tmp_path/user and importable."""
    from edgeadapt.cloud.admin import init_home
    from edgeadapt.core.signing import load_public_key_b64
    from edgeadapt.export.exporter import ExportSpec, export_bundle
    from edgeadapt.export.profile import ExportProfile
    from tests.export_zoo import build

    user = tmp_path / "user"
    user.mkdir()
    (user / "my_models.py").write_text(TEACHER)
    monkeypatch.syspath_prepend(str(user))
    home = tmp_path / "home"
    init_home(home)
    model = build("resnet", (3, 32, 32), 3)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (96, 3, 32, 32), dtype=np.uint8)
    spec = ExportSpec(arch="my_models:student", model_name="byo", labels=list(CLASSES), input_shape=[3, 32, 32],
                      cloud_public_key=load_public_key_b64(home))
    export_bundle(model, spec, x, rng.integers(0, 3, len(x)), tmp_path / "bundle",
                  ExportProfile(calib_samples=96, parity_batch=16))
    return tmp_path / "bundle", home


def test_bench_runtime_without_a_stream(rgb_bundle):
    bundle, _ = rgb_bundle
    res = _run("bench", "runtime", "--bundle", str(bundle), "--batch", "4", "--http-batch", "3", "--requests", "3",
               "--seconds", "0.2", "--threads", "1", "--method", "ema_stats", "--student-model",
               "my_models:student")
    assert res["inputs"] == "synthesized" and res["http_batch"] == 3 and res["batch"] == 4
    assert res["static_img_s"] > 0 and res["adaptive_img_s"] > 0 and res["tent_torch_img_s"] > 0
    assert res["http_requests"] == 3



def test_bench_accuracy_loop_with_your_teacher_bundle_and_data(rgb_bundle, tmp_path):
    """The loop rows on a bundle, stream and teacher of the user's: real cloud and device processes over HTTP, PNG
    uploads of the RGB samples accepted, a round published and applied."""
    import my_models
    from safetensors.torch import save_file

    bundle, home = rgb_bundle
    work = tmp_path / "user"
    save_file({k: v.contiguous() for k, v in my_models.teacher().state_dict().items()},
              str(work / "teacher.safetensors"))
    tree = _tree(tmp_path / "imgs", n=8, size=(32, 32))
    _run("data", "folder", str(tree), "--out", str(work / "stream.npz"), "--corrupt", "gaussian_noise:3,contrast:4")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEADAPT_CLOUD_TRAINER__MIN_STEPS_PER_ROUND": "2"}
    r = subprocess.run([sys.executable, "-m", "edgeadapt", "bench", "accuracy", "--bundle", str(bundle), "--data",
                        str(work / "stream.npz"), "--rows", "source,loop_upload_all", "--batch", "8",
                        "--sync-every", "2", "--teacher", "my_models:teacher", "--teacher-weights",
                        str(work / "teacher.safetensors"), "--student-model", "my_models:student", "--cloud-home",
                        str(home), "--upload-encoding", "png", "--json"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout)
    loop = res["rows"]["loop_upload_all"]
    assert res["n"] == 48 and 0 <= res["rows"]["source"]["acc"] <= 1
    assert loop["upload_encoding"]["effective"] == "png" and loop["upload_encoding"]["encoded"] > 0
    assert loop["upload_frac"] > 0 and loop["trainings"] >= 1 and loop["versions_applied"] >= 1, loop
