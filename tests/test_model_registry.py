"""Several models per cloud (issue 18 item 1): a second model registered with `cloud models add` next to the
configured one (1x32x32, 10 classes, and an RGB 3x32x32 model of 120 classes written here), a device registered
for each, over real HTTP: each device's uploads land in its own model, each model trains its own versions and
serves its own devices their packages; a device that sends another model's samples is refused, and says so.

The in-process tests drive the HTTP API directly; the slow one runs real device processes that apply the
versions (EDGEADAPT_SLOW=1 / ``-m slow``)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeadapt.cli import app
from tests.procs import Proc, device_proc, wait_for

pytest_plugins = ["tests.cloud_fixtures"]

RGB_SHAPE = [3, 32, 32]
RGB_CLASSES = 120
RGB_MODEL = "rgb-120"
GRAY_MODEL = "fmnist-edge"
runner = CliRunner()


def rgb_net():
    """The second model's architecture (student and teacher): a small CNN with BatchNorm."""
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, RGB_CLASSES))


@pytest.fixture(scope="module")
def rgb_model(cloud_env, tmp_path_factory) -> tuple[Path, Path]:
    """(bundle, teacher weights) of the RGB model, exported for the test cloud's key."""
    import torch
    from safetensors.torch import save_file

    from edgeadapt.export.exporter import ExportSpec, export_bundle
    from edgeadapt.export.profile import ExportProfile

    torch.manual_seed(0)
    model = rgb_net()
    model.train()
    with torch.no_grad():
        model(torch.rand(64, *RGB_SHAPE))
    model.eval()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, *RGB_SHAPE), dtype=np.uint8)
    y = rng.integers(0, RGB_CLASSES, 64)
    root = tmp_path_factory.mktemp("rgb-model")
    export_bundle(model, ExportSpec(arch="tests.test_model_registry:rgb_net", model_name=RGB_MODEL,
                                    labels=[f"c{i}" for i in range(RGB_CLASSES)], input_shape=RGB_SHAPE,
                                    cloud_public_key=cloud_env.public_key),
                  x, y, root / "bundle", ExportProfile(calib_samples=64))
    teacher = root / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(teacher))
    return root / "bundle", teacher


def cli(cloud, *args: str):
    """`edgeadapt cloud ...` on the live cloud's home and store."""
    store_dir = cloud.service.root_store.root
    return runner.invoke(app, ["cloud", *args], env={"EDGEADAPT_CLOUD_STORE_DIR": str(store_dir),
                                                     "EDGEADAPT_CLOUD_HOME": str(cloud.service.home)})


def register_rgb(cloud, rgb_model) -> None:
    bundle, teacher = rgb_model
    r = cli(cloud, "models", "add", "--bundle", str(bundle), "--teacher", "tests.test_model_registry:rgb_net",
            "--teacher-weights", str(teacher), "--student-model", "tests.test_model_registry:rgb_net")
    assert r.exit_code == 0, r.output


def add_device(cloud, name: str, model: str | None) -> str:
    r = cli(cloud, "devices", "add", name, "--json", *(["--model", model] if model else []))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["model"] == model
    return out["token"]


def rgb_body(xs: np.ndarray, model: str = RGB_MODEL) -> dict:
    import base64

    return {"model": model, "samples": [
        {"id": uuid.uuid4().hex, "input": {"dtype": "uint8", "shape": list(x.shape),
                                           "data": base64.b64encode(np.ascontiguousarray(x).tobytes()).decode()},
         "logits": [0.0] * RGB_CLASSES, "entropy": 1.0, "ood_score": 0.0, "novel": False, "param_version": 0}
        for x in xs]}


