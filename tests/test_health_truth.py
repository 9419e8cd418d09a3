"""Health that tells the truth (issue 20): each failure the issue names is injected with the real processes
(`edgeadapt cloud serve`, `edgeadapt device run`, real HTTP, real SQLite; a library daemon where the CLI refuses
to start one) and must show in the device's /healthz, /v1/status and /metrics and in `edgeadapt cloud devices`
(and its admin endpoint) within a bounded time, and clear when fixed. Nothing of ours is mocked.

Each test prints one ``HEALTH {...}`` line with how long each signal took; docs/RELIABILITY.md ("Failure → where
it shows") reports them. The real-process tests are ``slow`` (EDGEADAPT_SLOW=1 / ``-m slow``); the in-process
ones run by default.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from edgeadapt.cli import app
from tests.conftest import free_port
from tests.procs import Load, Proc, add_device, cloud_proc, device_proc, fresh_cloud_home, wait_for

pytest_plugins = ["tests.cloud_fixtures"]

runner = CliRunner()
# a device that reacts fast, and calls a network failure degraded after 2 s (default 60 s)
FAST = dict(upload_interval_s=0.2, update_poll_s=0.2, watch_batches=2, save_state_every_s=0.5, max_wait_ms=2,
            degraded_after_s=2)


def report(failure: str, **numbers) -> None:
    print("HEALTH " + json.dumps({"failure": failure, **numbers}, default=str), flush=True)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples whose labels include ``labels`` (NaN samples count as 0)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or line.split("{", 1)[0].split(" ", 1)[0] != name:
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            v = float(line.rsplit(" ", 1)[1])
            total += 0.0 if v != v else v
    return total


def cloud_devices(home: Path, stale_after: float | None = None) -> tuple[list[dict], str]:
    """`edgeadapt cloud devices --json` and the table, through the CLI (it reads the store, cloud up or down)."""
    env = {"EDGEADAPT_CLOUD_HOME": str(home), "COLUMNS": "400"}
    extra = ["--stale-after", str(stale_after)] if stale_after else []
    r = runner.invoke(app, ["cloud", "devices", "--json", *extra], env=env)
    assert r.exit_code == 0, r.output
    t = runner.invoke(app, ["cloud", "devices", *extra], env=env)
    assert t.exit_code == 0, t.output
    return json.loads(r.stdout), " ".join(t.stdout.split())


def trouble(home: Path, name: str, stale_after: float | None = None) -> str:
    """What `cloud devices` says is wrong with ``name`` (its JSON, joined), when the table (read just after)
    prints the same; "(json and table differ)" while a heartbeat lands between the two reads."""
    rows, table = cloud_devices(home, stale_after)
    row = next(r for r in rows if r["name"] == name)
    words = "; ".join(row["trouble"])
    if words and " ".join(words.split()[:3]) not in table:
        return "(json and table differ)"
    return words


def named(dev: Proc, key: str, words: str) -> dict | None:
    """The device's health, status and metrics when all three name ``key`` with ``words``, else None."""
    h = dev.get("/healthz").json()
    if h["status"] != "degraded" or words not in h["reasons"].get(key, ""):
        return None
    st = dev.get("/v1/status").json()
    m = dev.get("/metrics").text
    if key not in st["degraded"] or metric(m, "edgeadapt_degraded_reason", reason=key) != 1.0:
        return None
    return {"health": h, "status": st, "metrics": m}


def healthy(dev: Proc) -> bool:
    return dev.get("/healthz").json()["status"] == "ok"


def token_file(path: Path, token: str) -> Path:
    path.write_text(token + "\n")
    os.chmod(path, 0o600)
    return path


def with_token_file(dev: Proc, path: Path) -> Proc:
    i = dev.args.index("--token")
    dev.args[i : i + 2] = ["--token-file", str(path)]
    return dev


def publish(home: Path, cloud_url: str, admin: str, bias: float = 0.001, parent: int = 0) -> int:
    """A version published the way the trainer does (store.add_version) and rolled out to all devices."""
    from edgeadapt.cloud.admin import open_store
    from edgeadapt.cloud.config import load_config

    store = open_store(home, load_config(home))
    try:
        base = store.get_params(0)
        v = store.add_version({k: (v + bias if k.endswith(".bias") else v) for k, v in base.items()}, parent=parent,
                              note=f"health test bias {bias}")
    finally:
        store.close()
    r = httpx.post(f"{cloud_url}/v1/admin/rollouts", json={"version": v}, headers={"Authorization": f"Bearer {admin}"},
                   timeout=30)
    assert r.status_code in (200, 201), r.text
    return v


