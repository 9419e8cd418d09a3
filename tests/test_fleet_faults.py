"""Faults of the shared store under load (issue 18, item 6), with real processes: a `cloud serve` on PostgreSQL + an
S3-compatible server (moto's server mode, standing in for S3) and a device uploading everything it serves.

PostgreSQL restarted, then the object store down for a few seconds each: predictions never fail, ingest answers
503 while the store is away and the device keeps its queue (the outage shows in both sides' health), the service
resumes by itself, and in the end every sample the device counts as sent is in the store exactly once."""

from __future__ import annotations

import time

import pytest

from tests.procs import Load, add_device, cloud_proc, device_proc, fresh_cloud_home, wait_for

pytest_plugins = ["tests.cloud_fixtures", "tests.store_servers"]
pytestmark = pytest.mark.timeout(420)

FAST = dict(upload_interval_s=0.2, update_poll_s=0.5, save_state_every_s=0.5, max_wait_ms=2, degraded_after_s=1)


def _stored_ids(db_url: str, bucket: str, endpoint: str, device: str) -> list[str]:
    from edgeadapt.cloud.store import PostgresStore, open_blob_store

    store = PostgresStore(db_url, open_blob_store(bucket, endpoint))
    try:
        dev = store.get_device(device)
        with store.db.reader() as tx:
            rows = tx.all("SELECT sample_id FROM samples WHERE device_id=?", (dev.id,))
        return [r["sample_id"] for r in rows]
    finally:
        store.close()


def _outage(dev, cloud, seconds: float, restore) -> dict:
    """Hold the outage ``seconds`` under load, watching both sides; then ``restore()`` and wait for the uploads to
    flow again. -> what was seen while it lasted."""
    seen = {"cloud_status": set(), "upload_errors": set(), "queued_max": 0}
    t0 = time.time()
    sent_before = dev.get("/v1/status").json()["queue"]["sent"]
    while time.time() - t0 < seconds:
        q = dev.get("/v1/status").json()
        seen["queued_max"] = max(seen["queued_max"], q["queue"]["queued"])
        if q["uploader"]["last_error"]:
            seen["upload_errors"].add(q["uploader"]["last_error"][:80])
        h = cloud.get("/healthz").json()
        seen["cloud_status"].add(h["status"])
        time.sleep(0.25)
    seen["sent_during"] = dev.get("/v1/status").json()["queue"]["sent"] - sent_before
    restore()
    sent_at_restore = dev.get("/v1/status").json()["queue"]["sent"]
    wait_for(lambda: dev.get("/v1/status").json()["queue"]["sent"] > sent_at_restore + 16, 60,
             "uploads to flow again after the store came back")
    return seen


def test_postgres_restart_and_object_store_outage_under_upload_load(cloud_env, postgres_server, s3_server,
                                                                      tmp_path):
    db_url, bucket = postgres_server.create_database(), s3_server.bucket_url()
    home = fresh_cloud_home(cloud_env, tmp_path / "home")
    cloud = cloud_proc(cloud_env, home, tmp_path / "cloud.log",
                       extra=("--database-url", db_url, "--blob-url", bucket, "--blob-endpoint-url",
                              s3_server.endpoint_url))
    dev = None
    try:
        cloud.start()
        token = add_device(cloud, cloud_env.admin_token, "cam")
        dev = device_proc(cloud_env.bundle, tmp_path / "state", tmp_path / "device.log", cloud.url, token,
                          upload_all=1, **FAST).start()
        with Load(dev.url, clients=2, batch=16, pause_s=0.05) as load:
            wait_for(lambda: dev.get("/v1/status").json()["queue"]["sent"] > 64, 60, "uploads flowing")
            postgres_server.stop()
            db_down = _outage(dev, cloud, 4.0, postgres_server.start)
            s3_server.stop()
            blobs_down = _outage(dev, cloud, 4.0, s3_server.start)
            served = load.samples
        final = wait_for(lambda: (q := dev.get("/v1/status").json()["queue"])["queued"] == 0 and q, 90,
                         "the device's queue to drain")
        health = cloud.get("/healthz").json()
    finally:
        if dev is not None:
            dev.stop()
        cloud.stop()
    assert load.failed == [], load.failed[:3]  # the device served throughout
    for what, seen in (("database", db_down), ("object store", blobs_down)):
        # ingest refused while the store was away (503), the device kept the samples queued and said why
        assert seen["sent_during"] <= 16 * 8, (what, seen)  # at most a batch or two acked at its very start
        assert seen["queued_max"] > 0, (what, seen)
        assert any("503" in e for e in seen["upload_errors"]), (what, seen)
        assert seen["cloud_status"] & {"degraded", "not ready"}, (what, seen)  # the cloud's health named it
    assert health["status"] == "ok", health  # and it recovered by itself
    ids = _stored_ids(db_url, bucket, s3_server.endpoint_url, "cam")
    print("FAULT", {"database": {k: sorted(v) if isinstance(v, set) else v for k, v in db_down.items()},
                    "object_store": {k: sorted(v) if isinstance(v, set) else v for k, v in blobs_down.items()},
                    "predictions_ok": load.ok, "put": final["put"], "sent": final["sent"], "stored": len(ids),
                    "dropped_oldest": final["dropped_oldest"], "rejected": final["rejected"]}, flush=True)
    assert len(ids) == len(set(ids))  # no duplicate from the retries
    # no acknowledged sample lost: everything the device counts as sent is stored (a batch stored just as the
    # answer was lost is stored once and counted once it is retried)
    assert final["sent"] == len(ids), (final, len(ids))
    assert final["put"] == final["sent"] + final["dropped_oldest"] + final["rejected"]
    assert served > 0


