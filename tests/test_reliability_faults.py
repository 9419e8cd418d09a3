"""Faults, with the real processes: `edgeadapt device run` and `edgeadapt cloud serve` as subprocesses talking
HTTP on loopback, killed with SIGKILL, starved of disk, fed corrupted files. Each test prints one ``FAULT {...}``
line with its counts (sent, received, lost, duplicated); docs/RELIABILITY.md reports them.

Simulations, and why: "disk full" is RLIMIT_FSIZE set on the device process (``preexec_fn``; later raised again
with ``prlimit``): every write past the limit fails with EFBIG, as on a full disk, and it works as root, unlike a
read-only chmod (root ignores permissions). "Unwritable state directory" is a regular file where the directory
should be (also root-proof); the chmod variant runs only when the tests do not run as root.
"""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.procs import Load, Proc, add_device, cloud_proc, device_proc, fresh_cloud_home, wait_for

pytest_plugins = ["tests.cloud_fixtures"]

pytestmark = pytest.mark.slow

# a device that reacts fast: short upload/update polls, state saved often, a short watch window
FAST = dict(upload_interval_s=0.2, update_poll_s=0.2, watch_batches=2, save_state_every_s=0.5, max_wait_ms=2)


def report(fault: str, **counts) -> None:
    print("FAULT " + json.dumps({"fault": fault, **counts}, default=str), flush=True)


def status(dev: Proc) -> dict:
    return dev.get("/v1/status").json()


def cloud_samples(home: Path, device: str) -> list[str]:
    """Every sample id the cloud store holds for this device (one row per stored upload)."""
    con = sqlite3.connect(home / "store" / "cloud.db", timeout=30)
    try:
        rows = con.execute("SELECT sample_id FROM samples WHERE device_id=(SELECT id FROM devices WHERE name=?)",
                           (device,)).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def queue_ids(state: Path) -> list[str]:
    """The ids waiting in a (stopped) device's upload queue, read straight from its SQLite file."""
    con = sqlite3.connect(state / "queue.sqlite", timeout=30)
    try:
        return [r[0] for r in con.execute("SELECT id FROM items")]
    finally:
        con.close()


