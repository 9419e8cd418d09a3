"""The cloud store, one suite for both back ends: SQLite + a blob directory, and PostgreSQL + an S3-compatible
object store (real servers on loopback: ``initdb``/``pg_ctl`` and moto's server mode, see tests/store_servers.py).

Every test taking ``store`` runs once per back end; ``replicas`` gives two store objects on the same back end, as
two ``cloud serve`` processes would hold."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgeadapt.cloud.store import (
    LocalBlobStore,
    ModelRecord,
    NewSample,
    NotFound,
    PostgresStore,
    RoundLost,
    S3BlobStore,
    SQLiteStore,
    Store,
    StoreError,
    StoreUnavailable,
    open_blob_store,
    open_store,
    redact_url,
)

pytest_plugins = ["tests.store_servers"]

BACKENDS = ["sqlite", "postgres+s3"]


def _open(kind: str, request, tmp_path, shared: dict | None = None) -> Store:
    """A store of this kind; with ``shared`` (filled by the first call), another one on the same data."""
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "store")
    pg, s3 = request.getfixturevalue("postgres_server"), request.getfixturevalue("s3_server")
    if shared is None:
        shared = {}
    if "url" not in shared:
        shared.update(url=pg.create_database(), bucket=s3.bucket_url())
    return PostgresStore(shared["url"], open_blob_store(shared["bucket"], s3.endpoint_url))


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    s = _open(request.param, request, tmp_path)
    yield s
    s.close()


@pytest.fixture(params=BACKENDS)
def replicas(request, tmp_path):
    """Two store objects over the same database and blobs (two processes' worth of connections)."""
    shared: dict = {}
    a = _open(request.param, request, tmp_path, shared)
    b = _open(request.param, request, tmp_path, shared)
    yield a, b
    a.close()
    b.close()


def _samples(ids, split="train", dtype=np.uint8, shape=(1, 4, 4), seed=0) -> list[NewSample]:
    rng = np.random.default_rng(seed)
    return [NewSample(sample_id=i, input=rng.integers(0, 255, shape).astype(dtype), logits=rng.normal(size=10),
                      entropy=0.5, ood_score=0.1, novel=split == "novel", param_version=0, split=split) for i in ids]


def _params(v: float = 0.0) -> dict[str, np.ndarray]:
    return {"bn.weight": np.full(4, 1.0 + v, np.float32), "bn.bias": np.arange(4, dtype=np.float32) * v}


# ------------------------------------------------------------------------------------------------ fleet
def test_devices_tokens_expiry_and_heartbeats(store):
    token = store.add_device("cam-1")
    with pytest.raises(StoreError, match="already exists"):
        store.add_device("cam-1")
    with pytest.raises(StoreError, match="device name"):
        store.add_device("bad name!")
    with pytest.raises(StoreError, match="expiry"):
        store.add_device("cam-x", expires_in_s=0)
    dev = store.authenticate(token)
    assert dev is not None and dev.name == "cam-1" and dev.expires is None and dev.revoked is None
    assert store.authenticate("not-a-token") is None and store.authenticate("") is None
    temp = store.add_device("cam-0", expires_in_s=3600)
    assert 3590 < store.get_device("cam-0").expires - time.time() <= 3600
    assert [d.name for d in store.list_devices()] == ["cam-0", "cam-1"]
    with store._tx() as tx:  # an hour later
        tx.execute("UPDATE devices SET expires=? WHERE name=?", (time.time() - 1, "cam-0"))
    assert store.authenticate(temp) is None
    store.touch_device(dev.id)
    assert store.get_device("cam-1").last_seen is not None and store.get_device("cam-1").heartbeat_at is None
    store.touch_device(dev.id, version=3, status="ok" * 200, counters={"frames": 7}, problems={"disk": "low"},
                       heartbeat=True)
    got = store.get_device("cam-1")
    assert (got.version, got.counters, got.problems, len(got.status)) == (3, {"frames": 7}, {"disk": "low"}, 200)
    assert got.heartbeat_at >= got.created
    store.revoke_device("cam-1")
    store.revoke_device("cam-1")  # twice: no error
    assert store.authenticate(token) is None and store.get_device("cam-1").revoked is not None
    with pytest.raises(NotFound):
        store.revoke_device("nobody")
    with pytest.raises(NotFound):
        store.get_device("nobody")


def test_meta_and_rollouts(store):
    assert store.get_meta("model_name") is None
    store.set_meta("model_name", "a")
    store.set_meta("model_name", "b")
    assert store.get_meta("model_name") == "b"
    with pytest.raises(NotFound):
        store.add_rollout(0)
    store.add_version(_params(0), parent=None, version=0)
    store.add_version(_params(1), parent=0)
    with pytest.raises(StoreError, match="not both"):
        store.add_rollout(1, devices=["a"], fraction=0.5)
    with pytest.raises(StoreError, match="fraction"):
        store.add_rollout(1, fraction=1.5)
    assert store.target_version("a") is None
    r_all = store.add_rollout(0, note="all")
    r_dev = store.add_rollout(1, devices=["b", "a", "a"])
    assert r_dev > r_all
    assert (store.target_version("a"), store.target_version("c")) == (1, 0)
    rollouts = store.list_rollouts()
    assert [r.scope for r in rollouts] == ["all", "devices: a,b"] and rollouts[0].note == "all"
    store.add_rollout(1, fraction=0.5)
    names = [f"d{i}" for i in range(200)]
    on_1 = sum(store.target_version(n) == 1 for n in names)
    assert 60 < on_1 < 140  # about half



def test_signatures_groups_and_lineages(store):
    """Issue 18: the latest domain signature per device, groups, a lineage of versions per group and rollouts
    that cover a group's members, on both back ends."""
    store.add_version(_params(0), parent=None, version=0)
    store.add_device("cam-a")
    store.add_device("cam-b")
    a, b = store.get_device("cam-a"), store.get_device("cam-b")
    assert a.signature is None and a.group_id is None
    store.fleet.set_signature(a.id, [0.5, -1.0], entropy=0.25)
    store.fleet.set_signature(a.id, [0.25, 2.0], entropy=0.5)  # the latest replaces the previous
    with pytest.raises(StoreError, match="finite"):
        store.fleet.set_signature(b.id, [float("nan")])
    with pytest.raises(StoreError):
        store.fleet.set_signature(b.id, [])
    got = store.get_device("cam-a")
    assert got.signature == [0.25, 2.0] and got.signature_entropy == 0.5 and got.signature_at is not None
    g1 = store.fleet.add_group(0, [0.25, 2.0], note="founded by cam-a")
    g2 = store.fleet.add_group(0, None)
    store.fleet.set_device_group(a.id, g1)
    store.fleet.set_device_group(b.id, g2)
    assert store.get_device("cam-a").group_id == g1
    assert [g.id for g in store.fleet.list_groups()] == [g1, g2]
    assert store.fleet.get_group(g1).centroid == [0.25, 2.0] and store.fleet.get_group(g1).note == "founded by cam-a"
    # a lineage per group: numbers stay global, each group's newest is its own
    assert store.versions.latest_in_lineage(g1) is None and store.versions.latest_in_lineage(None) == 0
    cid, v1 = store.finish_round(0, "h1", {}, [], params=_params(1), rollout=True, group_id=g1)
    _, v2 = store.finish_round(0, "h2", {}, [], params=_params(2), rollout=True, group_id=g2)
    assert (v1, v2) == (1, 2) and store.get_version(v1).group_id == g1
    assert store.versions.latest_in_lineage(g1) == 1 and store.versions.latest_in_lineage(g2) == 2
    assert store.versions.latest_in_lineage(None) == 0
    assert store.target_version("cam-a", g1) == 1 and store.target_version("cam-b", g2) == 2
    assert store.target_version("cam-a") is None  # not in the group: no group rollout covers it
    assert [r.scope for r in store.list_rollouts()] == [f"group {g1}", f"group {g2}"]
    with pytest.raises(StoreError, match="not both"):
        store.add_rollout(1, devices=["cam-a"], group_id=g1)
    with pytest.raises(NotFound):
        store.add_rollout(1, group_id=999)
    store.fleet.set_device_group(a.id, g2)  # it moved: now its new group's rollouts cover it
    assert store.target_version("cam-a", g2) == 2
    store.fleet.update_group(g1, dissolve=True)
    assert [g.id for g in store.fleet.list_groups()] == [g2]
    assert store.fleet.get_group(g1).dissolved is not None
    with pytest.raises(NotFound):
        store.fleet.update_group(999, dissolve=True)


# ------------------------------------------------------------------------------------------------ samples
def test_samples_once_per_device_and_sample_id(store):
    a, b = store.add_device("a"), store.add_device("b")
    da, db = store.authenticate(a), store.authenticate(b)
    new, dups = store.add_samples(da.id, _samples(["s1", "s2", "s1"]))
    assert (new, dups) == (["s1", "s2"], ["s1"])
    new, dups = store.add_samples(da.id, _samples(["s2", "s3"]) + _samples(["h1"], "holdout"))
    assert (sorted(new), dups) == (["h1", "s3"], ["s2"])
    new, _ = store.add_samples(db.id, _samples(["s1"], dtype=np.float16, shape=(1, 2, 2)))  # another device's s1
    assert new == ["s1"]
    assert store.add_samples(da.id, []) == ([], [])
    assert store.count_samples() == 5 and store.count_samples("train") == 4 and store.count_samples("holdout") == 1
    pending = store.pending_samples()
    assert [s.sample_id for s in pending] == ["s1", "s2", "s3", "s1"]
    assert [s.device_id for s in pending] == [da.id, da.id, da.id, db.id]
    inputs = store.load_inputs(pending)
    assert [x.dtype for x in inputs] == [np.uint8] * 3 + [np.float16] and inputs[3].shape == (1, 2, 2)
    assert np.array_equal(inputs[0], _samples(["s1"])[0].input)
    assert store.oldest_pending_time() == pytest.approx(pending[0].received)
    store.mark_consumed([pending[0].seq, pending[1].seq])
    assert store.count_samples("train", consumed=False) == 2 and store.count_samples("train", consumed=True) == 2
    assert [s.sample_id for s in store.recent_samples("train", 2)] == ["s3", "s1"]
    assert [s.sample_id for s in store.recent_samples("train", 10, consumed=True)] == ["s1", "s2"]
    per_device = store.recent_samples_per_device("train", 1)
    assert [(s.device_id, s.sample_id) for s in per_device] == [(da.id, "s3"), (db.id, "s1")]
    store.mark_consumed([s.seq for s in store.pending_samples()])
    assert store.pending_samples() == [] and store.oldest_pending_time() is None


def test_batch_responses_are_kept_for_retries(store):
    assert store.get_batch_response(1, "sha") is None
    store.put_batch_response(1, "sha", '{"ok": true}')
    store.put_batch_response(1, "sha", '{"ok": false}')  # the first answer stays
    assert store.get_batch_response(1, "sha") == '{"ok": true}' and store.get_batch_response(2, "sha") is None


# ------------------------------------------------------------------------------------------------ versions
def test_versions_candidates_param_sets_packages(store):
    assert store.latest_version() is None
    assert store.add_version(_params(0), parent=None, note="bundle", version=0) == 0
    with pytest.raises(StoreError, match="already exists"):
        store.add_version(_params(0), parent=None, version=0)
    assert store.add_version(_params(1), parent=0, metrics={"agree": np.float32(0.5)}) == 1
    assert store.latest_version() == 1 and [v.version for v in store.list_versions()] == [0, 1]
    rec = store.get_version(1)
    assert (rec.parent, rec.metrics, store.get_version(0).note) == (0, {"agree": 0.5}, "bundle")
    p1 = store.get_params(1)
    assert np.array_equal(p1["bn.bias"], _params(1)["bn.bias"])
    p1["bn.bias"][:] = 99  # a caller's copy: the store's cache is not changed
    assert np.array_equal(store.get_params(1)["bn.bias"], _params(1)["bn.bias"])
    with pytest.raises(NotFound):
        store.get_version(7)
    with pytest.raises(NotFound):
        store.get_params(7)
    cid = store.add_candidate(1, "rejected", None, "abc", "worse", {"drop": 0.1})
    cands = store.list_candidates()
    assert [(c.id, c.status, c.version, c.reason, c.metrics) for c in cands] == [(cid, "rejected", None, "worse",
                                                                                  {"drop": 0.1})]
    # parameter sets: every version's, and a lossy reconstruction a device may hold
    assert store.get_param_set(rec.params_hash)[0] == 1
    recon = _params(1.01)
    phash = store.put_param_set(1, recon)
    assert store.put_param_set(1, recon) == phash
    version, got = store.get_param_set(phash)
    assert version == 1 and np.allclose(got["bn.weight"], recon["bn.weight"])
    assert store.get_param_set("0" * 64) is None
    # packages
    assert store.get_package("m/0/1/int8") is None
    store.put_package("m/0/1/int8", b"pkg-1", {"mode": "int8"})
    store.put_package("m/0/1/int8", b"pkg-2", {"mode": "int8", "n": 2})
    assert store.get_package("m/0/1/int8") == (b"pkg-2", {"mode": "int8", "n": 2})
    blob = store.db  # the row stays, its blob gone: treated as not built
    with blob.reader() as tx:
        key = tx.one("SELECT blob FROM packages WHERE key=?", ("m/0/1/int8",))["blob"]
    store.blobs.delete(key)
    assert store.get_package("m/0/1/int8") is None


def test_finish_round_is_one_transaction(store, monkeypatch):
    dev = store.authenticate(store.add_device("cam"))
    store.add_version(_params(0), parent=None, version=0)
    store.add_samples(dev.id, _samples([f"s{i}" for i in range(6)]))
    seqs = [s.seq for s in store.pending_samples()]
    cid, version = store.finish_round(0, "h-rej", {"agree": 0.1}, seqs[:2], reason="gate")
    assert version is None and store.latest_version() == 0
    assert store.list_candidates()[-1].status == "rejected" and store.count_samples("train", consumed=False) == 4
    # a failure late in the round (marking its uploads) leaves nothing: no version, rollout or candidate
    real = store.samples.mark_consumed_in

    def fail_on_capped(tx, seqs_, split=None):
        real(tx, seqs_, split)
        if split == "capped":
            raise RuntimeError("crash")

    monkeypatch.setattr(store.samples, "mark_consumed_in", fail_on_capped)
    with pytest.raises(RuntimeError):
        store.finish_round(0, "h1", {}, seqs[2:4], params=_params(1), rollout=True, capped=seqs[4:5])
    assert store.latest_version() == 0 and store.list_rollouts() == [] and len(store.list_candidates()) == 1
    assert store.count_samples("train", consumed=False) == 4 and store.count_samples("capped") == 0
    monkeypatch.setattr(store.samples, "mark_consumed_in", real)
    cid2, version = store.finish_round(0, "h1", {"agree": 0.9}, seqs[2:4], params=_params(1), rollout=True,
                                       capped=seqs[4:5], note="round 1")
    assert version == 1 and cid2 > cid and store.target_version("cam") == 1
    assert store.get_version(1).note == "round 1" and store.list_rollouts()[-1].note == "auto"
    assert store.count_samples("train", consumed=False) == 1 and store.count_samples("capped", consumed=True) == 1


# ------------------------------------------------------------------------------------------------ replicas
def test_two_replicas_share_everything_and_number_versions_once(replicas):
    a, b = replicas
    dev = a.authenticate(a.add_device("cam"))
    assert b.authenticate(b.add_device("cam2")).name == "cam2" and {d.name for d in a.list_devices()} == {"cam",
                                                                                                        "cam2"}
    a.add_version(_params(0), parent=None, version=0)
    # the same upload retried through both replicas at once is stored once
    batch = _samples([f"s{i}" for i in range(20)])
    results: list = []
    threads = [threading.Thread(target=lambda s=s: results.append(s.add_samples(dev.id, batch))) for s in (a, b)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(len(new) for new, _ in results) == [0, 20] or sum(len(new) for new, _ in results) == 20
    assert b.count_samples() == 20 and len(b.load_inputs(a.pending_samples())) == 20
    # versions added concurrently through both get distinct numbers
    made: list[int] = []
    lock = threading.Lock()

    def add(store, k):
        for i in range(5):
            v = store.add_version(_params(k * 10 + i), parent=0)
            with lock:
                made.append(v)

    threads = [threading.Thread(target=add, args=(s, k)) for k, s in enumerate((a, b, a, b))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(made) == list(range(1, 21)) and b.latest_version() == 20


def test_round_leases_let_one_worker_train_a_lineage_and_fence_a_late_one(replicas):
    a, b = replicas
    dev = a.authenticate(a.add_device("cam"))
    a.add_version(_params(0), parent=None, version=0)
    a.add_samples(dev.id, _samples([f"s{i}" for i in range(4)]))
    seqs = [s.seq for s in a.pending_samples()]
    # two workers racing for the global lineage at once: exactly one wins
    won: list = []
    threads = [threading.Thread(target=lambda s=s, h=h: won.append((h, s.claim_round("global", h, 0.5))))
               for s, h in ((a, "worker-a"), (b, "worker-b"))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winner = next(h for h, ok in won if ok)
    assert sorted(ok for _, ok in won) == [False, True]
    first, second = (a, b) if winner == "worker-a" else (b, a)
    loser = "worker-b" if winner == "worker-a" else "worker-a"
    assert first.claim_round("global", winner, 0.5)  # the holder renews
    assert not second.claim_round("global", loser, 0.5)
    assert second.claim_round("group:1", loser, 0.5)  # another lineage is free
    # the holder stalls (dies) past its lease: the other takes the lineage over and records the round
    time.sleep(0.6)
    assert second.claim_round("global", loser, 5)
    with pytest.raises(RoundLost):  # the stalled worker's late outcome is refused, nothing of it written
        first.finish_round(0, "h-late", {}, seqs, params=_params(1), rollout=True, lease=("global", winner))
    assert a.latest_version() == 0 and a.count_samples("train", consumed=False) == 4
    cid, version = second.finish_round(0, "h1", {}, seqs, params=_params(1), rollout=True, lease=("global", loser))
    assert version == 1 and a.count_samples("train", consumed=False) == 0 and len(a.list_candidates()) == 1
    second.release_round("global", loser)
    assert first.claim_round("global", winner, 5)  # released: free again


# ------------------------------------------------------------------------------------------------ models
def _model(name: str, shape: list[int], classes: int) -> ModelRecord:
    return ModelRecord(model=name, bundle=f"/bundles/{name}", teacher="resnet_edge", teacher_weights=None,
                       teacher_kwargs={"in_ch": shape[0]}, student_model=None, input_shape=shape,
                       num_classes=classes, params_hash="h0", created=time.time())


def test_model_registry_and_a_view_per_model(store):
    """Issue 18 item 1: the registry's rows, and each model's view with versions, lineage leases, parameter sets,
    rollouts, devices and uploads of its own; the store as a whole lists every model's."""
    assert store.models.list() == [] and store.models.resolve(None) == ""
    store.models.add(_model("a", [1, 4, 4], 10))
    assert store.models.resolve(None) == "a"
    with pytest.raises(StoreError, match="already registered"):
        store.models.add(_model("a", [1, 4, 4], 10))
    store.models.add(_model("b", [3, 4, 4], 100))
    with pytest.raises(StoreError, match="name one with --model"):
        store.models.resolve(None)
    with pytest.raises(NotFound, match="registered: a, b"):
        store.models.get("c")
    got = store.models.get("b")
    assert (got.input_shape, got.num_classes, got.teacher_kwargs) == ([3, 4, 4], 100, {"in_ch": 3})
    a, b = store.scoped("a"), store.scoped("b")
    # versions are numbered per model, from 0 (the bundle's parameters) each
    assert a.add_version(_params(0), parent=None, version=0) == 0 and b.add_version(_params(0), None, version=0) == 0
    assert a.add_version(_params(1), parent=0) == 1 and (a.latest_version(), b.latest_version()) == (1, 0)
    with pytest.raises(NotFound, match="of model 'b'"):
        b.get_version(1)
    # devices: each for one model; a token authenticates from any view
    with pytest.raises(StoreError, match="name one with --model"):
        store.add_device("cam-x")
    with pytest.raises(NotFound):
        store.add_device("cam-x", model="c")
    ta, tb = store.add_device("cam-a", model="a"), b.add_device("cam-b")
    da, db = store.authenticate(ta), a.authenticate(tb)
    assert (da.model, db.model) == ("a", "b")
    assert [d.name for d in a.list_devices()] == ["cam-a"] and len(store.list_devices()) == 2
    store.add_samples(da.id, _samples(["s1", "s2"]))
    store.add_samples(db.id, _samples(["s1"], shape=(3, 4, 4)))
    assert [s.device_id for s in b.pending_samples()] == [db.id] and a.count_samples() == 2
    assert store.count_samples() == 3 and [s.device_id for s in a.recent_samples_per_device("train", 5)] == [da.id] * 2
    # one lineage lease per model: both models' global lineages train at once
    assert a.claim_round("global", "worker-a", 5) and b.claim_round("global", "worker-b", 5)
    assert not a.claim_round("global", "worker-b", 5)
    _, v = b.finish_round(0, "hb", {}, [s.seq for s in b.pending_samples()], params=_params(2), rollout=True,
                          lease=("global", "worker-b"))
    assert v == 1 and b.count_samples("train", consumed=False) == 0 and a.count_samples("train", consumed=False) == 2
    assert (b.target_version("cam-b"), a.target_version("cam-a")) == (1, None)
    assert [r.model for r in store.list_rollouts()] == ["b"] and [c.model for c in store.list_candidates()] == ["b"]
    assert sorted((v.model, v.version) for v in store.list_versions()) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    with pytest.raises(NotFound, match="no version 5 of model 'a'"):
        a.add_rollout(5)
    # parameter sets are per model, even the same parameters (both models' version 0)
    h0, h1 = a.get_version(0).params_hash, a.get_version(1).params_hash
    assert a.get_param_set(h0)[0] == 0 and b.get_param_set(h0)[0] == 0 and b.get_param_set(h1) is None
    g = b.fleet.add_group(1, [0.0])
    assert [x.id for x in b.fleet.list_groups()] == [g] and a.fleet.list_groups() == []
    assert store.models.stats() == {"a": {"devices": 1, "versions": 2, "pending": 2}, "b": {"devices": 1, "versions": 2}}


#: the schema a store had before the model registry (PR of issue 18 item 3), to check the in-place migration
OLD_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE devices(id {serial}, name TEXT UNIQUE NOT NULL, token_hash TEXT UNIQUE NOT NULL, created {real} NOT NULL,
  revoked {real}, last_seen {real}, version INTEGER, status TEXT, counters TEXT, expires {real}, problems TEXT,
  heartbeat_at {real}, signature TEXT, signature_at {real}, group_id INTEGER);
CREATE TABLE samples(seq {serial}, device_id INTEGER NOT NULL, sample_id TEXT NOT NULL, received {real} NOT NULL,
  split TEXT NOT NULL, consumed INTEGER NOT NULL DEFAULT 0, novel INTEGER NOT NULL, param_version INTEGER,
  entropy {real}, ood_score {real}, logits {bytes}, blob TEXT NOT NULL, row INTEGER NOT NULL,
  UNIQUE(device_id, sample_id));
CREATE TABLE versions(version INTEGER PRIMARY KEY, params_hash TEXT NOT NULL, parent INTEGER, created {real} NOT NULL,
  note TEXT, metrics TEXT, blob TEXT NOT NULL, group_id INTEGER);
CREATE TABLE param_sets(params_hash TEXT PRIMARY KEY, version INTEGER NOT NULL, blob TEXT NOT NULL,
  created {real} NOT NULL);
CREATE TABLE rollouts(id {serial}, version INTEGER NOT NULL, devices TEXT, fraction {real}, created {real} NOT NULL,
  note TEXT, group_id INTEGER);
CREATE TABLE round_leases(lineage TEXT PRIMARY KEY, holder TEXT NOT NULL, expires {real} NOT NULL);
INSERT INTO meta VALUES('model_name', 'old-model');
INSERT INTO devices(name, token_hash, created) VALUES('cam-old', 'th', 1.0);
INSERT INTO samples(device_id, sample_id, received, split, novel, blob, row) VALUES(1, 's1', 1.0, 'train', 0, 'b', 0);
INSERT INTO versions VALUES(0, 'p0', NULL, 1.0, 'bundle', '{{}}', 'params/p0', NULL);
INSERT INTO versions VALUES(1, 'p1', 0, 2.0, 'trained', '{{}}', 'params/p1', NULL);
INSERT INTO param_sets VALUES('p1', 1, 'params/p1', 2.0);
INSERT INTO rollouts(version, created, note) VALUES(1, 2.0, 'auto');
INSERT INTO round_leases VALUES('global', 'w', 9e18);
"""


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_store_from_before_the_registry_keeps_its_rows_as_its_model(kind, request, tmp_path):
    """Opened by this release, a store made before the registry holds every row under the model it served, and a
    second model numbers its own versions from 0 (the primary keys gained the model)."""
    if kind == "sqlite":
        import sqlite3

        (tmp_path / "store").mkdir()
        with sqlite3.connect(tmp_path / "store" / "cloud.db") as c:
            c.executescript(OLD_SCHEMA.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL", bytes="BLOB"))
        reopen = lambda: SQLiteStore(tmp_path / "store")  # noqa: E731
    else:
        import psycopg

        pg, s3 = request.getfixturevalue("postgres_server"), request.getfixturevalue("s3_server")
        url, bucket = pg.create_database(), s3.bucket_url()
        with psycopg.connect(url, autocommit=True) as c:
            for stmt in OLD_SCHEMA.format(serial="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                                          real="DOUBLE PRECISION", bytes="BYTEA").split(";"):
                if stmt.strip():
                    c.execute(stmt)
        reopen = lambda: PostgresStore(url, open_blob_store(bucket, s3.endpoint_url))  # noqa: E731
    store = reopen()
    try:
        from edgeadapt.core.tensorfile import params_to_bytes

        store.blobs.put("params/p1", params_to_bytes(_params(1)))
        old = store.scoped("old-model")
        assert old.latest_version() == 1 and old.get_device("cam-old").model == "old-model"
        assert old.count_samples() == 1 and old.target_version("cam-old") == 1 and old.get_param_set("p1")[0] == 1
        assert not old.claim_round("global", "another", 5)  # the old lease still held, now under its model
        new = store.scoped("new-model")
        assert new.add_version(_params(0), parent=None, version=0) == 0 and new.latest_version() == 0
        assert store.latest_version() == 1  # the whole store's keyed reads: its default model, the one it served
    finally:
        store.close()
    again = reopen()  # migrated once: a second open changes nothing
    try:
        assert sorted((v.model, v.version) for v in again.list_versions()) == [("new-model", 0), ("old-model", 0),
                                                                               ("old-model", 1)]
    finally:
        again.close()


# ------------------------------------------------------------------------------------------------ blobs, config
@pytest.fixture(params=["local", "s3"])
def blobs(request, tmp_path):
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "blobs")
        return
    s3 = request.getfixturevalue("s3_server")
    b = open_blob_store(s3.bucket_url(), s3.endpoint_url)
    assert isinstance(b, S3BlobStore)
    yield b
    b.close()


def test_blob_stores(blobs):
    blobs.put("a/b.bin", b"one")
    blobs.put("a/b.bin", b"two")
    assert blobs.get("a/b.bin") == b"two" and blobs.exists("a/b.bin") and not blobs.exists("a/c.bin")
    with pytest.raises(NotFound):
        blobs.get("a/c.bin")
    blobs.delete("a/b.bin")
    blobs.delete("a/b.bin")
    assert not blobs.exists("a/b.bin")
    for bad in ("/etc/passwd", "../x", "a/../../x", ""):
        with pytest.raises(StoreError, match="illegal"):
            blobs.put(bad, b"x")


def test_open_store_by_url(tmp_path):
    s = open_store(tmp_path / "s")
    assert isinstance(s, SQLiteStore) and s.blobs.root == tmp_path / "s" / "blobs"
    s.close()
    s = open_store(tmp_path / "s", blob_url=str(tmp_path / "elsewhere"))
    assert s.blobs.root == tmp_path / "elsewhere"
    s.close()
    with pytest.raises(StoreError, match="only postgresql"):
        open_store(tmp_path / "s", database_url="mysql://x")
    with pytest.raises(StoreError, match="s3://BUCKET"):
        open_blob_store("ftp://x/y")
    assert redact_url("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_open_store_postgres_and_s3_by_url(tmp_path, postgres_server, s3_server):
    pg, s3 = postgres_server, s3_server
    s = open_store(tmp_path / "unused", database_url=pg.create_database(), blob_url=s3.bucket_url(),
                   blob_endpoint_url=s3.endpoint_url)
    assert isinstance(s, PostgresStore) and s.describe().startswith("postgresql postgresql://postgres@127.0.0.1")
    s.close()


def test_unreachable_servers_raise_store_unavailable(tmp_path, request):
    """A database or object store that does not answer is a ``StoreUnavailable`` (an OSError: 503, retry)."""
    from tests.store_servers import _free_port

    pytest.importorskip("psycopg")
    port = _free_port()  # nothing listens there
    with pytest.raises(StoreUnavailable):
        PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/x", LocalBlobStore(tmp_path / "b"))
    pytest.importorskip("boto3")
    with pytest.raises(StoreUnavailable):
        open_blob_store("s3://bucket/p", f"http://127.0.0.1:{port}")
    # a server that goes away under an open store: the next call fails the same way
    request.getfixturevalue("s3_server")  # credentials in the environment
    assert issubclass(StoreUnavailable, OSError)


def test_config_names_the_back_end(tmp_path):
    from edgeadapt.cloud.config import ConfigError, load_config

    cfg = load_config(tmp_path, environ={})
    assert (cfg.database_url, cfg.blob_url, cfg.blob_endpoint_url) == (None, None, None)  # SQLite + blob directory
    cfg = load_config(tmp_path, environ={"EDGEADAPT_CLOUD_DATABASE_URL": "postgresql://u:p@db/x",
                                         "EDGEADAPT_CLOUD_BLOB_URL": "s3://bucket/cloud"})
    assert cfg.database_url == "postgresql://u:p@db/x" and cfg.blob_url == "s3://bucket/cloud"
    for bad in ({"database_url": "mysql://db/x"}, {"blob_url": "gs://bucket"}, {"blob_url": "s3:///nobucket"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            load_config(tmp_path, bad, environ={})


def test_doctor_checks_a_shared_store_without_creating_it(tmp_path, postgres_server, s3_server):
    from edgeadapt.cloud.config import load_config
    from edgeadapt.cloud.doctor import _shared_store

    pg, s3 = postgres_server, s3_server
    url = pg.create_database()
    cfg = load_config(tmp_path, {"database_url": url, "blob_url": s3.bucket_url(),
                                 "blob_endpoint_url": s3.endpoint_url}, environ={})
    found = _shared_store(cfg)
    assert [(f.level, f.check) for f in found] == [("ok", "store"), ("ok", "blobs")], found
    assert "tables not created yet" in found[0].message
    cfg = load_config(tmp_path, {"database_url": pg.url("nosuchdb"), "blob_url": "s3://b/p",
                                 "blob_endpoint_url": "http://127.0.0.1:9"}, environ={})
    assert [(f.level, f.check) for f in _shared_store(cfg)] == [("fatal", "store"), ("fatal", "blobs")]


def test_postgres_down_then_back_the_store_resumes(postgres_server, tmp_path, monkeypatch):
    """PostgreSQL stopped under an open store: calls raise ``StoreUnavailable`` (503); once it is back the same
    store object answers again (dead pooled connections are found by a ping and replaced), nothing lost."""
    from edgeadapt.cloud.store import db as db_mod

    store = PostgresStore(postgres_server.create_database(), LocalBlobStore(tmp_path / "blobs"))
    try:
        dev = store.authenticate(store.add_device("cam"))
        store.add_samples(dev.id, _samples(["sample-1", "sample-2"]))
        # restarted while the store was idle: its pooled connections are dead, the first call still answers
        monkeypatch.setattr(db_mod, "IDLE_PING_AFTER_S", 0.0)
        postgres_server.stop()
        postgres_server.start()
        assert store.count_samples() == 2
        # stopped: every call fails as unavailable until it is back
        postgres_server.stop()
        try:
            with pytest.raises(StoreUnavailable):
                store.count_samples()
            with pytest.raises(StoreUnavailable):
                store.add_samples(dev.id, _samples(["sample-3"]))
        finally:
            postgres_server.start()
        assert store.count_samples() == 2
        assert store.add_samples(dev.id, _samples(["sample-2", "sample-3"])) == (["sample-3"], ["sample-2"])
        assert store.authenticate(store.add_device("cam-2")).name == "cam-2"
    finally:
        store.close()
