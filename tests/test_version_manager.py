"""The device's one owner of the version in use (``device.version_manager``), on a real version store in a temporary
state directory and the exported tiny bundle: switch, restore at start, previous, the block list (a version rolled
back, by the watch or by an operator, is not re-applied, and the updater honours it after an admin rollback, also
across a restart), and the events every switch records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

MODEL = "fmnist-edge"


def _daemon(bundle: Path, state: Path, cloud: bool = False):
    from edgeadapt.device.config import DeviceConfig
    from edgeadapt.device.daemon import DeviceDaemon

    extra = {"cloud_url": "http://127.0.0.1:9", "token": "t" * 20} if cloud else {}
    return DeviceDaemon(DeviceConfig(bundle=bundle, state_dir=state, **extra))


def _version_params(d, v: int) -> dict:
    """The bundle's parameters with every bias moved by 0.001·v: a distinct, plausible version ``v``."""
    base = d.bundle.params
    return {k: (a + np.float32(0.001 * v) if k.endswith(".bias") else a).astype(np.float32) for k, a in base.items()}


def _updates_metric(d, outcome: str) -> float:
    return d.metrics.registry.get_sample_value("edgeadapt_updates_total", {"outcome": outcome}) or 0.0


def _package_for(d, target: int) -> bytes:
    """A signed package from version 0 to ``target`` (refused before verification when ``target`` is pinned or
    blocked, so the key need not be the bundle's)."""
    from edgeadapt.core import signing
    from edgeadapt.core.update_package import build_package

    return build_package(MODEL, 0, dict(d.engine.base_params), target, _version_params(d, target), "fp16",
                         signing.generate_private_key())


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_take_switch_by_hand_and_previous(tiny_bundle, tmp_path):
    from edgeadapt.device.version_manager import RollbackRefused

    d = _daemon(tiny_bundle, tmp_path / "s")
    try:
        vm = d.version_manager
        assert vm.current() == 0 and vm.store is d.versions
        with pytest.raises(RollbackRefused, match="no version older than 0"):
            vm.previous()
        for v in (1, 2, 3):
            vm.take(v, _version_params(d, v), v - 1, "fp16")
        assert d.engine.param_version == 3 and d.versions.current() == 3
        assert _same(d.engine.base_params, d.versions.load(3))
        assert d.metrics.registry.get_sample_value("edgeadapt_param_version") == 3
        assert [e["event"] for e in vm.events] == ["applied"] * 3 and vm.events[-1]["base"] == 2
        assert _updates_metric(d, "applied") == 3
        assert vm.previous() == 2 and vm.previous(2) == 1 and vm.previous(1) == 0

        out = vm.switch_by_hand(None)  # default: the previous version on disk
        assert out == {"from": 3, "to": 2, "pinned_through": 3}
        assert d.engine.param_version == 2 and d.versions.current() == 2
        assert vm.blocked == {3} and vm.pin["through"] == 3 and d.versions.read_pin()["through"] == 3
        assert vm.refusal(3) == "pinned" and vm.refusal(4) is None
        assert vm.events[-1]["event"] == "manual_rollback" and vm.events[-1]["to"] == 2
        assert _updates_metric(d, "manual_rollback") == 1

        # an operator going back to the version left takes it off the block list, and the pin goes
        assert vm.switch_by_hand(3) == {"from": 2, "to": 3, "pinned_through": None}
        assert vm.blocked == set() and vm.pin is None and d.versions.read_pin() is None
        with pytest.raises(RollbackRefused, match="not on disk"):
            vm.switch_by_hand(7)
        assert d.engine.param_version == 3  # a refused switch changes nothing
    finally:
        d.stop()


def test_restore_at_start_runs_the_recorded_version_else_the_previous_good_one(tiny_bundle, tmp_path):
    state = tmp_path / "s"
    d = _daemon(tiny_bundle, state)
    try:
        for v in (1, 2):
            d.version_manager.take(v, _version_params(d, v), v - 1, "fp32")
        v2 = dict(d.engine.base_params)
    finally:
        d.stop()
    d = _daemon(tiny_bundle, state)
    try:
        assert d.engine.param_version == 2 and _same(d.engine.base_params, v2)
        assert d.metrics.registry.get_sample_value("edgeadapt_param_version") == 2 and "versions" not in d.errors
    finally:
        d.stop()
    (state / "versions" / "v2.safetensors").write_bytes(b"not a safetensors file")
    d = _daemon(tiny_bundle, state)
    try:
        assert d.engine.param_version == 1, d.errors
        assert "previous good version 1" in d.errors["versions"]
        assert d.versions.current() == 1  # the fallback is recorded as the version in use
    finally:
        d.stop()


