"""The cloud HTTP API against a real server on loopback (uvicorn in a thread, httpx)."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

from edgeadapt.core import update_package as U
from edgeadapt.core.bundle import read_manifest
from edgeadapt.core.tensorfile import params_hash

pytest_plugins = ["tests.cloud_fixtures"]  # the cloud fixtures (cloud_env, live_cloud)
pytestmark = pytest.mark.timeout(300)  # includes building the shared trained-bundle fixture on a loaded machine


def test_upload_idempotent(live_cloud, kit):
    cloud = live_cloud()
    token = cloud.add_device("cam-1")
    xs = kit.synthetic_images(6, seed=10)
    body = json.dumps(kit.batch_body(xs)).encode()
    with cloud.client(token) as c:
        r1 = c.post("/v1/samples", content=body, headers={"Content-Type": "application/json"})
        assert r1.status_code == 200, r1.text
        assert r1.json()["accepted"] == 6 and r1.json()["duplicates"] == 0
        r2 = c.post("/v1/samples", content=body, headers={"Content-Type": "application/json"})
        assert r2.status_code == 200 and r2.content == r1.content  # a retried batch is answered the same
        # a re-batched retry (subset + new sample): stored once, duplicates counted
        doc = json.loads(body)
        doc["samples"] = doc["samples"][:3] + kit.batch_body(kit.synthetic_images(1, seed=11))["samples"]
        r3 = c.post("/v1/samples", json=doc)
        assert r3.status_code == 200 and r3.json()["accepted"] == 1 and r3.json()["duplicates"] == 3
    assert cloud.service.store.count_samples() == 7
    # float16 inputs are accepted and kept as float16
    x16 = (kit.synthetic_images(2, seed=12).astype(np.float16) / 255).astype(np.float16)
    with cloud.client(token) as c:
        assert c.post("/v1/samples", json=kit.batch_body(x16)).status_code == 200
    stored = cloud.service.store.recent_samples("train", 100) + cloud.service.store.recent_samples("holdout", 100)
    dtypes = {a.dtype for a in cloud.service.store.load_inputs(stored)}
    assert dtypes == {np.dtype("uint8"), np.dtype("float16")}
    metrics = cloud.client().get("/metrics").text
    assert 'edgeadapt_cloud_samples_received_total{model="fmnist-edge"} 9.0' in metrics
    assert 'edgeadapt_cloud_samples_duplicate_total{model="fmnist-edge"} 9.0' in metrics


def test_auth(live_cloud, kit):
    cloud = live_cloud()
    tok_a = cloud.add_device("dev-a")
    tok_b = cloud.add_device("dev-b")
    body = kit.batch_body(kit.synthetic_images(1))
    with cloud.client() as c:
        r = c.post("/v1/samples", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/updates", params={"model": "fmnist-edge", "have": 0}).status_code == 401
    with cloud.client("not-a-token") as c:
        assert c.post("/v1/samples", json=body).status_code == 401
        assert c.post("/v1/heartbeat", json={"model": "fmnist-edge", "param_version": 0}).status_code == 401
    with cloud.client(tok_a) as c:
        assert c.get("/v1/devices/dev-a").status_code == 200
        assert c.get("/v1/devices/dev-b").status_code == 403  # another device's resource
        assert c.get("/v1/admin/devices").status_code == 403  # a device token is not admin
        assert c.post("/v1/admin/train").status_code == 403
    with cloud.client(cloud.admin) as c:
        assert c.post("/v1/samples", json=body).status_code == 403
        assert c.post("/v1/admin/devices/dev-b/revoke").status_code == 200
        assert c.post("/v1/admin/devices", json={"name": "dev-a"}).status_code == 409
    with cloud.client(tok_b) as c:  # revoked
        assert c.post("/v1/samples", json=body).status_code == 401
    with cloud.client(tok_a) as c:
        assert c.post("/v1/samples", json=body).status_code == 200
    # tokens are stored hashed only
    db = (cloud.service.store.db_path).read_bytes()
    assert tok_a.encode() not in db


def _raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_size_limits(live_cloud, kit):
    cloud = live_cloud(max_body_bytes=64 * 1024)
    token = cloud.add_device("cam-1")
    # declared too large: refused from the Content-Length alone, nothing read
    status, raw = _raw_request(cloud.url, "POST /v1/samples HTTP/1.1\r\nHost: x\r\n"
                                          f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                                          "Content-Length: 1000000000\r\n\r\n")
    assert status == 413, raw
    # no Content-Length (chunked): refused while streaming
    big = json.dumps(kit.batch_body(kit.synthetic_images(120, seed=3))).encode()
    assert len(big) > 64 * 1024

    def gen():
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    with cloud.client(token) as c:
        r = c.post("/v1/samples", content=gen(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        r = c.post("/v1/samples", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        small = kit.batch_body(kit.synthetic_images(4, seed=4))
        assert c.post("/v1/samples", json=small).status_code == 200
    assert cloud.service.store.count_samples() == 4


def test_validation_errors(live_cloud, kit):
    cloud = live_cloud()
    token = cloud.add_device("cam-1")
    x = kit.synthetic_images(1)
    cases = {
        "not json": b"{nope",
        "empty batch": json.dumps({"model": "fmnist-edge", "samples": []}).encode(),
        "bad id": json.dumps(kit.batch_body(x, ids=["../../etc"])).encode(),
        "wrong model": json.dumps(kit.batch_body(x, model="other")).encode(),
        "wrong shape": json.dumps(kit.batch_body(kit.synthetic_images(1)[:, :, :16, :16])).encode(),
        "logits": json.dumps(kit.batch_body(x, logits=[0.0] * 3)).encode(),
        "float32 input": json.dumps(kit.batch_body(x.astype(np.float32))).encode(),
    }
    bad_b64 = kit.batch_body(x)
    bad_b64["samples"][0]["input"]["data"] = "!!!!"
    cases["base64"] = json.dumps(bad_b64).encode()
    short = kit.batch_body(x)
    short["samples"][0]["input"]["shape"] = [1, 32, 33]
    cases["size mismatch"] = json.dumps(short).encode()
    with cloud.client(token) as c:
        for name, body in cases.items():
            r = c.post("/v1/samples", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (name, r.status_code, r.text)
            assert isinstance(r.json()["detail"], str) and r.json()["detail"], name
        r = c.post("/v1/samples", content=cases["wrong model"], headers={"Content-Type": "application/json"})
        assert "other" in r.json()["detail"]
    assert cloud.service.store.count_samples() == 0


def test_updates_rollouts_and_packages(live_cloud, cloud_env):
    cloud = live_cloud(update_mode="ternary")
    store = cloud.service.store
    tok = {n: cloud.add_device(n) for n in ("d1", "d2", "d3")}
    manifest = read_manifest(cloud_env.bundle)
    p0 = store.get_params(0)
    q = {"model": "fmnist-edge", "have": 0}
    with cloud.client(tok["d1"]) as c:
        assert c.get("/v1/updates", params=q).status_code == 204  # nothing newer
        assert c.get("/v1/updates", params={**q, "model": "nope"}).status_code == 404
        hb = c.post("/v1/heartbeat", json={"model": "fmnist-edge", "param_version": 0, "counters": {"frames": 12}})
        assert hb.status_code == 200 and hb.json()["latest_version"] == 0
        assert c.post("/v1/heartbeat", json={"model": "x", "param_version": 0}).status_code == 422
        assert c.post("/v1/heartbeat", json={"param_version": "zero"}).status_code == 422
    # publish v1 through the trainer's gate path (auto_rollout: all devices get it)
    rng = np.random.default_rng(0)
    p1 = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in p0.items()}
    res = cloud.service.trainer.submit_candidate(p1)
    assert res.status == "published" and res.version == 1
    with cloud.client(tok["d1"]) as c:
        r = c.get("/v1/updates", params=q)
        assert r.status_code == 200 and r.headers["x-edgeadapt-version"] == "1"
        assert r.headers["x-edgeadapt-mode"] == "ternary"
        version, got, header = U.verify_and_apply(r.content, manifest.cloud_public_key, "fmnist-edge", 0, p0)
        assert version == 1 and header["target"]["exact_hash"] == params_hash(p1)
        info = c.get("/v1/updates/info", params={**q, "mode": "fp16"}).json()
        assert info["version"] == 1 and info["mode"] == "fp16" and info["size"] > 0
        # the lossy reconstruction is the device's base for the next update
        p2 = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in p1.items()}
        assert cloud.service.trainer.submit_candidate(p2).version == 2
        # without have_hash the base is v1's exact parameters, which this device does not hold: it refuses that
        r_exact = c.get("/v1/updates", params={"model": "fmnist-edge", "have": 1})
        assert r_exact.status_code == 200
        with pytest.raises(U.UpdateRejected, match="base params hash"):
            U.verify_and_apply(r_exact.content, manifest.cloud_public_key, "fmnist-edge", 1, got)
        # naming what it holds, it gets the delta against exactly that
        r2 = c.get("/v1/updates", params={"model": "fmnist-edge", "have": 1, "have_hash": params_hash(got)})
        assert r2.status_code == 200
        v2, got2, _ = U.verify_and_apply(r2.content, manifest.cloud_public_key, "fmnist-edge", 1, got)
        assert v2 == 2
        assert c.get("/v1/updates", params={"model": "fmnist-edge", "have": 2}).status_code == 204
        assert c.get("/v1/updates", params={"model": "fmnist-edge", "have": 7}).status_code == 204
    # explicit rollout: only d2 gets v1; d1/d3 stay on v2 (no downgrade through a delta)
    with cloud.client(cloud.admin) as c:
        r = c.post("/v1/admin/rollouts", json={"version": 1, "devices": ["d2"]})
        assert r.status_code == 201, r.text
        devs = {d["name"]: d for d in c.get("/v1/admin/devices").json()}
        assert devs["d2"]["target_version"] == 1 and devs["d3"]["target_version"] == 2
        # the version a device runs is what its heartbeat says (an update check changes nothing in the store)
        assert devs["d1"]["version"] == 0 and devs["d1"]["counters"] == {"frames": 12.0}
    with cloud.client(tok["d2"]) as c:
        r = c.get("/v1/updates", params={**q, "mode": "fp32"})
        assert r.status_code == 200 and r.headers["x-edgeadapt-version"] == "1"
        _, exact, _ = U.verify_and_apply(r.content, manifest.cloud_public_key, "fmnist-edge", 0, p0)
        assert params_hash(exact) == params_hash(p1)
        r = c.get("/v1/updates", params={"model": "fmnist-edge", "have": 99})
        assert r.status_code == 204
    # a device on an unknown base version gets 409
    with cloud.client(cloud.admin) as c:
        assert c.post("/v1/admin/rollouts", json={"version": 2, "devices": ["d3"]}).status_code == 201
    with cloud.client(tok["d3"]) as c:
        r = c.get("/v1/updates", params={"model": "fmnist-edge", "have": 1, "have_hash": "0" * 64})
        assert r.status_code == 409


def test_long_poll_wakes_on_publish(live_cloud):
    # the re-check for other replicas' publishes is far away: only the publish itself can wake the check
    cloud = live_cloud(update_mode="fp16", long_poll_recheck_s=60)
    tok = cloud.add_device("d1")
    p0 = cloud.service.store.get_params(0)
    published_at = []

    def publish():
        time.sleep(0.6)
        cloud.service.trainer.submit_candidate({k: v * 1.01 for k, v in p0.items()})
        published_at.append(time.monotonic())

    t = threading.Thread(target=publish)
    t0 = time.monotonic()
    t.start()
    with cloud.client(tok) as c:
        r = c.get("/v1/updates", params={"model": "fmnist-edge", "have": 0, "wait": 20})
    answered = time.monotonic()
    t.join()
    assert r.status_code == 200 and r.headers["x-edgeadapt-version"] == "1"
    assert 0.5 < answered - t0 and answered - published_at[0] < 3  # at the publish, not at a re-check
    with cloud.client(tok) as c:
        t0 = time.monotonic()
        assert c.get("/v1/updates", params={"model": "fmnist-edge", "have": 1, "wait": 0.5}).status_code == 204
        assert time.monotonic() - t0 >= 0.45


def test_long_poll_sees_another_replicas_publish(live_cloud):
    """A version written to the shared store by someone else (another replica, `cloud push` on the store) wakes no
    signal here: the waiting check finds it at its next re-check."""
    cloud = live_cloud(update_mode="fp16", long_poll_recheck_s=0.5)
    tok = cloud.add_device("d1")
    store = cloud.service.store
    p0 = store.get_params(0)

    def publish_elsewhere():
        time.sleep(0.6)
        version = store.add_version({k: v * 1.01 for k, v in p0.items()}, parent=0, note="from another replica")
        store.add_rollout(version, note="elsewhere")

    t = threading.Thread(target=publish_elsewhere)
    t0 = time.monotonic()
    t.start()
    with cloud.client(tok) as c:
        r = c.get("/v1/updates", params={"model": "fmnist-edge", "have": 0, "wait": 20})
    t.join()
    assert r.status_code == 200 and r.headers["x-edgeadapt-version"] == "1"
    assert time.monotonic() - t0 < 4


def test_fraction_rollout_and_openapi(live_cloud):
    cloud = live_cloud(auto_rollout=False)
    names = [f"dev{i:02d}" for i in range(40)]
    for n in names:
        cloud.service.store.add_device(n)
    p0 = cloud.service.store.get_params(0)
    assert cloud.service.trainer.submit_candidate({k: v + 0.01 for k, v in p0.items()}).version == 1
    assert all(cloud.service.store.target_version(n) is None for n in names)  # no auto rollout
    with cloud.client(cloud.admin) as c:
        assert c.post("/v1/admin/rollouts", json={"fraction": 0.25}).status_code == 201
        targeted = [d["name"] for d in c.get("/v1/admin/devices").json() if d["target_version"] == 1]
        assert 3 <= len(targeted) <= 20
        assert c.post("/v1/admin/rollouts", json={"fraction": 0.5}).status_code == 201
        wider = [d["name"] for d in c.get("/v1/admin/devices").json() if d["target_version"] == 1]
        assert set(targeted) <= set(wider)  # staged rollouts grow monotonically
        spec = c.get("/openapi.json").json()
        assert {"/v1/samples", "/v1/updates", "/v1/heartbeat", "/v1/admin/train"} <= set(spec["paths"])
        comps = spec["components"]["schemas"]
        assert {"SampleBatch", "UploadSample", "WireArray", "Heartbeat", "SampleBatchResult"} <= set(comps)
        refs = {m for m in json.dumps(spec).split('"#/components/schemas/')[1:]}
        assert all(r.split('"')[0] in comps for r in refs)  # every $ref resolves
        assert c.get("/healthz").json()["model"] == "fmnist-edge"
        st = c.get("/v1/admin/status").json()
        assert st["latest_version"] == 1


def test_holdout_and_novel_split(live_cloud, kit):
    cloud = live_cloud(trainer={"holdout_fraction": 0.5})
    tok = cloud.add_device("d1")
    with cloud.client(tok) as c:
        assert c.post("/v1/samples", json=kit.batch_body(kit.synthetic_images(40, seed=5))).status_code == 200
        novel = kit.batch_body(kit.synthetic_images(5, seed=6), novel=True)
        assert c.post("/v1/samples", json=novel).status_code == 200
    s = cloud.service.store
    assert s.count_samples("novel") == 5
    assert 8 <= s.count_samples("holdout") <= 32 and s.count_samples("train") + s.count_samples("holdout") == 40
    assert len(s.pending_samples()) == s.count_samples("train")