def test_models_add_checks_and_lists(live_cloud, rgb_model, cloud_env, tmp_path):
    """`cloud models add` refuses a missing or bad bundle, a missing weights file, an unknown teacher, a teacher of
    another number of classes and a duplicate, each with a clear error; `cloud models` lists both models."""
    cloud = live_cloud()
    bundle, teacher = rgb_model
    rgb = ["--student-model", "tests.test_model_registry:rgb_net"]
    cases = [
        (["--bundle", str(tmp_path / "nope"), "--teacher", "resnet_edge"], "no such directory"),
        (["--bundle", str(tmp_path), "--teacher", "resnet_edge"], "is not a valid bundle"),
        (["--bundle", str(bundle), "--teacher", "no_such_arch", *rgb], "unknown teacher 'no_such_arch'"),
        (["--bundle", str(bundle), "--teacher", "tests.test_model_registry:rgb_net", "--teacher-weights",
          str(tmp_path / "missing.safetensors"), *rgb], "no such file"),
        (["--bundle", str(bundle), "--teacher", "resnet_edge", *rgb], "fails on one input of the bundle's shape"),
        (["--bundle", str(bundle), "--teacher", "resnet_edge", "--teacher-kwargs", '{"in_ch": 3}', *rgb],
         "answers [10] logits per sample; the bundle's model 'rgb-120' has 120 classes"),
        (["--bundle", str(bundle), "--teacher", "resnet_edge", "--teacher-kwargs", "[3]", *rgb], "a JSON object"),
        (["--bundle", str(cloud_env.bundle), "--teacher", "resnet_edge"], "'fmnist-edge' is already registered"),
    ]
    for args, words in cases:
        r = cli(cloud, "models", "add", *args)
        assert r.exit_code == 2 and words in " ".join(r.output.split()), (args, r.output)
    assert [m["model"] for m in json.loads(cli(cloud, "models", "--json").stdout)] == [GRAY_MODEL]
    register_rgb(cloud, rgb_model)
    rows = {m["model"]: m for m in json.loads(cli(cloud, "models", "--json").stdout)}
    assert (rows[GRAY_MODEL]["input_shape"], rows[GRAY_MODEL]["num_classes"]) == ([1, 32, 32], 10)
    assert (rows[RGB_MODEL]["input_shape"], rows[RGB_MODEL]["num_classes"]) == (RGB_SHAPE, RGB_CLASSES)
    assert rows[RGB_MODEL]["versions"] == 1 and rows[RGB_MODEL]["teacher"] == "tests.test_model_registry:rgb_net"
    table = cli(cloud, "models")
    assert table.exit_code == 0 and RGB_MODEL in table.stdout and "3x32x32" in table.stdout, table.output
    # with two models, a device must name its model
    r = cli(cloud, "devices", "add", "cam-x")
    assert r.exit_code == 2 and "name one with --model" in r.output, r.output
    r = cli(cloud, "devices", "add", "cam-x", "--model", "nope")
    assert r.exit_code == 2 and "no model 'nope' registered" in r.output, r.output
    with cloud.client(cloud.admin) as c:
        r = c.post("/v1/admin/devices", json={"name": "cam-y"})
        assert r.status_code == 409 and "name one with --model" in r.text, r.text
        r = c.post("/v1/admin/devices", json={"name": "cam-y", "model": RGB_MODEL})
        assert r.status_code == 201 and r.json()["model"] == RGB_MODEL, r.text
        assert {m["model"] for m in c.get("/v1/admin/models").json()} == {GRAY_MODEL, RGB_MODEL}