def test_watch_rollback_blocks_the_bad_version_with_an_event(tiny_bundle, tmp_path):
    d = _daemon(tiny_bundle, tmp_path / "s", cloud=True)
    try:
        vm, up = d.version_manager, d.updater
        assert vm.listener is up and up.events is vm.events  # one event log for the updater and the manager
        vm.take(1, _version_params(d, 1), 0, "fp16")
        up.rollback(0, reason="mean entropy up", bad_version=1)
        assert d.engine.param_version == 0 and vm.blocked == {1}
        ev = vm.events[-1]
        assert ev["event"] == "rolled_back" and ev["version"] == 1 and ev["to"] == 0 and ev["reason"]
        assert up.counters["rolled_back"] == 1 and _updates_metric(d, "rolled_back") == 1
        assert "update_rolled_back" in d.degraded()
        assert up.apply_package(_package_for(d, 1)) == "blocked" and d.engine.param_version == 0
        assert up.status()["blocked_versions"] == [1]
    finally:
        d.stop()


def test_admin_rollback_blocks_and_the_updater_honours_it_after_a_restart(tiny_bundle, tmp_path):
    """A standalone device (no updater) rolled back over the admin API gets the same block list, pin and event
    as one with an updater; restarted with a cloud, its updater refuses the version left, pinned or not."""
    from fastapi.testclient import TestClient

    from edgeadapt.device.server import create_app

    state = tmp_path / "s"
    d = _daemon(tiny_bundle, state)
    try:
        assert d.updater is None
        d.version_manager.take(1, _version_params(d, 1), 0, "fp16")
        client = TestClient(create_app(d), base_url="http://127.0.0.1")
        r = client.post("/v1/admin/rollback", json={})
        assert r.status_code == 200, r.text
        assert r.json() == {"from": 1, "to": 0, "pinned_through": 1}
        st = client.get("/v1/status").json()
        assert st["param_version"] == 0
        assert st["version_manager"]["blocked_versions"] == [1] and st["version_manager"]["pin"]["through"] == 1
        assert st["version_manager"]["events"][-1]["event"] == "manual_rollback"
        assert _updates_metric(d, "manual_rollback") == 1
        assert client.post("/v1/admin/rollback", json={}).status_code == 409  # nothing older than 0
    finally:
        d.stop()

    d = _daemon(tiny_bundle, state, cloud=True)
    try:
        assert d.engine.param_version == 0 and d.updater is not None
        assert d.updater.apply_package(_package_for(d, 1)) == "pinned"
        assert d.updater.counters["pinned_skips"] == 1
    finally:
        d.stop()
    (state / "versions" / "pin.json").unlink()  # the pin gone: the block list alone still refuses version 1
    d = _daemon(tiny_bundle, state, cloud=True)
    try:
        assert d.updater.status()["pin"] is None and d.updater.status()["blocked_versions"] == [1]
        assert d.updater.apply_package(_package_for(d, 1)) == "blocked" and d.engine.param_version == 0
    finally:
        d.stop()


def test_admin_rollback_with_an_updater_ends_the_watch(tiny_bundle, tmp_path):
    from fastapi.testclient import TestClient

    from edgeadapt.device.server import create_app
    from edgeadapt.device.updater import _Watch

    d = _daemon(tiny_bundle, tmp_path / "s", cloud=True)
    try:
        vm, up = d.version_manager, d.updater
        vm.take(1, _version_params(d, 1), 0, "fp16")
        up._watch = _Watch(version=1, previous_version=0, previous_base=dict(d.bundle.params),
                           baseline_entropy=1.0, baseline_ood=0.0)
        r = TestClient(create_app(d), base_url="http://127.0.0.1").post("/v1/admin/rollback", json={"to": 0})
        assert r.status_code == 200 and r.json()["to"] == 0, r.text
        assert up._watch is None and up.counters["manual_rollbacks"] == 1
        assert [e["event"] for e in vm.events[-2:]] == ["watch_ended", "manual_rollback"]
        assert up.status()["blocked_versions"] == [1] and up.status()["pin"]["through"] == 1
        assert up.apply_package(_package_for(d, 1)) == "pinned"
    finally:
        d.stop()


def test_offline_cli_rollback_records_the_switch_the_pin_and_the_block(tiny_bundle, tmp_path):
    from typer.testing import CliRunner

    from edgeadapt.cli.device_cmd import app

    state = tmp_path / "s"
    d = _daemon(tiny_bundle, state)
    try:
        for v in (1, 2):
            d.version_manager.take(v, _version_params(d, v), v - 1, "fp16")
    finally:
        d.stop()
    r = CliRunner().invoke(app, ["rollback", "--state-dir", str(state), "--bundle", str(tiny_bundle)])
    assert r.exit_code == 0, r.output
    assert "rolled back 2 -> 1" in r.output and "not taken again" in r.output
    d = _daemon(tiny_bundle, state, cloud=True)
    try:
        assert d.engine.param_version == 1  # the daemon runs the offline switch at start
        assert d.version_manager.blocked == {2} and d.version_manager.pin["through"] == 2
        assert d.updater.apply_package(_package_for(d, 2)) == "pinned"
    finally:
        d.stop()
    r = CliRunner().invoke(app, ["rollback", "--state-dir", str(state), "--bundle", str(tiny_bundle), "--to", "9"])
    assert r.exit_code != 0 and "not on disk" in r.output
