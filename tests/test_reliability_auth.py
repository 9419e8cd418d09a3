"""Auth, systematically (extends test_cloud_server.py::test_auth): every device endpoint against every kind of bad
credential (missing, malformed, wrong, revoked, expired, the admin token, another device's token), revocation
taking effect at once on an open connection, token expiry, tokens stored only as hashes (database and WAL) and
compared in constant time."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest

pytest_plugins = ["tests.cloud_fixtures"]
pytestmark = pytest.mark.timeout(300)

MODEL = "fmnist-edge"


def _device_calls(kit, name: str) -> dict[str, tuple[str, str, dict]]:
    """One request per device endpoint: (method, path, httpx kwargs)."""
    return {
        "upload": ("POST", "/v1/samples", {"json": kit.batch_body(kit.synthetic_images(2, seed=7))}),
        "fetch update": ("GET", "/v1/updates", {"params": {"model": MODEL, "have": 0}}),
        "update info": ("GET", "/v1/updates/info", {"params": {"model": MODEL, "have": 0}}),
        "heartbeat": ("POST", "/v1/heartbeat", {"json": {"model": MODEL, "param_version": 0}}),
        "own record": ("GET", f"/v1/devices/{name}", {}),
    }


def _publish_v1(cloud) -> None:
    """A version 1 rolled out to every device, so that a fetch that got through would get 200, not 204."""
    p0 = cloud.service.store.get_params(0)
    res = cloud.service.trainer.submit_candidate({k: v * 1.01 for k, v in p0.items()})
    assert res.version == 1, res


def test_every_device_endpoint_refuses_every_bad_credential(live_cloud, kit):
    cloud = live_cloud()
    good = cloud.add_device("victim")
    revoked = cloud.add_device("gone")
    expired = cloud.add_device("old")
    store = cloud.service.store
    with cloud.client(cloud.admin) as c:
        assert c.post("/v1/admin/devices/gone/revoke").status_code == 200
    with store._tx() as conn:  # expired a second ago
        conn.execute("UPDATE devices SET expires=? WHERE name='old'", (time.time() - 1,))
    _publish_v1(cloud)
    seen_before = {d.name: d.last_seen for d in store.list_devices()}
    bad: dict[str, dict[str, str]] = {
        "missing": {},
        "empty bearer": {"Authorization": "Bearer"},
        "basic scheme": {"Authorization": f"Basic {good}"},
        "token without scheme": {"Authorization": good},
        "wrong token": {"Authorization": "Bearer " + "x" * len(good)},
        "one character off": {"Authorization": "Bearer " + good[:-1] + ("A" if good[-1] != "A" else "B")},
        "token prefix": {"Authorization": "Bearer " + good[:20]},
        "token hash": {"Authorization": "Bearer " + hashlib.sha256(good.encode()).hexdigest()},
        "oversized token": {"Authorization": "Bearer " + "y" * 10_000},
        "revoked": {"Authorization": f"Bearer {revoked}"},
        "expired": {"Authorization": f"Bearer {expired}"},
    }
    refused = 0
    with httpx.Client(base_url=cloud.url, timeout=30) as c:
        for what, headers in bad.items():
            for call, (method, path, kw) in _device_calls(kit, "victim").items():
                r = c.request(method, path, headers=headers, **kw)
                assert r.status_code == 401, (what, call, r.status_code, r.text[:200])
                assert r.headers["www-authenticate"] == "Bearer" and r.json()["detail"], (what, call)
                refused += 1
        # the admin token is not a device token: 403, and it says so
        for call, (method, path, kw) in _device_calls(kit, "victim").items():
            r = c.request(method, path, headers={"Authorization": f"Bearer {cloud.admin}"}, **kw)
            assert r.status_code == 403 and "admin" in r.json()["detail"], (call, r.status_code)
            refused += 1
    assert refused == (len(bad) + 1) * 5
    # nothing got in: no sample stored, no device touched, nothing served
    assert store.count_samples() == 0
    assert {d.name: d.last_seen for d in store.list_devices()} == seen_before
    assert sum(s.value for m in cloud.service.metrics.updates_served.collect() for s in m.samples
               if s.name.endswith("_total")) == 0
    # and the good token still works on every endpoint
    with cloud.client(good) as c:
        for call, (method, path, kw) in _device_calls(kit, "victim").items():
            r = c.request(method, path, **kw)
            assert r.status_code == 200, (call, r.status_code, r.text[:200])


def test_other_devices_token_reaches_only_its_own_things(live_cloud, kit):
    cloud = live_cloud(auto_rollout=False)
    tok_a, tok_b = cloud.add_device("dev-a"), cloud.add_device("dev-b")
    _publish_v1(cloud)
    with cloud.client(cloud.admin) as c:  # version 1 only for dev-a
        assert c.post("/v1/admin/rollouts", json={"version": 1, "devices": ["dev-a"]}).status_code == 201
    with cloud.client(tok_b) as c:
        assert c.get("/v1/devices/dev-a").status_code == 403  # another device's record
        assert c.get("/v1/updates", params={"model": MODEL, "have": 0}).status_code == 204  # not dev-a's update
        assert c.post("/v1/samples", json=kit.batch_body(kit.synthetic_images(3, seed=8))).status_code == 200
        for path in ("/v1/admin/devices", "/v1/admin/status", "/v1/admin/versions", "/v1/admin/rollouts"):
            assert c.get(path).status_code == 403, path
        assert c.post("/v1/admin/devices/dev-a/revoke").status_code == 403
        assert c.post("/v1/admin/rollouts", json={"version": 1, "devices": ["dev-b"]}).status_code == 403
        assert c.post("/v1/admin/devices", json={"name": "sneaky"}).status_code == 403
    with cloud.client(tok_a) as c:
        r = c.get("/v1/updates", params={"model": MODEL, "have": 0})
        assert r.status_code == 200 and r.headers["x-edgeadapt-version"] == "1"
    store = cloud.service.store
    # dev-b's uploads are dev-b's: the token decides who is speaking, never the request body
    rows = store._conn().execute("SELECT d.name, COUNT(*) FROM samples s JOIN devices d ON d.id = s.device_id "
                                 "GROUP BY d.name").fetchall()
    assert {name: n for name, n in rows} == {"dev-b": 3}
    assert store.get_device("dev-a").revoked is None and store.target_version("dev-b") is None
    assert "sneaky" not in {d.name for d in store.list_devices()}


def test_revoked_device_cannot_upload_or_fetch_even_on_an_open_connection(live_cloud, kit):
    cloud = live_cloud()
    tok = cloud.add_device("cam")
    _publish_v1(cloud)
    with cloud.client(tok) as c:  # one keep-alive connection throughout
        assert c.post("/v1/samples", json=kit.batch_body(kit.synthetic_images(4, seed=9))).status_code == 200
        assert c.get("/v1/updates/info", params={"model": MODEL, "have": 0}).status_code == 200
        with cloud.client(cloud.admin) as a:
            assert a.post("/v1/admin/devices/cam/revoke").status_code == 200
            assert a.post("/v1/admin/devices/cam/revoke").status_code == 200  # idempotent
            dev = [d for d in a.get("/v1/admin/devices").json() if d["name"] == "cam"][0]
            assert dev["revoked"] is True
        for call, (method, path, kw) in _device_calls(kit, "cam").items():
            r = c.request(method, path, **kw)
            assert r.status_code == 401, (call, r.status_code)
    store = cloud.service.store
    assert store.count_samples() == 4  # what it sent before is kept; nothing after
    assert sum(s.value for m in cloud.service.metrics.updates_served.collect() for s in m.samples
               if s.name.endswith("_total")) == 0  # only /info was asked before the revoke: no package went out
    with cloud.client(cloud.admin) as a:  # the name stays taken: a revoked token cannot be re-registered
        assert a.post("/v1/admin/devices", json={"name": "cam"}).status_code == 409


def test_token_expiry(live_cloud, kit, cloud_env, tmp_path):
    cloud = live_cloud()
    store = cloud.service.store
    with cloud.client(cloud.admin) as a:
        r = a.post("/v1/admin/devices", json={"name": "temp", "expires_days": 1})
        assert r.status_code == 201 and r.json()["expires"]
        tok = r.json()["token"]
        assert a.post("/v1/admin/devices", json={"name": "bad", "expires_days": 0}).status_code == 422
        assert a.post("/v1/admin/devices", json={"name": "bad", "expires_days": -3}).status_code == 422
    d = store.get_device("temp")
    assert 86000 < d.expires - time.time() <= 86400
    assert store.get_device("temp").revoked is None
    with cloud.client(tok) as c:
        assert c.post("/v1/heartbeat", json={"model": MODEL, "param_version": 0}).status_code == 200
    with store._tx() as conn:  # a day later
        conn.execute("UPDATE devices SET expires=? WHERE name='temp'", (time.time() - 0.01,))
    with cloud.client(tok) as c:
        for call, (method, path, kw) in _device_calls(kit, "temp").items():
            assert c.request(method, path, **kw).status_code == 401, call
    with cloud.client(cloud.admin) as a:
        info = [d for d in a.get("/v1/admin/devices").json() if d["name"] == "temp"][0]
        assert info["expired"] is True and info["revoked"] is False
    # a token without expiry never expires; a store made before expiry existed is migrated in place
    cloud.add_device("forever")
    assert store.get_device("forever").expires is None
    import sqlite3

    from edgeadapt.cloud.store import SQLiteStore

    old = tmp_path / "old-store"
    old.mkdir()
    con = sqlite3.connect(old / "cloud.db")
    con.execute("CREATE TABLE devices(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL, "
                "token_hash TEXT UNIQUE NOT NULL, created REAL NOT NULL, revoked REAL, last_seen REAL, "
                "version INTEGER, status TEXT, counters TEXT)")
    con.execute("INSERT INTO devices(name, token_hash, created) VALUES('legacy', ?, 1.0)",
                (hashlib.sha256(b"legacy-token").hexdigest(),))
    con.commit()
    con.close()
    migrated = SQLiteStore(old)
    try:
        assert migrated.authenticate("legacy-token").name == "legacy"
        assert migrated.get_device("legacy").expires is None
    finally:
        migrated.close()


def test_cli_devices_add_with_expiry(cloud_env, tmp_path):
    import shutil
    import subprocess
    import sys

    home = tmp_path / "home"
    shutil.copytree(cloud_env.home, home, ignore=shutil.ignore_patterns("store"))
    from edgeadapt.cloud.store import SQLiteStore

    SQLiteStore(home / "store").close()  # what `cloud serve` would have created
    run = [sys.executable, "-m", "edgeadapt", "cloud", "devices", "add", "--home", str(home)]
    out = subprocess.run([*run, "cam-7", "--expires-days", "30", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["name"] == "cam-7" and doc["token"] and doc["expires"]
    expires = time.mktime(time.strptime(doc["expires"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert abs(expires - (time.time() + 30 * 86400)) < 3600
    out = subprocess.run([*run, "cam-8", "--expires-days", "-1"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "positive" in (out.stdout + out.stderr)


def test_tokens_stored_hashed_and_compared_in_constant_time(live_cloud, kit, monkeypatch):
    import edgeadapt.cloud.store.fleet as store_mod  # where devices are authenticated (hash_token, hmac)

    cloud = live_cloud()
    tokens = [cloud.add_device(f"d{i}") for i in range(3)]
    with cloud.client(tokens[0]) as c:  # traffic, so that the WAL holds recent pages
        assert c.post("/v1/samples", json=kit.batch_body(kit.synthetic_images(2))).status_code == 200
        assert c.post("/v1/heartbeat", json={"model": MODEL, "param_version": 0}).status_code == 200
    root = cloud.service.store.root
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "cloud.db" for p in files)
    blob = b"".join(p.read_bytes() for p in files)  # the database, its WAL and every stored blob
    for secret in [*tokens, cloud.admin]:
        assert secret.encode() not in blob
    assert all(store_mod.hash_token(t).encode() in blob for t in tokens)  # what is stored is the hash
    # the comparison: lookup by the token's hash, then hmac.compare_digest (timing reveals nothing of the token)
    calls: list[tuple[str, str]] = []
    real = store_mod.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(store_mod.hmac, "compare_digest", spy)
    svc = cloud.service
    assert svc.device_for(tokens[1]).name == "d1"
    assert calls and calls[-1] == (store_mod.hash_token(tokens[1]), store_mod.hash_token(tokens[1]))
    n = len(calls)
    assert svc.is_admin(cloud.admin) and not svc.is_admin("nope")
    assert len(calls) == n + 2  # the admin token goes through compare_digest too
    assert svc.device_for("nope") is None and svc.device_for("") is None and svc.device_for("z" * 300) is None


def test_upload_with_bad_auth_never_reads_into_the_store(live_cloud, kit):
    """The auth dependency runs before the body is read: a large unauthenticated upload is refused as 401 (not
    parsed, not stored), and an unauthenticated oversized one as 413 from its Content-Length."""
    cloud = live_cloud()
    body = json.dumps(kit.batch_body(kit.synthetic_images(64, seed=1))).encode()
    with httpx.Client(base_url=cloud.url, timeout=30) as c:
        t0 = time.monotonic()
        for _ in range(20):
            r = c.post("/v1/samples", content=body, headers={"Content-Type": "application/json",
                                                              "Authorization": "Bearer wrong"})
            assert r.status_code == 401
        took = time.monotonic() - t0
    assert cloud.service.store.count_samples() == 0 and took < 20
    m = httpx.get(f"{cloud.url}/metrics").text
    rejected = [ln for ln in m.splitlines() if ln.startswith("edgeadapt_cloud_requests_rejected_total")
                and 'reason="auth"' in ln]
    assert rejected and float(rejected[0].split()[-1]) >= 20