def metric(text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples over its labels (``name`` exactly, e.g. ``..._total``)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith("#") and line.split("{", 1)[0].split(" ", 1)[0] == name:
            total += float(line.rsplit(" ", 1)[1])
    return total


def publish(home: Path, cloud: Proc, admin: str, bias: float, parent: int) -> int:
    """Publish a version the way the trainer does (store.add_version) and roll it out to all devices."""
    from edgeadapt.cloud.admin import open_store
    from edgeadapt.cloud.config import load_config
    store = open_store(home, load_config(home))
    try:
        base = store.get_params(0)
        params = {k: (v + bias if k.endswith(".bias") else v) for k, v in base.items()}
        v = store.add_version(params, parent=parent, note=f"fault test bias {bias}")
    finally:
        store.close()
    r = cloud.post("/v1/admin/rollouts", json={"version": v}, headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code in (200, 201), r.text
    return v


@pytest.fixture()
def procs():
    """Every process a test starts is stopped at the end, even when the test fails."""
    started: list[Proc] = []
    yield started
    for p in started:
        try:
            p.stop()
        except Exception:  # the test's own failure is the interesting one
            pass


# ---------------------------------------------------------------------------------------------------------------
def test_device_sigkill_while_uploading_delivers_every_sample_once(cloud_env, tmp_path, procs):
    """SIGKILL the device three times while its uploader drains a backlog; after the last restart every queued
    sample is in the cloud exactly once, and the adaptation state and the version in use come back."""
    home = fresh_cloud_home(cloud_env, tmp_path / "home")
    cloud = cloud_proc(cloud_env, home, tmp_path / "cloud.log").start()
    procs.append(cloud)
    token = add_device(cloud, cloud_env.admin_token, "dev-kill")
    state = tmp_path / "state"
    dev = device_proc(cloud_env.bundle, state, tmp_path / "device.log", cloud.url, token, upload_all=1, **FAST)
    procs.append(dev)
    dev.start()
    v1 = publish(home, cloud, cloud_env.admin_token, 0.001, 0)
    with Load(dev.url, clients=2, batch=16) as load:
        wait_for(lambda: status(dev)["updater"]["counters"]["kept"] == 1, 90, "version 1 applied and kept")
    assert load.failed == []
    kills, in_queue_at_kill, restored = 0, set(), []
    for _ in range(3):
        with Load(dev.url, clients=2, batch=64) as load:
            wait_for(lambda: status(dev)["queue"]["queued"] >= 128 and status(dev)["queue"]["sent"] > 0, 90,
                     "a backlog that is being drained")
            before = status(dev)["adapted_batches"]
            time.sleep(1.5)  # > 2 save periods: the state saved before the kill is at least `before`
        assert load.failed == [], load.failed[:3]
        last = status(dev)
        dev.kill()  # the uploader is mid-drain: the backlog was >= 128 items a moment ago
        kills += 1
        left = queue_ids(state)
        in_queue_at_kill.update(left)
        dev.start()
        st = status(dev)
        restored.append((before, st["adapted_batches"], last["adapted_batches"]))
        assert before <= st["adapted_batches"] <= last["adapted_batches"], restored[-1]
        assert st["param_version"] == v1  # the version in use survives the kill
        assert st["queue"]["put"] == last["queue"]["put"]  # every sample queued before the kill is still counted
        assert st["updater"]["counters"]["applied"] == 0  # nothing re-applied: it was restored from disk
    wait_for(lambda: status(dev)["queue"]["queued"] == 0, 120, "the queue to drain after the last restart")
    q = status(dev)["queue"]
    ids = cloud_samples(home, "dev-kill")
    dup_metric = metric(cloud.get("/metrics").text, "edgeadapt_cloud_samples_duplicate_total")
    report("device_sigkill_uploading", kills=kills, sent=q["put"], received=len(set(ids)), rows=len(ids),
           lost=q["put"] - len(set(ids)), duplicated=len(ids) - len(set(ids)),
           retransmits_absorbed=dup_metric, queued_at_kills=len(in_queue_at_kill), adapt_batches=restored,
           version=v1)
    assert len(ids) == len(set(ids))  # once ...
    assert len(ids) == q["put"] == q["sent"]  # ... and every one
    assert in_queue_at_kill and in_queue_at_kill <= set(ids)  # what was queued at each kill got through
    assert q["rejected"] == 0 and q["duplicates"] == 0
    assert sum(v for k, v in q.items() if k.startswith("dropped")) == 0


# ---------------------------------------------------------------------------------------------------------------
def test_cloud_down_device_serves_queue_bounded_then_drains(cloud_env, tmp_path, procs):
    """The cloud is SIGKILLed for 12 s under load: no failed prediction, the queue never exceeds its byte bound
    (the oldest samples are dropped and counted), and it drains once the cloud is back on the same address."""
    home = fresh_cloud_home(cloud_env, tmp_path / "home")
    cloud = cloud_proc(cloud_env, home, tmp_path / "cloud.log").start()
    procs.append(cloud)
    token = add_device(cloud, cloud_env.admin_token, "dev-down")
    bound = 256 * 1024
    dev = device_proc(cloud_env.bundle, tmp_path / "state", tmp_path / "device.log", cloud.url, token,
                      upload_all=1, queue_max_bytes=bound, **FAST)
    procs.append(dev)
    dev.start()
    peak = 0
    with Load(dev.url, clients=2, batch=16, pause_s=0.02) as load:
        wait_for(lambda: status(dev)["queue"]["sent"] > 100, 60, "uploads flowing")
        cloud.kill()
        t_down = time.time()
        while time.time() - t_down < 12:
            q = status(dev)["queue"]
            peak = max(peak, q["queued_bytes"])
            assert q["queued_bytes"] <= bound, q
            time.sleep(0.1)
        down = status(dev)
        metrics_down = dev.get("/metrics").text
        cloud.start()
        t_up = time.time()
        served_during = load.samples
    drain = wait_for(lambda: status(dev)["queue"]["queued"] == 0 and status(dev)["queue"], 60,
                     "the queue to drain after the cloud came back")
    drain_s = time.time() - t_up
    ids = cloud_samples(home, "dev-down")
    dropped = drain["dropped_oldest"]
    report("cloud_down", down_s=12, predictions_ok=load.ok, predictions_failed=len(load.failed),
           samples_served=served_during, queue_bound=bound, queue_peak_bytes=peak, put=drain["put"],
           sent=drain["sent"], received=len(set(ids)), dropped_by_policy=dropped,
           lost_unaccounted=drain["put"] - drain["sent"] - dropped - drain["rejected"],
           duplicated=len(ids) - len(set(ids)), drain_s=round(drain_s, 1), down_errors=down["errors"],
           upload_error=down["uploader"]["last_error"])
    assert load.failed == [], load.failed[:3]
    assert load.ok > 50
    assert peak <= bound
    assert dropped > 0  # 12 s of samples do not fit in 256 KiB: the bound did work
    assert metric(metrics_down, "edgeadapt_uploads_dropped") > 0
    assert "cloud_unreachable" in down["errors"] and down["uploader"]["errors"] > 0  # the outage is visible ...
    assert "ConnectError" in down["uploader"]["last_error"]  # ... with its reason
    assert status(dev)["uploader"]["last_error"] is None and "cloud_unreachable" not in status(dev)["errors"]
    assert drain["put"] == drain["sent"] + dropped + drain["rejected"]  # every sample accounted for
    assert len(ids) == len(set(ids))
    # nothing the device counted as sent is missing. Items of a batch in flight that drop_oldest evicted count as
    # sent once acked; only the batch the cloud stored just before it was killed (no ack), then evicted on the device
    # before its retry, is in the cloud but not counted as sent
    assert drain["sent"] <= len(ids) <= drain["sent"] + 64
    assert drain_s < 30


# ---------------------------------------------------------------------------------------------------------------
def _upload(cloud: Proc, token: str, n: int, seed: int, until: threading.Event | None = None
            ) -> tuple[list[str], list[str]]:
    """POST n shifted samples in batches of 64 as a device -> (acked ids, ids whose batch failed). With ``until``:
    keep sending batches (new ids each time) until the event is set or a batch fails (the cloud died)."""
    from tests.cloud_fixtures import TEST_SHIFT, batch_body, synthetic_images

    xs = synthetic_images(n, seed=seed, shift=TEST_SHIFT)
    acked, failed = [], []
    with httpx.Client(base_url=cloud.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        i = 0
        while i < n or (until is not None and not until.is_set() and not failed):
            j = i % n
            ids = [uuid.uuid4().hex for _ in xs[j : j + 64]]
            try:
                r = c.post("/v1/samples", json=batch_body(xs[j : j + 64], ids))
                (acked if r.status_code == 200 else failed).extend(ids)
            except httpx.HTTPError:
                failed.extend(ids)
            i += 64
            if i > n and until is not None:
                until.wait(0.2)  # a device's pace, not a flood: the round after the restart stays short
    return acked, failed


def _store_consistent(home: Path) -> dict:
    """Every version, parameter set and package the store names exists and hash-verifies."""
    from edgeadapt.core.tensorfile import params_from_bytes, params_hash

    con = sqlite3.connect(home / "store" / "cloud.db", timeout=30)
    blobs = home / "store" / "blobs"
    try:
        versions = con.execute("SELECT version, params_hash, blob FROM versions ORDER BY version").fetchall()
        for v, h, blob in versions:
            assert (blobs / blob).is_file(), f"version {v}: blob {blob} missing"
            assert params_hash(params_from_bytes((blobs / blob).read_bytes())) == h, f"version {v}: hash mismatch"
        for h, blob in con.execute("SELECT params_hash, blob FROM param_sets"):
            assert params_hash(params_from_bytes((blobs / blob).read_bytes())) == h, f"param set {blob}: bad hash"
        for (blob,) in con.execute("SELECT blob FROM packages"):
            assert (blobs / blob).is_file(), f"package {blob} missing"
        published = con.execute("SELECT version FROM candidates WHERE status='published'").fetchall()
        known = {v for v, _, _ in versions}
        assert all(v in known for (v,) in published)
        consumed = con.execute("SELECT COUNT(*) FROM samples WHERE consumed=1").fetchone()[0]
        trained = sum(json.loads(m).get("samples", 0) for (m,) in con.execute("SELECT metrics FROM candidates"))
        samples = con.execute("SELECT COUNT(*), COUNT(DISTINCT sample_id) FROM samples").fetchone()
        sample_blobs = {b for (b,) in con.execute("SELECT DISTINCT blob FROM samples")}
        assert all((blobs / b).is_file() for b in sample_blobs), "a stored sample points to a missing blob"
    finally:
        con.close()
    # an upload marked as trained on belongs to a recorded training round: a kill never "uses up" uploads
    assert consumed == trained, f"{consumed} uploads marked consumed, recorded rounds trained on {trained}"
    return {"versions": [v for v, _, _ in versions], "samples": samples[0], "distinct": samples[1],
            "consumed": consumed}


def test_cloud_sigkill_mid_training_loses_no_upload_and_publishes_no_partial_version(cloud_env, tmp_path, procs):
    """Train, then SIGKILL the cloud at two points inside later training rounds (uploads arriving meanwhile).
    After each restart: every acknowledged upload is stored once, every version hash-verifies, and a device can
    fetch and verify the latest version."""
    from edgeadapt.core import update_package as UP
    from edgeadapt.core.bundle import Bundle

    home = fresh_cloud_home(cloud_env, tmp_path / "home")
    cloud = cloud_proc(cloud_env, home, tmp_path / "cloud.log", trainer=True).start()
    procs.append(cloud)
    admin = {"Authorization": f"Bearer {cloud_env.admin_token}"}
    token = add_device(cloud, cloud_env.admin_token, "dev-train")
    acked, unacked = _upload(cloud, token, 512, seed=10)
    t0 = time.time()
    first = cloud.post("/v1/admin/train", headers=admin, timeout=300).json()
    round_s = time.time() - t0
    assert first["status"] in ("published", "rejected"), first
    port = cloud.url.rsplit(":", 1)[1]
    kills = []
    for i, frac in enumerate((0.3, 0.75)):
        more, failed = _upload(cloud, token, 640, seed=20 + i)
        acked += more
        unacked += failed
        result: dict = {}

        def train(out: dict = result) -> None:
            try:
                out["r"] = cloud.post("/v1/admin/train", headers=admin, timeout=300).json()
            except httpx.HTTPError as exc:
                out["r"] = repr(exc)

        trainer = threading.Thread(target=train)
        trainer.start()
        sender_out: dict = {}
        stop = threading.Event()
        sender = threading.Thread(target=lambda o=sender_out, s=30 + i, e=stop: o.update(r=_upload(cloud, token, 256,
                                                                                                 s, e)))
        sender.start()  # uploads keep arriving until the kill: some are in flight when it lands
        time.sleep(round_s * 1.25 * frac)  # this round trains on more uploads than the first: a bit longer
        cloud.kill()
        stop.set()
        trainer.join(60)
        sender.join(60)
        a, f = sender_out["r"]
        acked += a
        unacked += f
        kills.append({"at_s": round(round_s * 1.25 * frac, 1), "train": result.get("r"), "acked_in_flight": len(a),
                      "failed_in_flight": len(f)})
        cloud.start()
        assert cloud.url.endswith(port)
        stored = set(cloud_samples(home, "dev-train"))
        assert set(acked) <= stored, f"{len(set(acked) - stored)} acknowledged uploads lost"
        _store_consistent(home)
    # the device resends what never got an answer (as its queue would): stored once either way
    resent, still = [], []
    from tests.cloud_fixtures import batch_body, synthetic_images

    with httpx.Client(base_url=cloud.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        for j in range(0, len(unacked), 64):
            ids = unacked[j : j + 64]
            r = c.post("/v1/samples", json=batch_body(synthetic_images(len(ids), seed=99), ids))
            (resent if r.status_code == 200 else still).extend(ids)
    assert still == []
    after = cloud.post("/v1/admin/train", headers=admin, timeout=300).json()
    assert after["status"] in ("published", "rejected", "idle"), after
    summary = _store_consistent(home)
    ids = cloud_samples(home, "dev-train")
    sent = len(acked) + len(unacked)
    # the latest version reaches a device intact
    latest = summary["versions"][-1]
    pkg = httpx.get(f"{cloud.url}/v1/updates", params={"model": "fmnist-edge", "have": 0},
                    headers={"Authorization": f"Bearer {token}"}, timeout=60)
    if latest > 0:
        assert pkg.status_code == 200, pkg.text
        bundle = Bundle(cloud_env.bundle)
        version, _, _ = UP.verify_and_apply(pkg.content, bundle.manifest.cloud_public_key, "fmnist-edge", 0,
                                            bundle.params)
        assert version == latest
    report("cloud_sigkill_training", kills=kills, first_round_s=round(round_s, 1), sent=sent,
           acked_first_time=len(acked), resent_after_restart=len(resent), received=len(set(ids)),
           lost=sent - len(set(ids) & set(acked + unacked)), duplicated=len(ids) - len(set(ids)),
           versions=summary["versions"], consumed=summary["consumed"], final_round=after.get("status"))
    assert len(ids) == len(set(ids)) == sent


# ---------------------------------------------------------------------------------------------------------------
def test_disk_full_on_device_keeps_serving_and_reports(cloud_env, tmp_path, procs):
    """RLIMIT_FSIZE on the device process (a full disk, as the process sees it): predictions go on, the queue's
    failure is in /v1/status and the log; once the limit is lifted the error clears and queuing resumes."""
    limit = 1024 * 1024

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    state = tmp_path / "state"
    # a cloud that never answers: uploads are kept (a standalone device queues nothing it could never send)
    dev = device_proc(cloud_env.bundle, state, tmp_path / "device.log", cloud_url="http://127.0.0.1:9",
                      token="t" * 20, upload_all=1, **FAST)
    dev.preexec_fn = small_disk
    procs.append(dev)
    dev.start()
    with Load(dev.url, clients=2, batch=32) as load:
        st = wait_for(lambda: (s := status(dev))["errors"].get("queue") and s, 90, "the queue to report the full disk")
        ok_at_error, put_at_error = load.ok, st["queue"]["put"]
        wait_for(lambda: load.ok > ok_at_error + 20, 60, "predictions to continue after the disk filled")
        queued_full = status(dev)["queue"]["put"]
        resource.prlimit(dev.popen.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        wait_for(lambda: "queue" not in status(dev)["errors"] and status(dev)["queue"]["put"] > queued_full, 60,
                 "queuing to resume once space is back")
    log = dev.tail(200_000)
    report("disk_full_device", fsize_limit=limit, predictions_ok=load.ok, predictions_failed=len(load.failed),
           error=st["errors"]["queue"], put_before_full=put_at_error, put_while_full=queued_full - put_at_error, put_after=status(dev)["queue"]["put"])
    assert load.failed == [], load.failed[:3]
    assert "could not queue uploads" in st["errors"]["queue"]
    assert "SQLITE_IOERR_WRITE" in st["errors"]["queue"] or "SQLITE_FULL" in st["errors"]["queue"]
    assert f"file size limit (RLIMIT_FSIZE) {limit} bytes" in st["errors"]["queue"]  # says why
    assert put_at_error > 0  # the queue worked until the "disk" filled
    assert "could not queue uploads" in log


@pytest.mark.parametrize("how", ["file", "chmod"])
def test_unwritable_state_dir_keeps_serving_and_reports(cloud_env, tmp_path, procs, how):
    """The state directory cannot be written: at start (a file in its place, or chmod 0500 when not root) the
    device serves without persistence and says so; when it breaks while running, saving state fails loudly and
    recovers when the directory is back."""
    if how == "chmod" and os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the 'file' variant covers this")
    state = tmp_path / "state"
    if how == "file":
        state.write_text("not a directory")
    else:
        state.mkdir()
        state.chmod(0o500)
    dev = device_proc(cloud_env.bundle, state, tmp_path / "device.log", upload_all=1, **FAST)
    procs.append(dev)
    try:
        dev.start()
        with Load(dev.url, clients=2, batch=16) as load:
            wait_for(lambda: load.ok > 20, 60, "predictions")
        st = status(dev)
        assert load.failed == []
        assert "not writable" in st["errors"]["state_dir"], st["errors"]
        assert "not writable" in dev.tail(200_000)
        started_broken = {"ok": load.ok, "error": st["errors"]["state_dir"]}
        dev.stop()
    finally:
        if how == "chmod":
            state.chmod(0o700)
    # now the directory breaks under a running device: replaced by a file (the open queue keeps its inode)
    state2 = tmp_path / "state2"
    dev2 = device_proc(cloud_env.bundle, state2, tmp_path / "device2.log", upload_all=1, **FAST)
    procs.append(dev2)
    dev2.start()
    with Load(dev2.url, clients=2, batch=16) as load2:
        wait_for(lambda: load2.ok > 10, 60, "predictions")
        state2.rename(tmp_path / "state2.moved")
        state2.write_text("the directory is gone")
        err = wait_for(lambda: status(dev2)["errors"].get("save_state"), 30, "the save error to show")
        ok_at_error = load2.ok
        wait_for(lambda: load2.ok > ok_at_error + 10, 60, "predictions to continue")
        state2.unlink()
        (tmp_path / "state2.moved").rename(state2)
        wait_for(lambda: "save_state" not in status(dev2)["errors"], 30, "the save error to clear")
    report(f"unwritable_state_dir_{how}", at_start=started_broken, predictions_ok=load2.ok,
           predictions_failed=len(load2.failed), runtime_error=err)
    assert load2.failed == []
    assert "could not save adaptation state" in err
    assert "could not save adaptation state" in dev2.tail(200_000)


# ---------------------------------------------------------------------------------------------------------------
def _flip(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_bundle_and_stored_version_keep_previous_good_state(cloud_env, tmp_path, procs):
    """A bundle file changed after export: the device refuses to start, says which file, and leaves its state
    alone. A stored version changed on disk: the device says so and runs the previous good version, then takes
    the cloud's version again (stored anew)."""
    import shutil

    home = fresh_cloud_home(cloud_env, tmp_path / "home")
    cloud = cloud_proc(cloud_env, home, tmp_path / "cloud.log").start()
    procs.append(cloud)
    token = add_device(cloud, cloud_env.admin_token, "dev-corrupt")
    bundle = tmp_path / "bundle"
    shutil.copytree(cloud_env.bundle, bundle)
    state = tmp_path / "state"
    dev = device_proc(bundle, state, tmp_path / "device.log", cloud.url, token, **FAST)
    procs.append(dev)
    dev.start()
    with Load(dev.url, clients=1, batch=16):
        for v, bias in ((1, 0.001), (2, 0.002)):
            assert publish(home, cloud, cloud_env.admin_token, bias, v - 1) == v
            wait_for(lambda v=v: status(dev)["updater"]["counters"]["kept"] == v, 90, f"version {v} kept")
    before = status(dev)
    assert dev.stop() == 0
    files = {p.name: p.read_bytes() for p in state.rglob("*") if p.is_file() and "queue" not in p.name}

    # 1. corrupted bundle: refused at start, state untouched
    onnx = sorted(bundle.glob("*.onnx"))[0]
    good_onnx = onnx.read_bytes()
    _flip(onnx)
    dev.start(wait=False)
    rc = dev.wait_exit(120)
    out = " ".join(dev.tail(5000).split())  # the console wraps long lines
    assert rc != 0
    assert f"failed verification: {onnx.name}: sha256 mismatch" in out, out
    assert {p.name: p.read_bytes() for p in state.rglob("*") if p.is_file() and "queue" not in p.name} == files
    onnx.write_bytes(good_onnx)

    # 2. corrupted stored version: the device falls back to the previous good version and reports it
    _flip(state / "versions" / "v2.safetensors")
    cloud.kill()  # no cloud: what the device runs right after the restart is its own decision
    dev.start()
    st = status(dev)
    assert st["param_version"] == 1, st
    assert "version 2 on disk is corrupt" in st["errors"].get("versions", ""), st["errors"]
    assert "version 2 on disk is corrupt" in dev.tail(20_000)
    assert st["adapted_batches"] >= before["adapted_batches"]  # the adaptation state was kept too
    with Load(dev.url, clients=1, batch=16) as load:
        time.sleep(2)
        cloud.start()
        wait_for(lambda: status(dev)["param_version"] == 2, 90, "version 2 fetched again from the cloud")
    assert load.failed == []
    from edgeadapt.core.bundle import Bundle
    from edgeadapt.device.versions import VersionStore

    VersionStore(state, Bundle(bundle).params).load(2)  # the re-fetched version is stored intact
    report("corrupted_bundle_and_version", bundle_rc=rc, bundle_error=out[out.index("bundle "):][:300],
           version_error=st["errors"]["versions"], fell_back_to=st["param_version"],
           recovered_version=status(dev)["param_version"], predictions_failed=len(load.failed))