def test_two_models_ingest_train_and_serve_their_own_devices(live_cloud, rgb_model, kit):
    """Over real HTTP: each device's uploads go to its model (checked against that model's input contract), each
    model trains its own version 1, and each device's update check gets its own model's package; another model's
    samples, heartbeat or update check from a device are refused, and `cloud devices` says why."""
    cloud = live_cloud(trainer={"gate_tolerance": 1.0})  # the gate is not what this test is about
    register_rgb(cloud, rgb_model)
    gray_token = add_device(cloud, "cam-gray", GRAY_MODEL)
    rgb_token = add_device(cloud, "cam-rgb", RGB_MODEL)
    rng = np.random.default_rng(3)
    gray_x = kit.synthetic_images(64, seed=5, shift=kit.TEST_SHIFT)
    rgb_x = rng.integers(0, 256, (64, *RGB_SHAPE), dtype=np.uint8)
    with cloud.client(gray_token) as g, cloud.client(rgb_token) as c:
        assert g.post("/v1/samples", json=kit.batch_body(gray_x)).json()["accepted"] == 64
        assert c.post("/v1/samples", json=rgb_body(rgb_x)).json()["accepted"] == 64
        # another model's samples from the RGB device: refused by name, nothing stored
        r = c.post("/v1/samples", json=kit.batch_body(gray_x[:4]))
        assert r.status_code == 422 and "model 'fmnist-edge' is not served here to device 'cam-rgb'" in r.text
        assert "this cloud serves 'rgb-120' to it" in r.text, r.text
        # its own model's name on another model's input: refused by its own input contract
        r = c.post("/v1/samples", json=rgb_body(gray_x[:2]))
        assert r.status_code == 422 and "input" in r.text, r.text
        assert g.get("/v1/whoami").json()["input_shape"] == [1, 32, 32]
        assert c.get("/v1/whoami").json()["input_shape"] == RGB_SHAPE
        root = cloud.service.root_store
        assert root.scoped(GRAY_MODEL).count_samples() == 64 and root.scoped(RGB_MODEL).count_samples() == 64
        with cloud.client(cloud.admin) as a:
            gray_round = a.post("/v1/admin/train", timeout=600).json()
            rgb_round = a.post(f"/v1/admin/models/{RGB_MODEL}/train", timeout=600).json()
            assert a.post("/v1/admin/models/nope/train").status_code == 404
        assert gray_round["status"] == "published" and gray_round["version"] == 1, gray_round
        assert rgb_round["status"] == "published" and rgb_round["version"] == 1, rgb_round
        ids = {d.name: str(d.id) for d in root.list_devices()}  # each trained on its own model's uploads only
        assert set(gray_round["by_device"]) == {ids["cam-gray"]} and set(rgb_round["by_device"]) == {ids["cam-rgb"]}
        assert {(v.model, v.version) for v in root.list_versions()} == {(GRAY_MODEL, 0), (GRAY_MODEL, 1),
                                                                     (RGB_MODEL, 0), (RGB_MODEL, 1)}
        for client, model in ((g, GRAY_MODEL), (c, RGB_MODEL)):
            hb = client.post("/v1/heartbeat", json={"model": model, "param_version": 0}).json()
            assert hb["target_version"] == 1 and hb["latest_version"] == 1, hb
            r = client.get("/v1/updates", params={"model": model, "have": 0})
            assert r.status_code == 200 and r.headers["x-edgeadapt-version"] == "1", r.text
            assert r.headers["content-disposition"].startswith(f'attachment; filename="{model}-v0-v1')
            from edgeadapt.core.update_package import read_header

            assert read_header(r.content)["model"] == model
        r = c.get("/v1/updates", params={"model": GRAY_MODEL, "have": 0})
        assert r.status_code == 404 and "not served here to device 'cam-rgb'" in r.text, r.text
        r = c.post("/v1/heartbeat", json={"model": GRAY_MODEL, "param_version": 0})
        assert r.status_code == 422
    rows = {r["name"]: r for r in json.loads(cli(cloud, "devices", "--json").stdout)}
    assert rows["cam-rgb"]["model"] == RGB_MODEL and rows["cam-gray"]["model"] == GRAY_MODEL
    assert any("runs model 'fmnist-edge'; this cloud serves 'rgb-120' to it" in t for t in rows["cam-rgb"]["trouble"])
    assert rows["cam-gray"]["target_version"] == 1 and rows["cam-gray"]["trouble"] == []
    versions = json.loads(cli(cloud, "versions", "--json", "--model", RGB_MODEL).stdout)["versions"]
    assert [(v["model"], v["version"]) for v in versions] == [(RGB_MODEL, 0), (RGB_MODEL, 1)]
    r = cli(cloud, "push", "--version", "0", "--revert")
    assert r.exit_code == 2 and "name one with --model" in r.output, r.output
    r = cli(cloud, "push", "--version", "0", "--revert", "--model", RGB_MODEL, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["version"] == 2, r.output
    assert cloud.service.served(RGB_MODEL).store.target_version("cam-rgb") == 2
    assert cloud.service.store.target_version("cam-gray") == 1  # the other model's rollouts untouched


def _named(dev: Proc, key: str, words: str) -> dict | None:
    h = dev.get("/healthz").json()
    return h if h["status"] == "degraded" and words in h["reasons"].get(key, "") else None


@pytest.mark.slow
def test_devices_of_two_models_apply_their_own_versions(live_cloud, rgb_model, cloud_env, kit, tmp_path):
    """Real device processes: one per model, each uploading, each applying its own model's version 1; a third,
    registered for the RGB model but running the gray bundle, is refused and names it in its health."""
    cloud = live_cloud(trainer={"gate_tolerance": 1.0})
    register_rgb(cloud, rgb_model)
    fast = dict(upload_all=1, upload_interval_s=0.2, update_poll_s=0.2, save_state_every_s=0.5, max_wait_ms=2,
                degraded_after_s=2)
    devs = {name: device_proc(bundle, tmp_path / name, tmp_path / f"{name}.log", cloud.url,
                              add_device(cloud, name, model), **fast)
            for name, bundle, model in (("cam-gray", cloud_env.bundle, GRAY_MODEL),
                                        ("cam-rgb", rgb_model[0], RGB_MODEL),
                                        ("cam-wrong", cloud_env.bundle, RGB_MODEL))}
    try:
        for d in devs.values():
            d.start()
        rng = np.random.default_rng(4)
        for _ in range(4):
            for name, x in (("cam-gray", kit.synthetic_images(16, seed=rng.integers(1 << 30), shift=kit.TEST_SHIFT)),
                            ("cam-wrong", kit.synthetic_images(16, seed=rng.integers(1 << 30))),
                            ("cam-rgb", rng.integers(0, 256, (16, *RGB_SHAPE), dtype=np.uint8))):
                r = devs[name].post("/v1/predict", content=_npy(x), headers={"content-type": "application/x-npy"})
                assert r.status_code == 200, r.text
        root = cloud.service.root_store
        wait_for(lambda: root.scoped(GRAY_MODEL).count_samples() >= 64 and
                 root.scoped(RGB_MODEL).count_samples() >= 64, 60, "each device's uploads in its own model")
        health = wait_for(lambda: _named(devs["cam-wrong"], "uploads_refused", "the cloud does not serve this model"),
                          60, "the wrong-model device to name the refusal")
        assert "not served here to device 'cam-wrong'" in health["reasons"]["uploads_refused"], health
        with cloud.client(cloud.admin) as a:
            assert a.post("/v1/admin/train", timeout=600).json()["version"] == 1
            assert a.post(f"/v1/admin/models/{RGB_MODEL}/train", timeout=600).json()["version"] == 1
        for name in ("cam-gray", "cam-rgb"):
            wait_for(lambda n=name: devs[n].get("/v1/status").json()["param_version"] == 1, 90,
                     f"{name} to apply its model's version 1")
        assert devs["cam-wrong"].get("/v1/status").json()["param_version"] == 0
        assert root.scoped(RGB_MODEL).count_samples() == 64  # nothing of cam-wrong's stored
    finally:
        for d in devs.values():
            d.stop()


def _npy(x: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def test_registered_models_load_at_start_and_one_that_cannot_is_named(live_cloud, rgb_model, cloud_env, kit,
                                                                       tmp_path):
    """A restarted cloud serves every registered model from the start; one whose bundle is gone is a degraded
    reason in its health and its devices get 503 (they keep their uploads), while the other model works on."""
    import shutil

    cloud = live_cloud()
    bundle = shutil.copytree(rgb_model[0], tmp_path / "rgb-copy")
    register_rgb(cloud, (bundle, rgb_model[1]))
    token = add_device(cloud, "cam-rgb", RGB_MODEL)
    store_dir = cloud.service.root_store.root
    again = kit.make_service(cloud_env, store_dir)
    assert set(again.models) == {GRAY_MODEL, RGB_MODEL} and again.models[RGB_MODEL].trainer is not None
    shutil.rmtree(bundle)
    from edgeadapt.cloud.server import ServerThread, create_app

    server = ServerThread(create_app(kit.make_service(cloud_env, store_dir))).start()
    try:
        third = kit.LiveCloud(server.url, server.server.config.app.state.service, cloud_env.admin_token, server)
        assert RGB_MODEL not in third.service.models
        health = third.client().get("/healthz").json()
        assert health["status"] == "degraded" and "not a bundle" in health["reasons"][f"model:{RGB_MODEL}"], health
        with third.client(token) as c:
            r = c.post("/v1/samples", json=rgb_body(np.zeros((1, *RGB_SHAPE), np.uint8)))
            assert r.status_code == 503 and "model 'rgb-120' of device 'cam-rgb' cannot be served now" in r.text, \
                r.text
        with third.client(third.admin) as c:
            gray = c.post("/v1/admin/devices", json={"name": "cam-gray", "model": GRAY_MODEL}).json()["token"]
        with third.client(gray) as c:
            assert c.post("/v1/samples", json=kit.batch_body(kit.synthetic_images(2))).status_code == 200
    finally:
        server.stop()


def series(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics answer, by (name, exact label set), read with prometheus-client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def test_metrics_and_health_are_per_model(live_cloud, rgb_model, kit):
    """Over real HTTP, two models: each device's uploads, duplicates, refusals, heartbeats, bytes, rounds and
    packages move its own model's series on /metrics and not the other's; a model name a client sends is never a
    label; /healthz lists both models with their own shapes, classes, limits, pending uploads, versions and
    trainer state, and keeps its top-level fields the default model's."""
    cloud = live_cloud(trainer={"gate_tolerance": 1.0})
    register_rgb(cloud, rgb_model)
    gray_token = add_device(cloud, "cam-gray", GRAY_MODEL)
    rgb_token = add_device(cloud, "cam-rgb", RGB_MODEL)
    rng = np.random.default_rng(7)
    gray_body = json.dumps(kit.batch_body(kit.synthetic_images(5, seed=2))).encode()
    rgb_body_bytes = json.dumps(rgb_body(rng.integers(0, 256, (12, *RGB_SHAPE), dtype=np.uint8))).encode()
    js = {"content-type": "application/json"}
    with cloud.client(gray_token) as g, cloud.client(rgb_token) as c:
        assert g.post("/v1/samples", content=gray_body, headers=js).json()["accepted"] == 5
        first = c.post("/v1/samples", content=rgb_body_bytes, headers=js)
        assert first.json()["accepted"] == 12, first.text
        again = c.post("/v1/samples", content=rgb_body_bytes, headers=js)  # a byte-identical retry: the same answer
        assert again.text == first.text  # and 12 duplicates counted
        assert c.post("/v1/samples", json=kit.batch_body(kit.synthetic_images(2))).status_code == 422  # wrong model
        r = c.post("/v1/samples", json=rgb_body(np.zeros((1, *RGB_SHAPE), np.uint8), model="made-up-model"))
        assert r.status_code == 422 and "'made-up-model' is not served here" in r.text, r.text
        for client, model, n in ((g, GRAY_MODEL, 2), (c, RGB_MODEL, 3)):
            for _ in range(n):
                assert client.post("/v1/heartbeat", json={"model": model, "param_version": 0}).status_code == 200
        text = cloud.client().get("/metrics").text
        m = series(text)
        assert "made-up-model" not in text  # the name a client sent is never a label
        for name, gray, rgb in (("edgeadapt_cloud_samples_received_total", 5, 12),
                                ("edgeadapt_cloud_samples_duplicate_total", 0, 12),
                                ("edgeadapt_cloud_heartbeats_total", 2, 3),
                                ("edgeadapt_cloud_versions_published_total", 0, 0),
                                ("edgeadapt_cloud_trainer_failures_total", 0, 0)):
            assert (value(m, name, model=GRAY_MODEL), value(m, name, model=RGB_MODEL)) == (gray, rgb), name
        assert value(m, "edgeadapt_cloud_bytes_in_total", model=GRAY_MODEL) == len(gray_body)
        assert value(m, "edgeadapt_cloud_bytes_in_total", model=RGB_MODEL) > 2 * len(rgb_body_bytes)
        assert value(m, "edgeadapt_cloud_upload_refusals_total", model=RGB_MODEL, reason="wrong_model") == 2
        assert value(m, "edgeadapt_cloud_upload_refusals_total", model=GRAY_MODEL, reason="wrong_model") is None
        root = cloud.service.root_store
        pending = {k: root.scoped(k).count_samples("train", consumed=False) for k in (GRAY_MODEL, RGB_MODEL)}
        assert 0 < pending[GRAY_MODEL] <= 5 and 5 < pending[RGB_MODEL] <= 12, pending  # some are held out
        for k in (GRAY_MODEL, RGB_MODEL):
            assert value(m, "edgeadapt_cloud_pending_samples", model=k) == pending[k], k
            assert value(m, "edgeadapt_cloud_latest_version", model=k) == 0, k
            assert value(m, "edgeadapt_cloud_devices", model=k, state="ok") == 1, k
        # one round of the RGB model: its series move, the gray model's stay
        with cloud.client(cloud.admin) as a:
            rnd = a.post(f"/v1/admin/models/{RGB_MODEL}/train", timeout=600).json()
        assert rnd["status"] == "published" and rnd["version"] == 1, rnd
        pkg = c.get("/v1/updates", params={"model": RGB_MODEL, "have": 0})
        assert pkg.status_code == 200, pkg.text
        assert g.get("/v1/updates", params={"model": GRAY_MODEL, "have": 0}).status_code == 204
        m = series(cloud.client().get("/metrics").text)
        for name, gray, rgb in (("edgeadapt_cloud_versions_published_total", 0, 1),
                                ("edgeadapt_cloud_train_seconds_count", 0, 1),
                                ("edgeadapt_cloud_train_samples_total", 0, pending[RGB_MODEL]),
                                ("edgeadapt_cloud_latest_version", 0, 1),
                                ("edgeadapt_cloud_pending_samples", pending[GRAY_MODEL], 0),
                                ("edgeadapt_cloud_update_bytes_out_total", 0, len(pkg.content))):
            assert (value(m, name, model=GRAY_MODEL), value(m, name, model=RGB_MODEL)) == (gray, rgb), name
        mode = pkg.headers["x-edgeadapt-mode"]
        assert value(m, "edgeadapt_cloud_updates_served_total", model=RGB_MODEL, mode=mode) == 1
        assert value(m, "edgeadapt_cloud_updates_served_total", model=GRAY_MODEL, mode=mode) is None
        assert value(m, "edgeadapt_cloud_trainer_last_success_age_seconds", model=RGB_MODEL) < 600
        health = cloud.client().get("/healthz").json()
        rgb_limits = c.get("/v1/whoami").json()
    assert health["status"] == "ok" and health["model"] == GRAY_MODEL and health["latest_version"] == 0, health
    assert health["limits"]["model"] == GRAY_MODEL and health["limits"]["input_shape"] == [1, 32, 32]
    assert set(health["models"]) == {GRAY_MODEL, RGB_MODEL}
    gray, rgb = health["models"][GRAY_MODEL], health["models"][RGB_MODEL]
    assert (gray["input_shape"], gray["num_classes"], rgb["input_shape"], rgb["num_classes"]) == \
        ([1, 32, 32], 10, RGB_SHAPE, RGB_CLASSES)
    assert gray["limits"] == health["limits"]
    assert {k: rgb["limits"][k] for k in rgb["limits"]} == {k: rgb_limits[k] for k in rgb["limits"]}
    assert rgb["limits"]["one_sample_body_bytes"] > 2 * gray["limits"]["one_sample_body_bytes"]
    assert (gray["latest_version"], gray["pending"], rgb["latest_version"], rgb["pending"]) == \
        (0, pending[GRAY_MODEL], 1, 0)
    assert gray["trainer"]["version"] == 0 and gray["trainer"]["last_success_age_s"] is None, gray
    assert rgb["trainer"]["version"] == 1 and rgb["trainer"]["last_success_age_s"] < 600, rgb
    assert rgb["trainer"]["running"] is False and rgb["trainer"]["last_error"] is None  # trainer threads off here
    # `doctor device` without a token checks a bundle against its own model's limits on a cloud of several
    from edgeadapt.device.doctor import cloud_findings

    found = {f.check: f for f in cloud_findings(rgb_model[0], cloud.url, None)}
    assert found["model"].level == "ok" and "input" not in found, found  # no shape mismatch found
    assert found["model"].message == f"the cloud serves {RGB_MODEL!r}", found
    assert str(rgb["limits"]["one_sample_body_bytes"]) in found["upload size"].message, found
    found = {f.check: f for f in cloud_findings(rgb_model[0], cloud.url, gray_token)}  # its device runs gray
    assert found["model"].level == "fatal" and "serves model 'fmnist-edge' to device 'cam-gray'" in \
        found["model"].message, found


def test_a_limit_one_model_cannot_meet_is_its_own_reason_and_refusals_are_its_own(live_cloud, rgb_model, cloud_env,
                                                                                   kit):
    """A body limit between the gray model's one-sample upload and the RGB model's: /healthz names the RGB model's
    uploads impossible (under its name, not the gray model's), its refused upload counts under its model (a
    streamed body) or under model "" (a declared Content-Length refused before the device is known), while the
    gray model's devices upload."""
    from edgeadapt.cloud.service import one_upload_bytes
    from edgeadapt.core.bundle import read_manifest
    from edgeadapt.core.input_codec import InputCodec

    one = {}
    for name, bundle in ((GRAY_MODEL, cloud_env.bundle), (RGB_MODEL, rgb_model[0])):
        manifest = read_manifest(bundle)
        one[name] = one_upload_bytes(manifest, InputCodec(manifest.input))
    limit = (one[GRAY_MODEL] + one[RGB_MODEL]) // 2
    assert one[GRAY_MODEL] < limit < one[RGB_MODEL], one
    cloud = live_cloud(max_body_bytes=limit)
    register_rgb(cloud, rgb_model)
    rgb_token = add_device(cloud, "cam-rgb", RGB_MODEL)
    gray_token = add_device(cloud, "cam-gray", GRAY_MODEL)
    body = json.dumps(rgb_body(np.zeros((1, *RGB_SHAPE), np.uint8))).encode()
    with cloud.client(rgb_token) as c, cloud.client(gray_token) as g:
        assert c.post("/v1/heartbeat", json={"model": RGB_MODEL, "param_version": 0}).status_code == 200
        assert c.post("/v1/samples", content=body, headers={"content-type": "application/json"}).status_code == 413
        streamed = c.post("/v1/samples", content=iter([body[:1000], body[1000:]]),  # chunked: no Content-Length
                          headers={"content-type": "application/json"})
        assert streamed.status_code == 413, streamed.text
        assert g.post("/v1/samples", json=kit.batch_body(kit.synthetic_images(1))).json()["accepted"] == 1
        health = cloud.client().get("/healthz").json()
        m = series(cloud.client().get("/metrics").text)
    assert health["status"] == "degraded" and "uploads_impossible" not in health["reasons"], health
    why = health["reasons"][f"uploads_impossible:{RGB_MODEL}"]
    assert f"model {RGB_MODEL!r}: max_body_bytes {limit}" in why and f"({one[RGB_MODEL]} bytes)" in why, why
    assert health["models"][RGB_MODEL]["reasons"] == {f"uploads_impossible:{RGB_MODEL}": why}
    assert health["models"][GRAY_MODEL]["reasons"] == {}
    assert health["models"][RGB_MODEL]["limits"]["one_sample_body_bytes"] == one[RGB_MODEL]
    assert value(m, "edgeadapt_cloud_upload_refusals_total", model=RGB_MODEL, reason="too_large") == 1
    assert value(m, "edgeadapt_cloud_upload_refusals_total", model="", reason="too_large") == 1
    assert value(m, "edgeadapt_cloud_upload_refusals_total", model=GRAY_MODEL, reason="too_large") is None
    assert value(m, "edgeadapt_cloud_samples_received_total", model=GRAY_MODEL) == 1
    assert value(m, "edgeadapt_cloud_samples_received_total", model=RGB_MODEL) == 0
    assert value(m, "edgeadapt_cloud_degraded_reason", reason=f"uploads_impossible:{RGB_MODEL}") == 1
