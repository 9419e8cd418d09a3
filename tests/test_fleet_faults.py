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