def _trainer_replica(cloud_env, home, log, shared: tuple[str, ...]):
    """A `cloud serve` with its background trainer on (cloud_proc's admin-API-only trainer is off), rounds long
    enough to be killed in the middle and a short lease."""
    import sys

    from tests.conftest import free_port
    from tests.procs import Proc, _env

    port = free_port()
    args = [sys.executable, "-m", "edgeadapt", "cloud", "serve", "--home", str(home), "--bundle", str(cloud_env.bundle),
            "--listen", f"127.0.0.1:{port}", "--teacher", "resnet_edge", "--teacher-weights",
            str(cloud_env.teacher_weights), "--seed", "0", *shared]
    env = _env(EDGEADAPT_CLOUD_TRAINER__TRAIN_EVERY="32", EDGEADAPT_CLOUD_TRAINER__TRAIN_INTERVAL_S="1",
               EDGEADAPT_CLOUD_TRAINER__MIN_STEPS_PER_ROUND="600", EDGEADAPT_CLOUD_TRAINER__ROUND_LEASE_S="3",
               EDGEADAPT_CLOUD_TRAINER__GATE_TOLERANCE="1.0", EDGEADAPT_CLOUD_TRAINER__TORCH_THREADS="1")
    return Proc("cloud", args, f"http://127.0.0.1:{port}", log, env)