def keyless_copy(bundle: Path, dest: Path) -> Path:
    """The bundle as exported without --cloud-key (the manifest's key removed; the files it hashes unchanged)."""
    shutil.copytree(bundle, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["cloud_public_key"] = None
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


@pytest.fixture()
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        try:
            p.stop()
        except Exception:
            pass


# ------------------------------------------------------------------------------------------- real processes
@pytest.mark.slow
def test_refused_uploads_named_everywhere_and_clear(cloud_env, tmp_path, procs):
    """A cloud started with max_body_bytes 1024 (one sample of the bundle uploads as ~1.8 KB) refuses every
    upload with 413. Doctor says so before the device runs; then the device's health, status and metrics, `cloud
    devices`, the admin endpoint and the cloud's own health all name it; restarted with the default limit, every
    signal clears."""
    home = fresh_cloud_home(cloud_env, tmp_path / "home")
    cloud = cloud_proc(cloud_env, home, tmp_path / "cloud.log")
    cloud.env["EDGEADAPT_CLOUD_MAX_BODY_BYTES"] = "1024"
    procs.append(cloud.start())
    admin = {"Authorization": f"Bearer {cloud_env.admin_token}"}
    token = add_device(cloud, cloud_env.admin_token, "dev-refused")
    tf = token_file(tmp_path / "token", token)
    doc = runner.invoke(app, ["doctor", "device", "--bundle", str(cloud_env.bundle), "--cloud", cloud.url,
                              "--token-file", str(tf)])
    assert doc.exit_code == 1, doc.output
    assert re.search(r"FATAL upload size: one sample of this bundle uploads as \d+ bytes; the cloud accepts at most "
                     r"1024", doc.output), doc.output
    dev = device_proc(cloud_env.bundle, tmp_path / "state", tmp_path / "device.log", cloud.url, token, upload_all=1,
                      **FAST)
    procs.append(dev.start())
    words = "uploads refused: sample too large (HTTP 413"
    with Load(dev.url, clients=1, batch=8, pause_s=0.1) as load:
        t0 = time.time()
        view = wait_for(lambda: named(dev, "uploads_refused", words), 60, "the device to name the refusal")
        device_s = time.time() - t0
        wait_for(lambda: words in trouble(home, "dev-refused"), 60, "`cloud devices` to name it")
        cloud_devices_s = time.time() - t0
        rows = cloud.get("/v1/admin/devices", headers=admin).json()
        assert any(words in t for r in rows if r["name"] == "dev-refused" for t in r["trouble"]), rows
        ch = cloud.get("/healthz").json()
        cm = cloud.get("/metrics").text
        # fixed: the same cloud (home, port) with the default limit
        cloud.stop()
        del cloud.env["EDGEADAPT_CLOUD_MAX_BODY_BYTES"]
        cloud.start()
        t1 = time.time()
        wait_for(lambda: healthy(dev), 60, "the device's health to clear")
        device_clear_s = time.time() - t1
        wait_for(lambda: trouble(home, "dev-refused") == "", 60, "`cloud devices` to clear")
        cloud_clear_s = time.time() - t1
        sent_after = wait_for(lambda: dev.get("/v1/status").json()["queue"]["sent"], 30, "uploads accepted")
    assert load.failed == [], load.failed[:3]
    m = view["metrics"]
    st = view["status"]
    assert metric(m, "edgeadapt_uploads_refused_total", reason="too_large") > 0
    assert metric(m, "edgeadapt_upload_queue_dropped", reason="rejected") > 0
    assert st["degraded"]["uploads_refused"]["count"] >= 1 and st["degraded"]["uploads_refused"]["since"]
    assert ch["status"] == "degraded" and "uploads_impossible" in ch["reasons"], ch
    assert "max_body_bytes 1024" in ch["reasons"]["uploads_impossible"]
    assert metric(cm, "edgeadapt_cloud_upload_refusals_total", reason="too_large") > 0
    assert metric(cm, "edgeadapt_cloud_devices", state="degraded") == 1
    assert cloud.get("/healthz").json()["status"] == "ok"
    report("uploads_refused", device_s=round(device_s, 1), cloud_devices_s=round(cloud_devices_s, 1),
           device_clear_s=round(device_clear_s, 1), cloud_clear_s=round(cloud_clear_s, 1),
           refused_samples=metric(m, "edgeadapt_uploads_refused_total"), sent_after_fix=sent_after,
           reason=view["health"]["reasons"]["uploads_refused"], cloud_reason=ch["reasons"]["uploads_impossible"])


@pytest.mark.slow
def test_keyless_bundle_refused_at_start_named_at_runtime_and_never_redownloaded(cloud_env, tmp_path, procs):
    """A bundle without the cloud's key, with --cloud: `device run` refuses to start (exit 2, the reason);
    `--no-updates` runs it (uploads, heartbeats, no update traffic). A library daemon that takes updates anyway
    names "rejects updates: no public key" everywhere and downloads nothing while the cloud offers v1 (it asks
    /v1/updates/info); the key put back (what re-exporting with --cloud-key does) clears it and v1 is applied."""
    from fastapi.testclient import TestClient

    from edgeadapt.device.config import DeviceConfig
    from edgeadapt.device.daemon import DeviceDaemon
    from edgeadapt.device.server import create_app

    bundle = keyless_copy(cloud_env.bundle, tmp_path / "keyless")
    home = fresh_cloud_home(cloud_env, tmp_path / "home")
    cloud = cloud_proc(cloud_env, home, tmp_path / "cloud.log")
    procs.append(cloud.start())
    token = add_device(cloud, cloud_env.admin_token, "dev-keyless")
    tf = token_file(tmp_path / "token", token)
    t0 = time.time()
    refused = subprocess.run([sys.executable, "-m", "edgeadapt", "device", "run", "--bundle", str(bundle),
                              "--state-dir", str(tmp_path / "s0"), "--cloud", cloud.url, "--token-file", str(tf),
                              "--listen", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if not k.startswith("EDGEADAPT_")})
    refuse_s = time.time() - t0
    err = " ".join(refused.stderr.split())
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "will not start: the bundle carries no cloud public key" in err and "--no-updates" in err, err
    v1 = publish(home, cloud.url, cloud_env.admin_token)
    # the explicit flag: uploads and heartbeats, no updates wanted, nothing fetched
    dev = with_token_file(device_proc(bundle, tmp_path / "s1", tmp_path / "device.log", cloud.url, token,
                                      upload_all=1, **FAST), tf)
    dev.args.append("--no-updates")
    procs.append(dev.start())
    with Load(dev.url, clients=1, batch=8, pause_s=0.1):
        wait_for(lambda: dev.get("/v1/status").json()["queue"]["sent"] >= 16, 60, "uploads from --no-updates")
    wait_for(lambda: next(r for r in cloud_devices(home)[0] if r["name"] == "dev-keyless")["status"] ==
             "ok (updates off)", 30, "the heartbeat to say updates are off")
    st = dev.get("/v1/status").json()
    assert st["updater"]["updates"] == "off" and st["updater"]["counters"]["bytes_down"] == 0, st["updater"]
    assert healthy(dev) and trouble(home, "dev-keyless") == ""
    dev.stop()
    # a library caller that takes updates anyway (no startup check): named, and no download loop
    cfg = DeviceConfig(bundle=bundle, state_dir=tmp_path / "s2", cloud_url=cloud.url, token_file=tf,
                       update_poll_s=0.1, degraded_after_s=1)
    d = DeviceDaemon(cfg)
    d.start()
    try:
        t1 = time.time()
        wait_for(lambda: "rejects updates: no public key" in d.degraded().get("updates_rejected", {}).get("reason",
                 ""), 30, "the daemon to name the missing key")
        device_s = time.time() - t1
        client = TestClient(create_app(d))
        wait_for(lambda: "rejects updates: no public key" in trouble(home, "dev-keyless"), 30, "`cloud devices`")
        cloud_devices_s = time.time() - t1
        time.sleep(3.0)  # polls go on (backing off): none of them downloads the package
        h = client.get("/healthz").json()
        m = client.get("/metrics").text
        up = client.get("/v1/status").json()["updater"]
    finally:
        d.stop()
    cm = cloud.get("/metrics").text
    assert h["status"] == "degraded" and "no public key" in h["reasons"]["updates_rejected"], h
    assert up["counters"]["info_checks"] >= 4 and up["counters"]["bytes_down"] == 0, up["counters"]
    assert up["counters"]["rejected"] == 1 and up["counters"]["rejected_again"] >= 3, up["counters"]
    assert metric(m, "edgeadapt_update_rejections_total", reason="no_public_key") == 1
    assert metric(m, "edgeadapt_bytes_down") == 0
    assert metric(cm, "edgeadapt_cloud_update_bytes_out_total") == 0  # the cloud served no package at all
    assert d.engine.param_version == 0
    # fixed: the key back in the manifest; the same state directory
    m2 = json.loads((bundle / "manifest.json").read_text())
    m2["cloud_public_key"] = cloud_env.public_key
    (bundle / "manifest.json").write_text(json.dumps(m2))
    d = DeviceDaemon(cfg)
    d.start()
    try:
        t2 = time.time()
        wait_for(lambda: d.engine.param_version == v1 and not d.degraded(), 30, "v1 applied, nothing degraded")
        clear_s = time.time() - t2
        wait_for(lambda: trouble(home, "dev-keyless") == "", 30, "`cloud devices` to clear")
        cloud_clear_s = time.time() - t2
    finally:
        d.stop()
    report("keyless_bundle", refused_at_start_s=round(refuse_s, 1), device_s=round(device_s, 1),
           cloud_devices_s=round(cloud_devices_s, 1), polls=up["counters"]["info_checks"],
           bytes_downloaded=up["counters"]["bytes_down"], clear_s=round(clear_s, 1),
           cloud_clear_s=round(cloud_clear_s, 1), reason=h["reasons"]["updates_rejected"])


@pytest.mark.slow
def test_stopped_cloud_named_after_the_threshold_and_clears(cloud_env, tmp_path, procs):
    """The cloud SIGKILLed under load: the device says nothing for its 2 s threshold, then names the unreachable
    cloud and failing uploads in health, status and metrics (ages of the last heartbeat and upload growing);
    `cloud devices` (reading the store, the cloud down) shows a stale heartbeat; the cloud back clears all."""
    home = fresh_cloud_home(cloud_env, tmp_path / "home")
    cloud = cloud_proc(cloud_env, home, tmp_path / "cloud.log")
    procs.append(cloud.start())
    token = add_device(cloud, cloud_env.admin_token, "dev-down")
    dev = device_proc(cloud_env.bundle, tmp_path / "state", tmp_path / "device.log", cloud.url, token, upload_all=1,
                      **FAST)
    procs.append(dev.start())
    with Load(dev.url, clients=1, batch=8, pause_s=0.05) as load:
        wait_for(lambda: dev.get("/v1/status").json()["queue"]["sent"] > 0 and healthy(dev), 60, "a healthy loop")
        cloud.kill()
        t0 = time.time()
        early = wait_for(lambda: (s := dev.get("/v1/status").json())["errors"].get("cloud_unreachable") and s, 10,
                         "the first failure")
        early_s = time.time() - t0
        early_health = dev.get("/healthz").json()
        view = wait_for(lambda: named(dev, "cloud_unreachable", "cloud unreachable: ConnectError"), 30,
                        "the device to name the unreachable cloud")
        device_s = time.time() - t0
        wait_for(lambda: named(dev, "uploads_failing", "uploads failing: ConnectError"), 30, "failing uploads")
        wait_for(lambda: "stale heartbeat" in trouble(home, "dev-down", stale_after=3), 30, "a stale heartbeat")
        cloud_devices_s = time.time() - t0
        m = dev.get("/metrics").text
        cloud.start()
        t1 = time.time()
        wait_for(lambda: healthy(dev), 60, "the device's health to clear")
        device_clear_s = time.time() - t1
        wait_for(lambda: trouble(home, "dev-down", stale_after=3) == "", 30, "`cloud devices` to clear")
        cloud_clear_s = time.time() - t1
    assert load.failed == [], load.failed[:3]
    # under the threshold the failure is in the status document but does not make the device degraded yet
    if early_s + 0.5 < FAST["degraded_after_s"]:
        assert "cloud_unreachable" not in early_health["reasons"], (early_s, early_health)
        assert "cloud_unreachable" not in early["degraded"], (early_s, early["degraded"])
    assert device_s >= FAST["degraded_after_s"]
    assert metric(m, "edgeadapt_heartbeat_last_success_age_seconds") > FAST["degraded_after_s"]
    assert metric(m, "edgeadapt_upload_last_success_age_seconds") > FAST["degraded_after_s"]
    assert metric(m, "edgeadapt_upload_failures_total", reason="network") > 0
    report("cloud_stopped", threshold_s=FAST["degraded_after_s"], first_failure_s=round(early_s, 1),
           device_s=round(device_s, 1), cloud_devices_s=round(cloud_devices_s, 1),
           device_clear_s=round(device_clear_s, 1), cloud_clear_s=round(cloud_clear_s, 1),
           heartbeat_age_s=round(metric(m, "edgeadapt_heartbeat_last_success_age_seconds"), 1),
           reason=view["health"]["reasons"]["cloud_unreachable"])


@pytest.mark.slow
def test_full_disk_and_failing_cloud_store_named_everywhere_and_clear(cloud_env, tmp_path, procs):
    """Two disk failures at once, each injected for real: the device process under RLIMIT_FSIZE 1 MiB (a full
    disk as it sees it; root-proof), and the cloud's blob directory replaced by a file (its store cannot write:
    uploads answered 503, kept and retried by the device, so the device's queue grows until its "disk" is full).
    The device names the full disk and the failing uploads in health, status and metrics, and the heartbeat
    carries them to `cloud devices` and the admin endpoint; the cloud's own health names its store. Lifting the
    limit (prlimit) and putting the directory back clears every signal."""
    limit = 1024 * 1024
    home = fresh_cloud_home(cloud_env, tmp_path / "home")
    cloud = cloud_proc(cloud_env, home, tmp_path / "cloud.log")
    procs.append(cloud.start())
    admin = {"Authorization": f"Bearer {cloud_env.admin_token}"}
    token = add_device(cloud, cloud_env.admin_token, "dev-disk")
    dev = device_proc(cloud_env.bundle, tmp_path / "state", tmp_path / "device.log", cloud.url, token, upload_all=1,
                      **FAST)
    procs.append(dev.start())
    blobs = home / "store" / "blobs"
    with Load(dev.url, clients=2, batch=32) as load:
        wait_for(lambda: dev.get("/v1/status").json()["queue"]["sent"] > 0 and healthy(dev), 60, "a healthy loop")
        # the cloud's store fails first: uploads are answered 503 and kept, so the device's queue holds samples from
        # here on (with the "disk" full first, the queue may be empty when it fills, and nothing would be sent to fail)
        blobs.rename(home / "store" / "blobs.away")
        blobs.write_text("not a directory")
        t0 = time.time()
        store = wait_for(lambda: cloud.get("/healthz").json()["reasons"].get("store"), 60, "the cloud's store reason")
        cloud_s = time.time() - t0
        failing = wait_for(lambda: named(dev, "uploads_failing", "uploads failing: HTTP 503"), 60, "the failing uploads")
        # the "disk" fills now (the queue's WAL alone passes 1 MiB under this load: set at start, the device would
        # never have been healthy)
        resource.prlimit(dev.popen.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        view = wait_for(lambda: named(dev, "queue", "could not queue uploads"), 120, "the device to name the disk")
        device_s = time.time() - t0
        assert "uploads failing: HTTP 503" in view["health"]["reasons"].get("uploads_failing", ""), view["health"]
        wait_for(lambda: "could not queue uploads" in trouble(home, "dev-disk"), 60, "`cloud devices` to name it")
        cloud_devices_s = time.time() - t0
        rows = cloud.get("/v1/admin/devices", headers=admin).json()
        cm = cloud.get("/metrics").text
        store = cloud.get("/healthz").json()["reasons"]["store"]  # by now with the uploads' failures
        resource.prlimit(dev.popen.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        blobs.unlink()
        (home / "store" / "blobs.away").rename(blobs)
        t1 = time.time()
        wait_for(lambda: healthy(dev), 90, "the device's health to clear")
        device_clear_s = time.time() - t1
        wait_for(lambda: trouble(home, "dev-disk") == "" and cloud.get("/healthz").json()["status"] == "ok", 60,
                 "`cloud devices` and the cloud's health to clear")
        cloud_clear_s = time.time() - t1
    assert load.failed == [], load.failed[:3]
    reason = view["health"]["reasons"]["queue"]
    assert "SQLITE_IOERR_WRITE" in reason or "SQLITE_FULL" in reason, reason
    assert f"file size limit (RLIMIT_FSIZE) {limit} bytes" in reason
    # the failures' counter from the moment they are named (the disk may be named before the first 503 answer)
    assert metric(failing["metrics"], "edgeadapt_upload_failures_total", reason="http_5xx") > 0
    assert any("could not queue uploads" in t for r in rows if r["name"] == "dev-disk" for t in r["trouble"]), rows
    assert "is not a directory: uploads cannot be stored" in store, store
    assert "store error on /v1/samples" in store and "NotADirectoryError" in store, store
    assert metric(cm, "edgeadapt_cloud_store_errors_total") > 0
    report("disk_full_and_cloud_store", cloud_store_s=round(cloud_s, 1), device_s=round(device_s, 1),
           cloud_devices_s=round(cloud_devices_s, 1), device_clear_s=round(device_clear_s, 1),
           cloud_clear_s=round(cloud_clear_s, 1), reason=reason[:160], cloud_reason=store[:120])


@pytest.mark.slow
def test_revoked_token_named_everywhere_and_a_new_token_file_clears_it(cloud_env, tmp_path, procs):
    """The device's token revoked: health, status and metrics name the refused token (uploads kept and retried),
    `cloud devices` shows "token revoked"; a new token written into the same --token-file is picked up without a
    restart and every signal clears (the new device's row is clean)."""
    home = fresh_cloud_home(cloud_env, tmp_path / "home")
    cloud = cloud_proc(cloud_env, home, tmp_path / "cloud.log")
    procs.append(cloud.start())
    admin = {"Authorization": f"Bearer {cloud_env.admin_token}"}
    token = add_device(cloud, cloud_env.admin_token, "dev-auth")
    tf = token_file(tmp_path / "token", token)
    dev = with_token_file(device_proc(cloud_env.bundle, tmp_path / "state", tmp_path / "device.log", cloud.url,
                                      token, upload_all=1, **FAST), tf)
    procs.append(dev.start())
    with Load(dev.url, clients=1, batch=8, pause_s=0.1) as load:
        wait_for(lambda: dev.get("/v1/status").json()["queue"]["sent"] > 0 and healthy(dev), 60, "a healthy loop")
        assert cloud.post("/v1/admin/devices/dev-auth/revoke", headers=admin).status_code == 200
        t0 = time.time()
        # the heartbeat (its own thread) can name the refused token before the uploader's next request is refused:
        # wait for both, the reason and the counted upload failure
        view = wait_for(lambda: (v := named(dev, "cloud_auth", "the cloud refuses this device's token")) and
                        metric(v["metrics"], "edgeadapt_upload_failures_total", reason="auth") > 0 and v, 30,
                        "the device to name the refused token and count a refused upload")
        device_s = time.time() - t0
        wait_for(lambda: "token revoked" in trouble(home, "dev-auth"), 30, "`cloud devices` to say revoked")
        cloud_devices_s = time.time() - t0
        doc = runner.invoke(app, ["doctor", "device", "--bundle", str(cloud_env.bundle), "--cloud", cloud.url,
                                  "--token-file", str(tf)])
        new = add_device(cloud, cloud_env.admin_token, "dev-auth-2")
        token_file(tf, new)
        t1 = time.time()
        wait_for(lambda: healthy(dev), 60, "the device's health to clear")
        device_clear_s = time.time() - t1
        wait_for(lambda: (r := next(r for r in cloud_devices(home)[0] if r["name"] == "dev-auth-2"))["last_seen"]
                 and r["trouble"] == [], 30, "the new device's row, clean")
        cloud_clear_s = time.time() - t1
        sent = dev.get("/v1/status").json()["queue"]["sent"]
        wait_for(lambda: dev.get("/v1/status").json()["queue"]["sent"] > sent, 30, "uploads with the new token")
    assert load.failed == [], load.failed[:3]
    assert metric(view["metrics"], "edgeadapt_upload_failures_total", reason="auth") > 0
    assert view["status"]["queue"]["rejected"] == 0  # kept and retried, not dropped
    assert doc.exit_code == 1 and "FATAL token: the cloud refuses the token (401)" in doc.output, doc.output
    report("token_revoked", device_s=round(device_s, 1), cloud_devices_s=round(cloud_devices_s, 1),
           device_clear_s=round(device_clear_s, 1), cloud_clear_s=round(cloud_clear_s, 1),
           reason=view["health"]["reasons"]["cloud_auth"])


# ------------------------------------------------------------------------------------------- in process
def _daemon(cloud_env, state: Path, cloud_url: str | None = None, token: str | None = None, **cfg):
    from edgeadapt.device.config import DeviceConfig
    from edgeadapt.device.daemon import DeviceDaemon

    return DeviceDaemon(DeviceConfig(bundle=cloud_env.bundle, state_dir=state, cloud_url=cloud_url, token=token,
                                     **cfg))


def test_standalone_daemon_queues_nothing_and_says_so(cloud_env, tmp_path):
    """No cloud: predictions are served, nothing goes into the upload queue (it could never be sent), the status
    says uploads are off, and the ages that mean nothing standalone are NaN, not a number an alert would fire on."""
    from fastapi.testclient import TestClient

    from edgeadapt.device.server import create_app
    from tests.cloud_fixtures import synthetic_images

    d = _daemon(cloud_env, tmp_path / "s", upload_all=True)
    try:
        for i in range(4):
            assert len(d.predict(synthetic_images(32, seed=i))) == 32
        c = TestClient(create_app(d))
        st = c.get("/v1/status").json()
        m = c.get("/metrics").text
        h = c.get("/healthz").json()
        assert c.get("/readyz").status_code == 200 and c.get("/livez").json() == {"ok": True}
    finally:
        d.stop()
    assert st["samples"] == 128 and st["queue"]["put"] == 0 and st["queue"]["queued"] == 0, st["queue"]
    assert st["uploads"].startswith("off: standalone")
    assert h["status"] == "ok" and h["ready"] is True
    for name in ("edgeadapt_upload_last_success_age_seconds", "edgeadapt_heartbeat_last_success_age_seconds"):
        assert re.search(rf"^{name} NaN$", m, re.M), name


def test_readiness_follows_the_batcher(cloud_env, tmp_path):
    """/readyz is 503 with the reason once the batch worker has stopped (predictions cannot be served); /livez
    still answers."""
    from fastapi.testclient import TestClient

    from edgeadapt.device.server import create_app

    d = _daemon(cloud_env, tmp_path / "s")
    c = TestClient(create_app(d))
    assert c.get("/readyz").status_code == 200
    d.batcher.close()
    r = c.get("/readyz")
    assert r.status_code == 503 and "batcher stopped" in r.json()["reason"], r.text
    assert c.get("/livez").status_code == 200 and c.get("/healthz").json()["ready"] is False
    d.stop()


def test_watch_without_traffic_times_out_to_a_stated_outcome(live_cloud, cloud_env, tmp_path, kit):
    """v1 applied and then no traffic: after watch_timeout_s the watch ends as "kept_unwatched" (a stated event,
    status no longer "watching", the watch gauge 0) instead of watching for ever; with one batch of traffic it
    decides on that batch."""
    from fastapi.testclient import TestClient

    from edgeadapt.cloud import admin as A
    from edgeadapt.device.server import create_app

    cloud = live_cloud(auto_rollout=False)
    token = cloud.add_device("dev-watch")
    store = cloud.service.store
    base = store.get_params(0)
    v1 = store.add_version({k: (v + 0.001 if k.endswith(".bias") else v) for k, v in base.items()}, parent=0)
    A.push(store, v1)
    d = _daemon(cloud_env, tmp_path / "s", cloud.url, token, update_poll_s=0.1, watch_batches=4,
                watch_timeout_s=1.5)
    d.start()
    try:
        wait_for(lambda: d.engine.param_version == v1 and d.updater._watch is not None, 30, "v1 under watch")
        t0 = time.time()
        wait_for(lambda: store.get_device("dev-watch").status == "watching", 5, "the heartbeat to say watching")
        wait_for(lambda: d.updater._watch is None, 10, "the watch to time out")
        ended_s = time.time() - t0
        st = TestClient(create_app(d)).get("/v1/status").json()
        m = TestClient(create_app(d)).get("/metrics").text
        wait_for(lambda: store.get_device("dev-watch").status == "ok", 10, "the heartbeat to stop saying watching")
        ev = [e for e in st["updater"]["events"] if e["event"] == "kept_unwatched"]
        assert ev and "no traffic" in ev[-1]["reason"] and ev[-1]["version"] == v1, st["updater"]["events"]
        assert st["updater"]["counters"]["kept_unwatched"] == 1 and st["updater"]["watch"] is None
        assert metric(m, "edgeadapt_update_watching") == 0 and d.engine.param_version == v1
        # with a little traffic: the timed-out watch decides on what it saw
        v2 = store.add_version({k: (v + 0.002 if k.endswith(".bias") else v) for k, v in base.items()}, parent=v1)
        A.push(store, v2)
        wait_for(lambda: d.engine.param_version == v2 and d.updater._watch is not None, 30, "v2 under watch")
        d.predict(kit.synthetic_images(32, seed=5))
        wait_for(lambda: d.updater._watch is None, 10, "the second watch to time out")
        timed = [e for e in d.updater.events if e["event"] == "watch_timed_out"]
        decided = [e["event"] for e in d.updater.events if e["event"] in ("kept", "rolled_back")]
    finally:
        d.stop()
    assert timed[-1]["batches"] == 1 and timed[-1]["version"] == v2, timed
    assert decided, d.updater.events
    report("watch_no_traffic", watch_timeout_s=1.5, ended_after_s=round(ended_s, 1), with_one_batch=decided[-1])


def test_heartbeat_problems_are_bounded_cleaned_and_printed_as_text(live_cloud, tmp_path):
    """A heartbeat's problems: at most 16 kept, control characters stripped, 200 characters each; `cloud devices`
    prints brackets literally. A device of another model is recorded with that as its trouble, then refused."""
    cloud = live_cloud()
    token = cloud.add_device("loud")
    hostile = "[/] [link=https://evil.example]x[/link] \x1b[2J\x07" + "A" * 400  # 40 of them fit in 64 KiB
    with cloud.client(token) as c:
        r = c.post("/v1/heartbeat", json={"model": "fmnist-edge", "param_version": 0, "status": "degraded",
                                          "problems": {f"k{i}\x1b": hostile for i in range(40)}})
        assert r.status_code == 200, r.text
        dev = cloud.service.store.get_device("loud")
        assert len(dev.problems) == 16 and all(len(v) == 200 for v in dev.problems.values())
        assert not any(ord(ch) < 32 for v in dev.problems.values() for ch in v) and "k0" in dev.problems
        rows = c.get("/v1/devices/loud").json()
        assert rows["trouble"][0].startswith("[/] [link=https://evil.example]x[/link] [2J")
        r = c.post("/v1/heartbeat", json={"model": "other-model", "param_version": 0})
        assert r.status_code == 422
    other = cloud.service.store.get_device("loud")
    assert other.status == "wrong model" and "runs model 'other-model'" in other.problems["model"]
    with cloud.client(cloud.admin) as c:
        rows = c.get("/v1/admin/devices", params={"stale_after_s": 3600}).json()
    assert any("this cloud serves 'fmnist-edge'" in t for t in rows[0]["trouble"]), rows


def test_cloud_health_store_trainer_key_disk(cloud_env, tmp_path, kit):
    """The cloud's own degraded reasons, each injected for real and cleared: the blob directory replaced by a
    file (uploads answered 503, "store"), a training round that fails (its uploads' blobs gone, "trainer"), the
    signing key file removed ("signing_key"), a free-disk floor above what is free ("disk")."""
    from edgeadapt.cloud.config import load_config
    from edgeadapt.cloud.server import ServerThread, create_app
    from edgeadapt.cloud.service import CloudService

    home = tmp_path / "home"
    shutil.copytree(cloud_env.home, home)
    shutil.rmtree(home / "store", ignore_errors=True)
    cfg = load_config(home, {"bundle": str(cloud_env.bundle), "teacher": "resnet_edge",
                             "teacher_weights": str(cloud_env.teacher_weights),
                             "trainer": {"enabled": True, "train_every": 10**6, "train_interval_s": 2.0,
                                         "min_steps_per_round": 0, "seed": 0}}, environ={})
    service = CloudService(cfg, home)
    with ServerThread(create_app(service)) as srv:
        admin = {"Authorization": f"Bearer {cloud_env.admin_token}"}
        token = httpx.post(f"{srv.url}/v1/admin/devices", json={"name": "d"}, headers=admin).json()["token"]
        dev = {"Authorization": f"Bearer {token}"}

        def reasons() -> dict:
            return httpx.get(f"{srv.url}/healthz", timeout=30).json()["reasons"]

        assert reasons() == {}
        blobs = service.store.blobs.root
        # a training round that fails: the pending uploads' blobs gone before the round runs
        ok = httpx.post(f"{srv.url}/v1/samples", json=kit.batch_body(kit.synthetic_images(8)), headers=dev)
        assert ok.status_code == 200, ok.text
        blobs.rename(blobs.with_name("blobs.away"))
        service.store._input_cache.clear()
        t0 = time.time()
        trainer = wait_for(lambda: reasons().get("trainer"), 30, "the failed round in the cloud's health")
        trainer_s = time.time() - t0
        # the store failing: blobs is a file now, so an upload's write fails
        blobs.write_text("not a directory")
        r = httpx.post(f"{srv.url}/v1/samples", json=kit.batch_body(kit.synthetic_images(4)), headers=dev)
        store_reason = reasons().get("store", "")
        m = httpx.get(f"{srv.url}/metrics").text
        blobs.unlink()
        blobs.with_name("blobs.away").rename(blobs)
        ok = httpx.post(f"{srv.url}/v1/samples", json=kit.batch_body(kit.synthetic_images(4)), headers=dev)
        assert ok.status_code == 200, ok.text
        wait_for(lambda: "store" not in reasons() and "trainer" not in reasons(), 60, "store and trainer to clear")
        cleared_s = time.time() - t0
        # the signing key file gone (the service keeps signing with the key it loaded)
        key = home / "signing_key.pem"
        key.rename(home / "key.away")
        key_reason = reasons().get("signing_key", "")
        (home / "key.away").rename(key)
        assert "signing_key" not in reasons()
        service.config.min_free_disk_mb = 1e12
        disk_reason = reasons().get("disk", "")
        service.config.min_free_disk_mb = 0
        assert reasons() == {}
    assert r.status_code == 503 and "store failed" in r.json()["detail"], r.text
    assert "store error on /v1/samples" in store_reason and "NotADirectoryError" in store_reason, store_reason
    assert metric(m, "edgeadapt_cloud_store_errors_total") >= 1 and metric(m, "edgeadapt_cloud_degraded") == 1
    assert "training round failed" in trainer and "not found" in trainer, trainer
    assert "signing key" in key_reason and "missing" in key_reason, key_reason
    assert "MiB free under the store" in disk_reason, disk_reason
    report("cloud_health", trainer_s=round(trainer_s, 1), store_and_trainer_clear_s=round(cleared_s, 1),
           store=store_reason[:100], trainer=trainer[:100])


def test_cloud_init_hint_runs_as_printed(tmp_path):
    """`cloud init` prints the export command for its key (it used to print `--cloud-key <home>`, which export
    refused); with NAME and BUNDLE filled in it runs and writes a bundle that trusts this home's key. The
    "no cloud home" hint of the admin commands runs as printed too."""
    from edgeadapt.core.bundle import read_manifest
    from edgeadapt.core.signing import load_public_key_b64

    home = tmp_path / "home"
    r = runner.invoke(app, ["cloud", "init", str(home)], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    hint = re.search(r"(edgeadapt export --arch NAME --out BUNDLE --cloud-key \S+)", out)
    assert hint, out
    assert re.search(rf"edgeadapt cloud serve --home {re.escape(str(home))} --bundle BUNDLE", out), out
    bundle = tmp_path / "bundle"
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, x=rng.integers(0, 256, (256, 1, 32, 32), dtype=np.uint8), y=rng.integers(0, 10, 256))
    args = hint.group(1).replace("NAME", "resnet_edge").replace("BUNDLE", str(bundle)).split()[1:]
    # the hint as printed; --calib only spares the test the Fashion-MNIST download's absence on a bare runner
    e = runner.invoke(app, [*args, "--calib", str(calib)])
    assert e.exit_code == 0, e.output
    assert read_manifest(bundle).cloud_public_key == load_public_key_b64(home / "signing_key.pub")
    nohome = tmp_path / "nohome"
    r = runner.invoke(app, ["cloud", "devices", "--home", str(nohome)], env={"COLUMNS": "400"})
    assert r.exit_code == 2
    fix = re.search(r"`(edgeadapt cloud init [^`]+)`", " ".join(r.output.split()))
    assert fix, r.output
    assert runner.invoke(app, fix.group(1).split()[1:]).exit_code == 0
    add = runner.invoke(app, ["cloud", "devices", "--home", str(nohome), "add", "cam-1", "--json"])
    assert add.exit_code == 0, add.output  # a fresh home takes devices before its first serve


@pytest.mark.slow
def test_every_printed_command_hint_runs(cloud_env, tmp_path):
    """Each command hint the CLI prints, run as printed (placeholders NAME/BUNDLE filled, nothing else added),
    as separate processes: cloud init's export and serve hints, device run's export hint, the no-home hint, the
    doctor's new-token hint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEADAPT_")}
    py = [sys.executable, "-m", "edgeadapt"]

    def run(args: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(py + args, capture_output=True, text=True, timeout=timeout, env={**env, **kw})

    def hints(text: str) -> list[str]:
        return re.findall(r"`(edgeadapt [^`]+)`", " ".join(text.split()))

    home = tmp_path / "home"
    init = run(["cloud", "init", str(home)], COLUMNS="400")
    assert init.returncode == 0, init.stderr
    text = " ".join((init.stdout + init.stderr).split())
    export = re.search(r"(edgeadapt export --arch NAME --out BUNDLE --cloud-key \S+)", text).group(1)
    serve = re.search(r"(edgeadapt cloud serve --home \S+ --bundle BUNDLE)", text).group(1)
    bundle = tmp_path / "bundle"
    from edgeadapt.datasets.fmnist import load_fmnist

    try:
        load_fmnist("train")
    except FileNotFoundError:
        pytest.skip("export's default calibration data (Fashion-MNIST) is not installed")
    e = run(export.replace("NAME", "resnet_edge").replace("BUNDLE", str(bundle)).split()[1:])
    assert e.returncode == 0, e.stderr[-2000:]
    port = free_port()
    p = subprocess.Popen(py + serve.replace("BUNDLE", str(bundle)).split()[1:], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**env, "EDGEADAPT_CLOUD_LISTEN": f"127.0.0.1:{port}"})
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200, 120,
                 "the printed serve command to serve")
    finally:
        p.terminate()
        p.wait(30)
    # device run without a bundle prints how to export one
    missing = tmp_path / "missing-bundle"
    dr = run(["device", "run", "--bundle", str(missing), "--state-dir", str(tmp_path / "s")], COLUMNS="400")
    assert dr.returncode == 2
    (h,) = [x for x in hints(dr.stderr) if x.startswith("edgeadapt export")]
    e2 = run(h.replace("NAME", "resnet_edge").split()[1:])
    assert e2.returncode == 0 and (missing / "manifest.json").is_file(), e2.stderr[-2000:]
    # the doctor's fix for a missing token names the command that makes one
    doc = run(["doctor", "device", "--bundle", str(bundle), "--cloud", "http://127.0.0.1:9"], COLUMNS="400")
    assert doc.returncode == 1
    (add,) = [x for x in hints(doc.stdout) if x.startswith("edgeadapt cloud devices add")]
    r = run(add.replace("NAME", "cam-9").split()[1:], EDGEADAPT_CLOUD_HOME=str(home))
    assert r.returncode == 0, r.stderr


def test_doctor_cloud_and_device_name_what_can_never_work(cloud_env, tmp_path):
    """`doctor cloud` on a sound home and bundle: exit 0; with max_body_bytes below one sample, a keyless bundle,
    a missing home: exit 1 and a FATAL line saying what to do. `doctor device` standalone: exit 0; with --cloud
    but no token, and with a keyless bundle: exit 1. `device run` refuses the keyless bundle with --cloud before
    loading anything (exit 2)."""
    env = {"COLUMNS": "400"}
    home = tmp_path / "home"
    shutil.copytree(cloud_env.home, home)
    shutil.rmtree(home / "store", ignore_errors=True)

    def doctor(*args: str, **extra: str):
        return runner.invoke(app, ["doctor", *args], env={**env, **extra})

    ok = doctor("cloud", "--home", str(home), "--bundle", str(cloud_env.bundle), "--url", "http://127.0.0.1:9")
    assert ok.exit_code == 0, ok.output
    assert "ok    bundle key: the bundle trusts this cloud's signing key" in ok.output
    small = doctor("cloud", "--home", str(home), "--bundle", str(cloud_env.bundle), "--url", "http://127.0.0.1:9",
                   EDGEADAPT_CLOUD_MAX_BODY_BYTES="1024")
    assert small.exit_code == 1 and re.search(r"FATAL upload size: .* max_body_bytes is 1024", small.output), \
        small.output
    keyless = keyless_copy(cloud_env.bundle, tmp_path / "keyless")
    nokey = doctor("cloud", "--home", str(home), "--bundle", str(keyless), "--url", "http://127.0.0.1:9")
    assert nokey.exit_code == 1 and "FATAL bundle key: the bundle carries no cloud public key" in nokey.output
    assert f"--cloud-key {home / 'signing_key.pub'}" in nokey.output
    gone = doctor("cloud", "--home", str(tmp_path / "nope"))
    assert gone.exit_code == 1 and f"`edgeadapt cloud init {tmp_path / 'nope'}`" in gone.output, gone.output
    dev = doctor("device", "--bundle", str(cloud_env.bundle), "--state-dir", str(tmp_path / "state"))
    assert dev.exit_code == 0 and "ok    graphs" in dev.output and "ok    state dir" in dev.output, dev.output
    notoken = doctor("device", "--bundle", str(cloud_env.bundle), "--cloud", "http://127.0.0.1:9")
    assert notoken.exit_code == 1 and "FATAL token: --cloud is set but no device token" in notoken.output
    assert "FATAL cloud: cannot reach http://127.0.0.1:9" in notoken.output
    kd = doctor("device", "--bundle", str(keyless), "--cloud", "http://127.0.0.1:9", EDGEADAPT_TOKEN="t" * 20)
    assert kd.exit_code == 1 and "FATAL cloud key: the bundle carries no cloud public key" in kd.output
    assert doctor("device", "--bundle", str(keyless), "--cloud", "http://127.0.0.1:9", "--no-updates",
                  "--json", EDGEADAPT_TOKEN="t" * 20).exit_code == 1  # the unreachable cloud still is fatal
    run = runner.invoke(app, ["device", "run", "--bundle", str(keyless), "--state-dir", str(tmp_path / "s"),
                              "--cloud", "http://127.0.0.1:9"], env={**env, "EDGEADAPT_TOKEN": "t" * 20})
    assert run.exit_code == 2 and "will not start: the bundle carries no cloud public key" in run.output, run.output
