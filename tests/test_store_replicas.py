"""Two `edgeadapt cloud serve` processes on one PostgreSQL + one S3-compatible store (moto's server standing in
for S3): a device registered through one uploads through both, each replica sees the other's samples, a retried
upload is stored once, and a version published through one is served by the other."""

from __future__ import annotations

import numpy as np
import pytest

from tests.procs import add_device, cloud_proc, fresh_cloud_home

pytest_plugins = ["tests.cloud_fixtures", "tests.store_servers"]
pytestmark = pytest.mark.timeout(300)  # includes building the shared trained-bundle fixture on a loaded machine

MODEL = "fmnist-edge"


def test_two_cloud_serve_replicas_share_postgres_and_s3(cloud_env, kit, postgres_server, s3_server, tmp_path):
    from edgeadapt.cloud.store import PostgresStore, open_blob_store

    db_url, bucket = postgres_server.create_database(), s3_server.bucket_url()
    home = fresh_cloud_home(cloud_env, tmp_path / "home")
    shared = ("--database-url", db_url, "--blob-url", bucket, "--blob-endpoint-url", s3_server.endpoint_url)
    a = cloud_proc(cloud_env, home, tmp_path / "a.log", extra=shared)
    b = cloud_proc(cloud_env, home, tmp_path / "b.log", extra=shared)
    admin = {"Authorization": f"Bearer {cloud_env.admin_token}"}
    try:
        a.start(wait=False)  # both at once: schema creation and version 0 must not race
        b.start(wait=False)
        a.wait_healthy()
        b.wait_healthy()
        token = add_device(a, cloud_env.admin_token, "cam")
        auth = {"Authorization": f"Bearer {token}"}
        assert b.get("/v1/whoami", headers=auth).status_code == 200  # registered through a, known to b
        xs = kit.synthetic_images(24, seed=3)
        ids = [f"sample-{i:03d}" for i in range(24)]  # ids sort in upload order
        r = a.post("/v1/samples", json=kit.batch_body(xs[:16], ids[:16]), headers=auth)
        assert r.status_code == 200 and r.json()["accepted"] == 16, r.text
        r = b.post("/v1/samples", json=kit.batch_body(xs[8:], ids[8:]), headers=auth)  # 8 of them a retry
        assert r.status_code == 200 and (r.json()["accepted"], r.json()["duplicates"]) == (8, 8), r.text
        for replica in (a, b):
            s = replica.get("/v1/admin/status", headers=admin).json()
            assert s["latest_version"] == 0, s
            assert s["samples"]["train"] + s["samples"]["holdout"] + s["samples"]["novel"] == 24, s
        # a version published through a is served by b (its parameters and package go through the object store)
        r = a.post("/v1/admin/rollouts", json={"version": 0, "revert": True}, headers=admin)
        assert r.status_code == 201, r.text
        r = b.get("/v1/updates", params={"model": MODEL, "have": 0}, headers=auth)
        assert r.status_code == 200 and r.headers["x-edgeadapt-version"] == "1", r.text[:300]
        assert [v["version"] for v in b.get("/v1/admin/versions", headers=admin).json()["versions"]] == [0, 1]
    finally:
        a.stop()
        b.stop()
    assert not (home / "store" / "cloud.db").exists()  # nothing went to the embedded store
    store = PostgresStore(db_url, open_blob_store(bucket, s3_server.endpoint_url))
    try:
        rows = store.recent_samples("train", 100) + store.recent_samples("holdout", 100)
        assert sorted(s.sample_id for s in rows) == sorted(ids)  # each once
        got = store.load_inputs(sorted(rows, key=lambda s: s.sample_id))
        assert all(np.array_equal(g, x) for g, x in zip(got, xs, strict=True))
        assert [d.name for d in store.list_devices()] == ["cam"] and store.get_device("cam").last_seen
    finally:
        store.close()