@pytest.mark.slow  # ~70 s: a 600-step round is killed and redone
def test_a_trainer_killed_mid_round_is_redone_and_published_once(cloud_env, kit, postgres_server, s3_server,
                                                                   tmp_path):
    """Two replicas with trainers on one PostgreSQL + bucket; the one holding the round's lease is SIGKILLed in the
    middle of it: its round leaves nothing, the other takes the lineage once the lease expires and publishes the
    round, once."""
    from edgeadapt.cloud.store import PostgresStore, open_blob_store

    db_url, bucket = postgres_server.create_database(), s3_server.bucket_url()
    home = fresh_cloud_home(cloud_env, tmp_path / "home")
    shared = ("--database-url", db_url, "--blob-url", bucket, "--blob-endpoint-url", s3_server.endpoint_url)
    a = _trainer_replica(cloud_env, home, tmp_path / "a.log", shared)
    b = _trainer_replica(cloud_env, home, tmp_path / "b.log", shared)
    store = None
    try:
        a.start()
        b.start()
        token = add_device(a, cloud_env.admin_token, "cam")
        r = a.post("/v1/samples", json=kit.batch_body(kit.synthetic_images(64, seed=5, shift=kit.TEST_SHIFT)),
                   headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["accepted"] == 64, r.text
        store = PostgresStore(db_url, open_blob_store(bucket, s3_server.endpoint_url))

        def holder() -> str | None:
            with store.db.reader() as tx:
                row = tx.one("SELECT holder FROM round_leases WHERE lineage='global'")
            return row["holder"] if row else None

        first = wait_for(holder, 60, "a replica to take the round's lease")
        pid = int(first.split(":")[1])
        victim, survivor = (a, b) if pid == a.popen.pid else (b, a)
        assert pid == victim.popen.pid
        time.sleep(1.0)  # well inside its round of 600 steps
        assert store.latest_version() == 0  # not finished when it dies
        victim.kill()
        t_kill = time.time()
        wait_for(lambda: store.latest_version() == 1, 240, "the surviving replica to redo and publish the round")
        redo_s = time.time() - t_kill
        time.sleep(2.0)  # nothing else comes after it
        versions = [v.version for v in store.list_versions()]
        candidates = store.list_candidates()
        pending = store.count_samples("train", consumed=False)
        second = holder()
    finally:
        a.stop()
        b.stop()
        if store is not None:
            store.close()
    print("FAULT", {"trainer_killed": {"redo_s": round(redo_s, 1), "versions": versions,
                                       "candidates": len(candidates)}}, flush=True)
    assert versions == [0, 1] and len(candidates) == 1 and candidates[0].status == "published"
    assert pending == 0  # every upload trained, by the round that was recorded
    assert second != first  # the dead worker's lease is gone (taken over, then released)


def test_a_replica_killed_under_load_devices_move_to_the_other(cloud_env, postgres_server, s3_server, tmp_path):
    """A device given two replicas (``cloud_url = "A,B"``) uploads everything it serves through A; A is SIGKILLed:
    the device moves its uploads, update checks and heartbeats to B after one failed request, no prediction
    fails, and every sample it counts as sent is in the shared store once."""
    db_url, bucket = postgres_server.create_database(), s3_server.bucket_url()
    home = fresh_cloud_home(cloud_env, tmp_path / "home")
    shared = ("--database-url", db_url, "--blob-url", bucket, "--blob-endpoint-url", s3_server.endpoint_url)
    a = cloud_proc(cloud_env, home, tmp_path / "a.log", extra=shared)
    b = cloud_proc(cloud_env, home, tmp_path / "b.log", extra=shared)
    dev = None
    try:
        a.start()
        b.start()
        token = add_device(a, cloud_env.admin_token, "cam")
        dev = device_proc(cloud_env.bundle, tmp_path / "state", tmp_path / "device.log", f"{a.url},{b.url}", token,
                          upload_all=1, **FAST).start()
        st = dev.get("/v1/status").json()
        assert st["cloud_endpoints"]["current"] == a.url and st["cloud_endpoints"]["urls"] == [a.url, b.url]
        with Load(dev.url, clients=2, batch=16, pause_s=0.05) as load:
            wait_for(lambda: dev.get("/v1/status").json()["queue"]["sent"] > 64, 60, "uploads flowing through A")
            a.kill()
            sent_at_kill = dev.get("/v1/status").json()["queue"]["sent"]
            t_kill = time.time()
            wait_for(lambda: dev.get("/v1/status").json()["queue"]["sent"] > sent_at_kill + 64, 60,
                     "uploads flowing through B")
            moved_s = time.time() - t_kill
            time.sleep(1.0)
        final = wait_for(lambda: (q := dev.get("/v1/status").json())["queue"]["queued"] == 0 and q, 90,
                         "the device's queue to drain through B")
        hb = b.get("/v1/admin/devices", headers={"Authorization": f"Bearer {cloud_env.admin_token}"}).json()
        since_kill = time.time() - t_kill
    finally:
        if dev is not None:
            dev.stop()
        a.stop()
        b.stop()
    ids = _stored_ids(db_url, bucket, s3_server.endpoint_url, "cam")
    ends = final["cloud_endpoints"]
    print("FAULT", {"replica_killed": {"moved_s": round(moved_s, 1), "switches": ends["switches"],
                                       "sent": final["queue"]["sent"], "stored": len(ids),
                                       "predictions_ok": load.ok}}, flush=True)
    assert load.failed == [], load.failed[:3]
    assert ends["current"] == b.url and ends["switches"] >= 1 and ends["last_switch"]["from"] == a.url
    assert len(ids) == len(set(ids)) and final["queue"]["sent"] == len(ids)
    cam = next(d for d in hb if d["name"] == "cam")
    assert cam["heartbeat_age_s"] is not None and cam["heartbeat_age_s"] < since_kill  # heartbeats reached B
