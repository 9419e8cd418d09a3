"""Groups of similar devices, a lineage per group (issue 18): the real service behind a real HTTP server on the
real SQLite store. Two clusters of domain signatures make two groups; each group's round publishes into its own
lineage and each device is served its group's version; a device that moves domain moves group and is served its
new group's parameters (a delta to a newer number, or a handoff version when its new group's number is older)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeadapt.core import update_package as UP
from edgeadapt.core.domain_signature import SCHEME
from edgeadapt.core.signing import public_key_from_b64
from edgeadapt.core.tensorfile import load_params, params_hash

pytest_plugins = ["tests.cloud_fixtures"]

DIM = 64


def _sig(center: np.ndarray, seed: int) -> dict:
    noise = np.random.default_rng(seed).normal(0, 0.004, DIM)
    return {"scheme": SCHEME, "values": (center + noise).tolist(), "entropy": 0.5}


def _heartbeat(c, version: int, center: np.ndarray, seed: int) -> dict:
    r = c.post("/v1/heartbeat", json={"model": "fmnist-edge", "param_version": version, "signature": _sig(center, seed)})
    assert r.status_code == 200, r.text
    return r.json()


def _groups(admin) -> dict[str, int]:
    r = admin.get("/v1/admin/groups")
    assert r.status_code == 200, r.text
    return {m: g["id"] for g in r.json() for m in g["members"]}


def test_two_clusters_two_lineages_and_a_device_that_moves(live_cloud, cloud_env, kit):
    cloud = live_cloud(groups={"enabled": True}, update_mode="fp32",
                       trainer={"min_steps_per_round": 2, "gate_tolerance": 1.0})
    rng = np.random.default_rng(0)
    centers = {"A": rng.normal(0, 0.1, DIM), "B": rng.normal(0, 0.1, DIM)}  # ~1.1 apart: two domains
    names = {"a1": "A", "a2": "A", "b1": "B", "b2": "B"}
    tokens = {n: cloud.add_device(n) for n in names}
    clients = {n: cloud.client(t) for n, t in tokens.items()}
    admin = cloud.client(cloud.admin)
    key = public_key_from_b64(cloud_env.public_key)
    try:
        for i, (n, dom) in enumerate(names.items()):
            assert _heartbeat(clients[n], 0, centers[dom], i)["target_version"] is None
        groups = _groups(admin)
        assert groups["a1"] == groups["a2"] != groups["b1"] == groups["b2"]
        ga, gb = groups["a1"], groups["b1"]
        # each group's uploads: A's clean images, B's shifted ones
        for i, (n, dom) in enumerate(names.items()):
            xs = kit.synthetic_images(48, seed=10 + i, shift=0.0 if dom == "A" else kit.TEST_SHIFT)
            r = clients[n].post("/v1/samples", json=kit.batch_body(xs))
            assert r.status_code == 200, r.text
        r = admin.post("/v1/admin/train")
        assert r.status_code == 200, r.text
        rounds = {p["group"]: p for p in r.json()["groups"]}
        assert set(rounds) == {ga, gb} and all(p["status"] == "published" for p in rounds.values())
        va, vb = rounds[ga]["version"], rounds[gb]["version"]
        assert va != vb
        store = cloud.service.store
        assert store.get_version(va).group_id == ga and store.get_version(vb).group_id == gb
        assert store.get_version(va).params_hash != store.get_version(vb).params_hash
        # every device is served its own group's version
        for n, dom in names.items():
            r = clients[n].get("/v1/updates/info", params={"model": "fmnist-edge", "have": 0})
            assert r.status_code == 200 and r.json()["version"] == (va if dom == "A" else vb), (n, r.text)
        base = load_params(cloud_env.bundle / "params.safetensors")

        def take(n: str, have: int, have_params: dict) -> tuple[int, dict]:
            r = clients[n].get("/v1/updates", params={"model": "fmnist-edge", "have": have})
            assert r.status_code == 200, r.text
            version, params, _ = UP.verify_and_apply(r.content, key, "fmnist-edge", have, have_params)
            return version, params

        held = {n: take(n, 0, base) for n in names}
        assert {n: v for n, (v, _) in held.items()} == {"a1": va, "a2": va, "b1": vb, "b2": vb}
        # a device of the older-numbered group moves to the newer one: a plain delta to the newer number
        lo_n, hi_g = ("a1", gb) if va < vb else ("b1", ga)
        hi_center, hi_v = (centers["B"], vb) if va < vb else (centers["A"], va)
        hb = _heartbeat(clients[lo_n], held[lo_n][0], hi_center, 99)
        assert hb["group"] == hi_g and hb["target_version"] == hi_v
        v, p = take(lo_n, *held[lo_n])
        assert v == hi_v and params_hash(p) == store.get_version(hi_v).params_hash
        # a device of the newer-numbered group moves to the older one: its parameters under a new number (devices
        # refuse downgrades), in the older group's lineage and rolled out to it
        hi_n, lo_g = ("b2", ga) if va < vb else ("a2", gb)
        lo_center, lo_v = (centers["A"], va) if va < vb else (centers["B"], vb)
        hb = _heartbeat(clients[hi_n], held[hi_n][0], lo_center, 98)
        assert hb["group"] == lo_g and hb["target_version"] == lo_v
        v, p = take(hi_n, *held[hi_n])
        assert v > max(va, vb) and params_hash(p) == store.get_version(lo_v).params_hash
        rec = store.get_version(v)
        assert rec.group_id == lo_g and rec.parent == lo_v and "handoff" in rec.note
        assert _groups(admin)[hi_n] == lo_g
        # the group's other member, still at the older number, is offered the handoff version (same parameters)
        stay = "a1" if lo_g == ga and lo_n != "a1" else ("a2" if lo_g == ga else ("b1" if lo_n != "b1" else "b2"))
        info = clients[stay].get("/v1/updates/info", params={"model": "fmnist-edge", "have": lo_v})
        assert info.status_code == 200 and info.json()["version"] == v
        listed = {g["id"]: g for g in admin.get("/v1/admin/groups").json()}
        assert listed[lo_g]["version"] == v and listed[lo_g]["mean_entropy"] == 0.5
    finally:
        for c in [*clients.values(), admin]:
            c.close()


def test_grouping_off_keeps_one_lineage(live_cloud, kit):
    """Grouping is opt-in: without it a signature is kept, but no group is made and versions are global."""
    cloud = live_cloud(trainer={"min_steps_per_round": 2, "gate_tolerance": 1.0})
    c = cloud.client(cloud.add_device("solo"))
    try:
        hb = _heartbeat(c, 0, np.zeros(DIM), 0)
        assert "group" not in hb
        dev = cloud.service.store.get_device("solo")
        assert dev.signature is not None and dev.group_id is None
        assert cloud.service.store.fleet.list_groups() == []
        for bad in ("[NaN]", "[1e5]", "[]"):  # not finite, out of range, empty
            r = c.post("/v1/heartbeat", content='{"model": "fmnist-edge", "param_version": 0, "signature": '
                       f'{{"scheme": "{SCHEME}", "values": {bad}}}}}', headers={"content-type": "application/json"})
            assert r.status_code == 422, (bad, r.text)
        r = c.post("/v1/heartbeat", json={"model": "fmnist-edge", "param_version": 0,
                                          "signature": {"scheme": SCHEME, "values": [0.0] * 257}})
        assert r.status_code == 422
    finally:
        c.close()


@pytest.mark.slow
def test_small_fleet_run(tmp_path):
    """A small `bench fleet` run on the reference assets (``-m slow``; ~5 min on 2 cores): every row reports
    accuracies, the grouped cloud's groups match the true ones for most devices."""
    from edgeadapt.assets import cloud_home, default_bundle, default_stream, default_teacher
    from edgeadapt.bench.fleet import run_fleet

    arch, weights = default_teacher()
    res = run_fleet(default_bundle(), default_stream(), arch, weights, cloud_home(), devices=6, groups=3,
                    corruptions=2, limit=128, sync_every=2, work=tmp_path)
    rows = res["rows"]
    assert set(rows) == {"device_only", "global", "per_group"}
    assert all(0 < r["acc"] < 1 and len(r["acc_per_group"]) == 3 for r in rows.values())
    assert rows["per_group"]["published"] >= 3 and rows["global"]["published"] >= 1
    assert rows["per_group"]["grouping"]["agreement_final"] >= 0.8


