"""`bench load --target cloud` at fleet scale (issue 18): more registered devices than connections, heartbeating and
uploading in turn through two `cloud serve` replicas on one PostgreSQL + one S3-compatible server (moto standing in
for S3), and the embedded SQLite store in the same way: nothing refused, every accepted sample stored once and seen
by both replicas."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.cloud_fixtures"]
pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("store,replicas", [("sqlite", 1), ("postgres", 2)])
def test_fleet_load_on_each_store(cloud_env, tmp_path, store, replicas):
    from edgeadapt.bench.load import run_load_bench
    from edgeadapt.bench.store_servers import ServerUnavailable, find_pg_bin

    if store == "postgres" and find_pg_bin() is None:
        from tests.store_servers import unavailable

        unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    try:
        res = run_load_bench("cloud", cloud_env.bundle, clients=4, seconds=3.0, home=cloud_env.home,
                             work_dir=tmp_path, store=store, replicas=replicas, devices=40, batch=4)
    except ServerUnavailable as exc:
        from tests.store_servers import unavailable

        unavailable(str(exc))
    assert res["errors"] == 0, res["error_samples"]
    assert res["heartbeats"] > 0 and res["samples"] > 0 and res["samples"] % 4 == 0
    assert res["stored_samples_per_replica"] == [res["samples"]] * replicas, res
    assert res["devices"] == 40 and res["healthy_after"]


def test_replicas_need_a_shared_store(cloud_env):
    from edgeadapt.bench.load import run_load_bench

    with pytest.raises(ValueError, match="shared store"):
        run_load_bench("cloud", cloud_env.bundle, home=cloud_env.home, store="sqlite", replicas=2)
    with pytest.raises(ValueError, match="store must be one of"):
        run_load_bench("cloud", cloud_env.bundle, home=cloud_env.home, store="mysql")
