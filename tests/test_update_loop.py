"""Device updates end to end over real HTTP: 20 hot swaps under continuous /v1/predict load with no failed
request; a correctly signed but degraded version is rolled back automatically; a tampered package is never
applied. Real cloud service and real device daemon processes; versions are published into the cloud's store
the way the trainer publishes them."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from tests.conftest import free_port

pytest_plugins = ["tests.cloud_fixtures"]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"{url} never became healthy")


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture()
def loop(cloud_env, tmp_path):
    from edgeadapt.cloud.admin import open_store
    from edgeadapt.cloud.config import load_config

    home = tmp_path / "home"
    shutil.copytree(cloud_env.home, home)
    shutil.rmtree(home / "store", ignore_errors=True)
    (home / "store").mkdir()
    cport, dport = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cloud = subprocess.Popen([sys.executable, "-m", "edgeadapt", "cloud", "serve", "--home", str(home), "--bundle",
                              str(cloud_env.bundle), "--listen", f"127.0.0.1:{cport}", "--no-trainer"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    curl, durl = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{dport}"
    device = None
    try:
        _wait(curl, cloud)
        r = httpx.post(f"{curl}/v1/admin/devices", json={"name": "dev-a"},
                       headers={"Authorization": f"Bearer {cloud_env.admin_token}"})
        assert r.status_code in (200, 201), r.text
        token = r.json()["token"]
        denv = {**env, "EDGEADAPT_UPDATE_POLL_S": "0.1", "EDGEADAPT_WATCH_BATCHES": "2", "EDGEADAPT_MAX_WAIT_MS": "2"}
        device = subprocess.Popen([sys.executable, "-m", "edgeadapt", "device", "run", "--bundle", str(cloud_env.bundle),
                                   "--state-dir", str(tmp_path / "state"), "--cloud", curl, "--token", token,
                                   "--listen", f"127.0.0.1:{dport}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=denv)
        _wait(durl, device)
        store = open_store(home, load_config(home))

        def publish(params, parent, note=""):
            v = store.add_version(params, parent=parent, note=note)
            r = httpx.post(f"{curl}/v1/admin/rollouts", json={"version": v},
                           headers={"Authorization": f"Bearer {cloud_env.admin_token}"})
            assert r.status_code in (200, 201), r.text
            return v

        yield {"cloud": curl, "device": durl, "store": store, "bundle": cloud_env.bundle, "state": tmp_path / "state",
               "publish": publish}
        store.close()
    finally:
        if device is not None:
            _stop(device)
        _stop(cloud)


def _npy(x):
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


class Load:
    """Clients that keep /v1/predict busy and count every outcome."""

    def __init__(self, url: str, clients: int = 3):
        self.url = url
        self.ok = 0
        self.failed: list[str] = []
        self.versions: set[int] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        self._lock = threading.Lock()

    def _run(self, seed: int) -> None:
        from tests.cloud_fixtures import synthetic_images

        x = synthetic_images(8, seed=seed, shift=0.0)
        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set():
                try:
                    r = c.post(f"{self.url}/v1/predict", content=_npy(x), headers={"content-type": "application/x-npy"})
                    with self._lock:
                        if r.status_code == 200 and len(r.json()["predictions"]) == 8:
                            self.ok += 1
                            self.versions.add(r.json()["param_version"])
                        else:
                            self.failed.append(f"{r.status_code}: {r.text[:200]}")
                except Exception as exc:  # a refused or dropped connection is a failure too
                    with self._lock:
                        self.failed.append(repr(exc))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(30)


def _version(url: str) -> int:
    return httpx.get(f"{url}/v1/status", timeout=10).json()["param_version"]


def _wait_version(url: str, v: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _version(url) == v:
            return
        time.sleep(0.05)
    raise AssertionError(f"device never reached version {v} (at {_version(url)}): "
                         f"{httpx.get(f'{url}/v1/status').json().get('updater')}")


def test_twenty_hot_swaps_under_load_lose_no_request(loop):
    from edgeadapt.core.bundle import Bundle

    base = Bundle(loop["bundle"]).params
    with Load(loop["device"]) as load:
        for v in range(1, 21):
            params = {k: (val + 0.002 * v if k.endswith(".bias") else val) for k, val in base.items()}
            loop["publish"](params, v - 1, f"test version {v}")
            _wait_version(loop["device"], v)
        time.sleep(0.5)
    status = httpx.get(f"{loop['device']}/v1/status").json()
    assert load.failed == [], load.failed[:5]
    assert load.ok > 40
    assert status["param_version"] == 20
    assert status["updater"]["counters"]["applied"] == 20
    assert status["updater"]["counters"]["rolled_back"] == 0
    assert len(load.versions) >= 5  # requests were answered by many versions along the way
    # the version in use is on disk for a restart
    assert '"version": 20' in (loop["state"] / "versions" / "current.json").read_text()


def test_degraded_version_is_rolled_back_automatically(loop):
    from edgeadapt.core.bundle import Bundle

    base = Bundle(loop["bundle"]).params
    rng = np.random.default_rng(0)
    good = {k: (v + 0.001 if k.endswith(".bias") else v) for k, v in base.items()}
    loop["publish"](good, 0)
    with Load(loop["device"]) as load:
        _wait_version(loop["device"], 1)
        bad = {k: (v * 0 + rng.normal(0, 3, v.shape).astype(np.float32) if k.endswith((".weight", ".bias")) else v)
               for k, v in good.items()}
        loop["publish"](bad, 1, "deliberately degraded")
        deadline = time.time() + 60
        while time.time() < deadline:
            st = httpx.get(f"{loop['device']}/v1/status").json()
            if st["updater"]["counters"]["rolled_back"]:
                break
            time.sleep(0.1)
    assert load.failed == []
    st = httpx.get(f"{loop['device']}/v1/status").json()
    assert st["updater"]["counters"]["applied"] == 2
    assert st["updater"]["counters"]["rolled_back"] == 1, st["updater"]["events"]
    assert st["param_version"] == 1
    assert 2 in st["updater"]["blocked_versions"]
    reason = [e for e in st["updater"]["events"] if e["event"] == "rolled_back"][0]["reason"]
    assert reason
    time.sleep(1.0)  # the blocked version is not taken again
    assert _version(loop["device"]) == 1


def test_tampered_or_foreign_packages_are_never_applied(cloud_env, tmp_path):
    from edgeadapt.core import signing
    from edgeadapt.core.update_package import build_package
    from edgeadapt.device.config import DeviceConfig
    from edgeadapt.device.daemon import DeviceDaemon

    d = DeviceDaemon(DeviceConfig(bundle=cloud_env.bundle, state_dir=tmp_path / "s", cloud_url="http://127.0.0.1:9",
                                  token="t" * 20))
    try:
        base = dict(d.engine.base_params)
        target = {k: v + 0.01 for k, v in base.items()}
        key = signing.load_private_key(cloud_env.home)
        good = build_package("fmnist-edge", 0, base, 1, target, "fp16", key)
        tampered = bytearray(good)
        tampered[len(tampered) // 2] ^= 0x40
        other_key = signing.generate_private_key()
        foreign = build_package("fmnist-edge", 0, base, 1, target, "fp16", other_key)
        other_model = build_package("another-model", 0, base, 1, target, "fp16", key)
        for data in (bytes(tampered), foreign, other_model, good[: len(good) // 3]):
            assert d.updater.apply_package(data) == "rejected"
            assert d.engine.param_version == 0
        assert d.versions.versions() == [0]
        assert d.updater.counters["rejected"] == 4
        assert d.updater.apply_package(good) == "applied" and d.engine.param_version == 1
    finally:
        d.stop()


@pytest.mark.parametrize("which", ["fast-path", "default", "transductive", "loop-every16"])
def test_watch_keeps_a_harmless_update_through_noisy_traffic_and_a_domain_shift(cloud_env, tmp_path, which):
    """The watch compares both versions on the same inputs: a harmless update is kept even when the window's
    traffic is far harder than the traffic before it and the engine refolds its statistics for a new domain
    in the middle of the window (the previous version runs with the same statistics), or, with the loop's
    method, normalizes every batch with its own statistics (the previous version runs with the same mix).
    The same window rolls back an update that really is worse."""
    from edgeadapt.core import signing
    from edgeadapt.core.update_package import build_package
    from edgeadapt.device.config import DEFAULT_METHOD, TRANSDUCTIVE_METHOD, DeviceConfig
    from edgeadapt.device.daemon import DeviceDaemon
    from tests.cloud_fixtures import synthetic_images

    method = {"fast-path": "ema_stats", "default": DEFAULT_METHOD, "transductive": TRANSDUCTIVE_METHOD,
              "loop-every16": "ema_stats:transductive=true,every=16"}[which]
    d = DeviceDaemon(DeviceConfig(bundle=cloud_env.bundle, state_dir=tmp_path / "s", cloud_url="http://127.0.0.1:9",
                                  token="t" * 20, watch_batches=4, method=method))
    try:
        key = signing.load_private_key(cloud_env.home)
        easy = synthetic_images(64, seed=1)
        hard = synthetic_images(256, seed=2, shift=0.4)  # another domain: higher entropy, a refold of statistics

        def run(x):
            res = d.engine.process(x)
            d.updater.observe(x, res)
            return res

        def window_after(params, version, base_version):
            for _ in range(6):
                run(easy)  # the baseline window: easy, confident traffic
            pkg = build_package("fmnist-edge", base_version, dict(d.engine.base_params), version, params, "fp16", key)
            assert d.updater.apply_package(pkg) == "applied"
            folded = [d.engine.folded_stats_version]
            for i in range(4):
                run(hard[i * 64 : (i + 1) * 64])
                folded.append(d.engine.folded_stats_version)
            return folded[:-1]  # as seen by the window (the last batch decides, and a rollback refolds too)

        base = dict(d.engine.base_params)
        harmless = {k: (v + 0.001 if k.endswith(".bias") else v) for k, v in base.items()}
        folded = window_after(harmless, 1, 0)
        assert d.updater.counters["kept"] == 1 and d.updater.counters["rolled_back"] == 0, d.updater.events[-1]
        if which == "transductive":
            # every batch normalized with its own statistics (TRANSDUCTIVE_METHOD), replayed so by the watch
            assert not d.engine.method.folds_mix and d.engine.transductive_batches >= 2
        elif which == "loop-every16":
            # the first batch after a new version is normalized with its own statistics, the next ones with that
            # mix folded into the fast session: the watch replays both as served
            assert d.engine.method.folds_mix and d.engine.transductive_batches >= 2
        elif which == "fast-path":
            assert len(set(folded)) > 1  # the statistics were refolded inside the window
        kept = [e for e in d.updater.events if e["event"] == "kept"][-1]
        assert kept["agreement"] > 0.95  # same statistics on both sides: only the 0.001 bias differs

        rng = np.random.default_rng(0)
        worse = {k: (rng.normal(0, 3, v.shape).astype(np.float32) if k.endswith((".weight", ".bias")) else v)
                 for k, v in harmless.items()}
        window_after(worse, 2, 1)
        assert d.updater.counters["rolled_back"] == 1 and d.engine.param_version == 1, d.updater.counters
    finally:
        d.stop()


def test_loop_bench_counts_rounds_since_each_shift():
    from edgeadapt.bench.loop import _acc_by_rounds

    domains = np.repeat([0, 1, 2], 1000)
    hits = np.arange(3000) % 1000 >= 512  # right only from the 513th image of each domain on
    # window 512: domain 0 = [512 | 488]; domain 1 starts at 1000 = [24 | 512 | 464]; domain 2 at 2000 = [48 | 512 | 440]
    by_round = _acc_by_rounds(hits, domains, 512)
    assert len(by_round) == 3
    assert by_round[0] == 0.0
    assert by_round[1] == round((488 + 24 + 48) / (488 + 512 + 512), 4)
    assert by_round[2] == 1.0