def test_regroup_splits_drifted_and_merges_converged_groups(tmp_path):
    """The clustering on the real SQLite store: a group whose members drift apart (each still within the leave
    distance, so assignment keeps them) is split by regroup; two groups that converge are merged; a whole group
    that moves domain together re-forms around its first member; a device far from every group founds one."""
    from edgeadapt.cloud.config import GroupsConfig
    from edgeadapt.cloud.grouping import Grouper
    from edgeadapt.cloud.store import SQLiteStore

    store = SQLiteStore(tmp_path / "s")
    grouper = Grouper(store, GroupsConfig())
    rng = np.random.default_rng(1)
    direction = rng.normal(0, 1, DIM)
    direction /= np.linalg.norm(direction)
    for n in ("c0", "c1", "c2", "c3"):
        store.add_device(n)

    def see(name: str, point: np.ndarray) -> int:
        return grouper.observe(store.get_device(name), point.tolist())

    # a chain 0.04 apart: each joins the previous one's group, end to end 0.12 apart
    gids = {see(f"c{i}", direction * 0.04 * i) for i in range(4)}
    assert len(gids) == 1
    assert grouper.regroup() == []  # 0.12 <= split_distance 0.15
    see("c0", -direction * 0.035)  # still within leave of the centroid, but the chain now spans 0.155
    changes = grouper.regroup()
    assert len(changes) == 1 and "split" in changes[0]
    by_group: dict[int, list[str]] = {}
    for d in store.list_devices():
        by_group.setdefault(d.group_id, []).append(d.name)
    assert sorted(sorted(v) for v in by_group.values()) == [["c0", "c1"], ["c2", "c3"]]
    # the two halves converge: merged into one group, the other dissolved
    for n in ("c0", "c1", "c2", "c3"):
        see(n, direction * 0.08 + rng.normal(0, 0.001, DIM))
    grouper.regroup()
    assert len({d.group_id for d in store.list_devices()}) == 1 and len(store.fleet.list_groups()) == 1
    # the whole group moves domain at once: the first mover founds a group, the others follow it
    first = see("c0", direction * 0.5)
    assert all(see(n, direction * 0.5 + rng.normal(0, 0.002, DIM)) == first for n in ("c1", "c2", "c3"))
    assert [g.id for g in store.fleet.list_groups()] == [first]
    store.add_device("far")
    assert see("far", -direction * 0.5) != first and len(store.fleet.list_groups()) == 2
    store.close()
