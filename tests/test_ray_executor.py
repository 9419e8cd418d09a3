"""Training rounds on Ray (``trainer.executor = "ray"``, issue 18 items 4 and 6), with a real local Ray (2 CPUs,
one session for the module): a round runs as a Ray task in a Ray worker process against the same SQLite store and
publishes a version a device applies; a Ray worker SIGKILLed in the middle of a round leaves nothing, the failure
shows in health and metrics, and the round is redone and published exactly once."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from tests.procs import wait_for
from tests.test_model_registry import GRAY_MODEL, RGB_MODEL, RGB_SHAPE, register_rgb, rgb_body, rgb_model  # noqa: F401 (a fixture)
from tests.test_model_registry import add_device as add_model_device

pytest_plugins = ["tests.cloud_fixtures"]

RAY_AGENTS = ("ray::DashboardA", "ray::RuntimeEnv")  # process names as /proc shows them (15 characters)
RAY_TRAINER = {"executor": "ray", "enabled": True, "train_every": 32, "train_interval_s": 1, "gate_tolerance": 1.0,
               "torch_threads": 1}


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module (its start is ~12 s); the executors find it running and use it. Without Ray's
    crash-signal handler in the test process, as `cloud serve` runs it (cloud/ray_executor.py)."""
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, namespace="edgeadapt-tests", logging_level="WARNING")
    yield ray
    ray.shutdown()


def _lease_holder(store) -> str | None:
    with store.db.reader() as tx:
        row = tx.one("SELECT holder FROM round_leases WHERE lineage='global'")
    return row["holder"] if row else None


def _add_pending(store, kit, n: int, seed: int) -> None:
    from edgeadapt.cloud.store import NewSample

    dev = store.authenticate(store.add_device("cam"))
    rng = np.random.default_rng(seed)
    store.add_samples(dev.id, [NewSample(sample_id=f"{seed}-{i}", input=x, logits=rng.normal(size=10), entropy=1.0,
                                         ood_score=0.0, novel=False, param_version=0, split="train")
                               for i, x in enumerate(kit.synthetic_images(n, seed=seed, shift=kit.TEST_SHIFT))])


def test_executor_config_from_the_environment(cloud_env):
    from edgeadapt.cloud.config import ConfigError, load_config

    cfg = load_config(cloud_env.home, environ={"EDGEADAPT_CLOUD_TRAINER__EXECUTOR": "ray",
                                               "EDGEADAPT_CLOUD_TRAINER__RAY_ADDRESS": "ray://head:10001",
                                               "EDGEADAPT_CLOUD_TRAINER__RAY_NUM_GPUS": "0.25"})
    assert (cfg.trainer.executor, cfg.trainer.ray_address, cfg.trainer.ray_num_gpus) == ("ray", "ray://head:10001",
                                                                                          0.25)
    assert load_config(cloud_env.home, environ={}).trainer.executor == "inprocess"  # the default
    with pytest.raises(ConfigError, match="executor"):
        load_config(cloud_env.home, environ={"EDGEADAPT_CLOUD_TRAINER__EXECUTOR": "celery"})
    with pytest.raises(ConfigError, match="ray_address"):
        load_config(cloud_env.home, environ={"EDGEADAPT_CLOUD_TRAINER__RAY_ADDRESS": "head"})


def test_doctor_checks_the_ray_executor(cloud_env, monkeypatch):
    from edgeadapt.cloud.doctor import cloud_findings

    monkeypatch.setenv("EDGEADAPT_CLOUD_TRAINER__EXECUTOR", "ray")
    monkeypatch.setenv("EDGEADAPT_CLOUD_TRAINER__RAY_ADDRESS", "ray://head:10001")
    found = [f for f in cloud_findings(cloud_env.home, cloud_env.bundle, url="http://127.0.0.1:9") if f.check == "ray"]
    assert [f.level for f in found] == ["ok", "warn"], found
    assert "ray://head:10001" in found[0].message and "SQLite" in found[1].message


def test_a_round_on_ray_publishes_a_version_a_device_applies(ray_session, cloud_env, kit, live_cloud, tmp_path):
    from edgeadapt.device.config import DeviceConfig
    from edgeadapt.device.daemon import DeviceDaemon

    cloud = live_cloud(trainer={**RAY_TRAINER, "min_steps_per_round": 4})
    svc = cloud.service
    assert svc.trainer.executor == "ray"
    token = cloud.add_device("cam")
    with cloud.client(token) as c:
        r = c.post("/v1/samples", json=kit.batch_body(kit.synthetic_images(64, seed=5, shift=kit.TEST_SHIFT)))
        assert r.status_code == 200 and r.json()["accepted"] == 64, r.text
    wait_for(lambda: svc.trainer.last_result is not None, 180, "the round on Ray to publish and be collected")
    assert svc.trainer.last_result.version == 1 and svc.store.latest_version() == 1
    assert svc.trainer.last_worker["pid"] != os.getpid()  # trained in a Ray worker process, not here
    assert [c.status for c in svc.store.list_candidates()] == ["published"]
    assert svc.store.count_samples("train", consumed=False) == 0
    with cloud.client() as c:
        health = c.get("/healthz").json()
        assert health["executor"] == "ray" and "trainer" not in health["reasons"], health
        metrics = c.get("/metrics").text
        status = c.get("/v1/admin/status", headers={"Authorization": f"Bearer {cloud.admin}"}).json()
    assert 'edgeadapt_cloud_trainer_executor{executor="ray"} 1.0' in metrics
    assert 'edgeadapt_cloud_versions_published_total{model="fmnist-edge"} 1.0' in metrics
    assert status["trainer"]["executor"] == "ray" and status["trainer"]["ray"].startswith("connected (local")
    assert status["trainer"]["last_result"]["version"] == 1
    d = DeviceDaemon(DeviceConfig(bundle=cloud_env.bundle, state_dir=tmp_path / "dev", cloud_url=cloud.url,
                                  token=token))
    try:
        assert d.updater.check_once() == "applied" and d.engine.param_version == 1
    finally:
        d.stop()


def test_a_grouping_cloud_on_ray_trains_one_task_per_group(ray_session, live_cloud, kit):
    """Two clusters of domain signatures make two groups; the admin API's train on Ray submits one task per
    group's lineage, and each publishes into its own group's lineage."""
    from edgeadapt.core.domain_signature import SCHEME

    cloud = live_cloud(groups={"enabled": True}, trainer={**RAY_TRAINER, "enabled": False, "min_steps_per_round": 2})
    rng = np.random.default_rng(0)
    centers = {"A": rng.normal(0, 0.1, 64), "B": rng.normal(0, 0.1, 64)}  # ~1.1 apart: two domains
    names = {"a1": "A", "a2": "A", "b1": "B", "b2": "B"}
    for i, (n, dom) in enumerate(names.items()):
        with cloud.client(cloud.add_device(n)) as c:
            sig = (centers[dom] + np.random.default_rng(i).normal(0, 0.004, 64)).tolist()
            r = c.post("/v1/heartbeat", json={"model": "fmnist-edge", "param_version": 0,
                                              "signature": {"scheme": SCHEME, "values": sig, "entropy": 0.5}})
            assert r.status_code == 200, r.text
            xs = kit.synthetic_images(48, seed=20 + i, shift=0.0 if dom == "A" else kit.TEST_SHIFT)
            assert c.post("/v1/samples", json=kit.batch_body(xs)).status_code == 200
    with cloud.client(cloud.admin) as admin:
        groups = {m: g["id"] for g in admin.get("/v1/admin/groups").json() for m in g["members"]}
        assert groups["a1"] == groups["a2"] != groups["b1"] == groups["b2"]
        r = admin.post("/v1/admin/train", timeout=300)
    assert r.status_code == 200, r.text
    rounds = {p["group"]: p for p in r.json()["groups"]}
    assert set(rounds) == {groups["a1"], groups["b1"]} and all(p["status"] == "published" for p in rounds.values())
    store = cloud.service.store
    for gid, p in rounds.items():
        assert store.get_version(p["version"]).group_id == gid
    assert store.count_samples("train", consumed=False) == 0


def test_a_registered_model_trains_on_ray_in_its_own_lineage(ray_session, live_cloud, rgb_model):  # noqa: F811
    """A second model (`cloud models add`, an RGB bundle of 120 classes with its own teacher) on a cloud whose
    rounds run on Ray: its round's task builds that model's trainer from its registry entry and trains its store
    view only; the configured model is untouched."""
    cloud = live_cloud(trainer={**RAY_TRAINER, "enabled": False, "min_steps_per_round": 2})
    register_rgb(cloud, rgb_model)
    token = add_model_device(cloud, "cam-rgb", RGB_MODEL)
    xs = np.random.default_rng(3).integers(0, 256, (64, *RGB_SHAPE), dtype=np.uint8)
    with cloud.client(token) as c:
        assert c.post("/v1/samples", json=rgb_body(xs)).json()["accepted"] == 64
    with cloud.client(cloud.admin) as a:
        r = a.post(f"/v1/admin/models/{RGB_MODEL}/train", timeout=600)
    assert r.status_code == 200 and r.json()["status"] == "published" and r.json()["version"] == 1, r.text
    served = cloud.service.served(RGB_MODEL)
    assert served.trainer.executor == "ray" and served.trainer.last_worker["pid"] != os.getpid()
    root = cloud.service.root_store
    assert root.scoped(RGB_MODEL).latest_version() == 1 and root.scoped(RGB_MODEL).count_samples(
        "train", consumed=False) == 0
    assert root.scoped(GRAY_MODEL).latest_version() == 0


def test_two_replicas_on_ray_publish_a_round_once(ray_session, cloud_env, kit, tmp_path):
    """Two services (replicas) on one store, each submitting the same lineage's round to Ray at once: two tasks
    in two worker processes race for the lease, one publishes, the other finds the lineage leased or drained."""
    trainer = {**RAY_TRAINER, "enabled": False, "min_steps_per_round": 8}
    a = kit.make_service(cloud_env, tmp_path / "store", trainer=trainer)
    b = kit.make_service(cloud_env, tmp_path / "store", trainer=trainer)
    try:
        _add_pending(a.store, kit, 64, seed=11)
        kit.race_rounds_publish_once(a, b)
    finally:
        a.stop()
        b.stop()


def test_a_failing_ray_task_shows_in_health_and_metrics(ray_session, cloud_env, kit, tmp_path):
    """A round whose task raises in the worker (here: the teacher's weights are gone) is a failure with its reason
    in health and the failures counter, raised by ``train_now`` (what the admin API's train answers with 503);
    nothing is published or consumed."""
    svc = kit.make_service(cloud_env, tmp_path / "store", teacher_weights=str(tmp_path / "gone.safetensors"),
                           trainer=RAY_TRAINER)
    try:
        _add_pending(svc.store, kit, 32, seed=9)
        with pytest.raises(RuntimeError, match="Ray task for the global round raised"):
            svc.trainer.train_now()
        reason = svc.health.check()["trainer"]["reason"]
        assert reason.startswith("training on Ray failed: the Ray task for the global round raised"), reason
        assert "gone.safetensors" in reason, reason
        assert 'edgeadapt_cloud_trainer_failures_total{model="fmnist-edge"} 1.0' in svc.metrics.render().decode()
        assert svc.store.latest_version() == 0 and svc.store.count_samples("train", consumed=False) == 32
    finally:
        svc.stop()


@pytest.mark.slow  # 25-45 s on 2 loaded cores: a long round is killed, the lease expires, the round is redone
def test_a_ray_worker_killed_mid_round_is_redone_and_published_once(ray_session, cloud_env, kit, tmp_path):
    svc = kit.make_service(cloud_env, tmp_path / "store", trainer={**RAY_TRAINER, "min_steps_per_round": 150,
                                                                   "round_lease_s": 3})
    svc.start()
    try:
        _add_pending(svc.store, kit, 64, seed=7)
        first = wait_for(lambda: _lease_holder(svc.store), 120, "a Ray worker to take the round's lease")
        pid = int(first.split(":")[1])
        assert pid != os.getpid()
        time.sleep(1.0)  # inside its round of 150 steps
        assert svc.store.latest_version() == 0
        os.kill(pid, signal.SIGKILL)
        t_kill = time.time()
        wait_for(lambda: svc.trainer.failures >= 1, 60, "the scheduler to see the task fail")
        reason = svc.health.check()["trainer"]["reason"]
        assert "Ray worker" in reason and "died" in reason, reason
        assert 'edgeadapt_cloud_trainer_failures_total{model="fmnist-edge"} 1.0' in svc.metrics.render().decode()
        wait_for(lambda: svc.trainer.last_result is not None, 240, "another Ray worker to redo and publish the round")
        redo_s = time.time() - t_kill
        time.sleep(2.0)  # nothing else comes after it
        versions = [v.version for v in svc.store.list_versions()]
        candidates = svc.store.list_candidates()
        pending = svc.store.count_samples("train", consumed=False)
        print("FAULT", {"ray_worker_killed": {"redo_s": round(redo_s, 1), "versions": versions,
                                              "candidates": len(candidates), "failures": svc.trainer.failures}})
        assert versions == [0, 1] and [c.status for c in candidates] == ["published"]
        assert pending == 0
        assert svc.trainer.last_worker["pid"] != pid  # a new worker redid it
        assert "trainer" not in svc.health.check()  # the redone round cleared the failure
    finally:
        svc.stop()


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc), e.g. the local Ray a `cloud serve` started."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in found]
        found.update(kids)
        todo += kids
    return found


@pytest.mark.slow  # 30-40 s: a `cloud serve` process starts its own local Ray
def test_cloud_serve_on_ray_publishes_and_stops_cleanly(cloud_env, kit, tmp_path):
    """`cloud serve` with EDGEADAPT_CLOUD_TRAINER__EXECUTOR=ray as a real process: uploads over HTTP are trained
    into v1 by a Ray task of the local Ray it started; SIGTERM ends it with a graceful shutdown (no Ray crash handler
    cutting it short) and takes that Ray's processes with it."""
    import sys

    from tests.conftest import free_port
    from tests.procs import Proc, _env, add_device, fresh_cloud_home

    home = fresh_cloud_home(cloud_env, tmp_path / "home")
    port = free_port()
    args = [sys.executable, "-m", "edgeadapt", "cloud", "serve", "--home", str(home), "--bundle", str(cloud_env.bundle),
            "--listen", f"127.0.0.1:{port}", "--teacher", "resnet_edge", "--teacher-weights",
            str(cloud_env.teacher_weights), "--seed", "0"]
    env = _env(EDGEADAPT_CLOUD_TRAINER__EXECUTOR="ray", EDGEADAPT_CLOUD_TRAINER__TRAIN_EVERY="32",
               EDGEADAPT_CLOUD_TRAINER__TRAIN_INTERVAL_S="1", EDGEADAPT_CLOUD_TRAINER__MIN_STEPS_PER_ROUND="4",
               EDGEADAPT_CLOUD_TRAINER__GATE_TOLERANCE="1.0", EDGEADAPT_CLOUD_TRAINER__TORCH_THREADS="1")
    cloud = Proc("cloud", args, f"http://127.0.0.1:{port}", tmp_path / "cloud.log", env)
    admin = {"Authorization": f"Bearer {cloud_env.admin_token}"}
    try:
        cloud.start()
        token = add_device(cloud, cloud_env.admin_token, "cam")
        r = cloud.post("/v1/samples", json=kit.batch_body(kit.synthetic_images(64, seed=13, shift=kit.TEST_SHIFT)),
                       headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["accepted"] == 64, r.text

        def published() -> dict | None:
            t = cloud.get("/v1/admin/status", headers=admin).json()["trainer"]
            return t if (t["last_result"] or {}).get("version") == 1 else None

        trainer = wait_for(published, 180, "the round on Ray to publish v1")
        assert trainer["executor"] == "ray" and trainer["ray"].startswith("connected (local"), trainer
        health = cloud.get("/healthz").json()
        assert health["executor"] == "ray" and health["status"] == "ok", health
        ray_procs = _descendants(cloud.popen.pid)
        assert ray_procs, "the local Ray's processes run under cloud serve"
    finally:
        rc = cloud.stop()
    assert rc == -signal.SIGTERM, cloud.tail()  # uvicorn re-raises the signal once its graceful shutdown is done
    log = cloud.tail(20000)
    assert "Application shutdown complete" in log and "SIGTERM received" not in log, log[-3000:]
    # its GCS, raylet and workers end with it; Ray's dashboard and runtime-env agents notice the raylet is gone
    # and exit by themselves later (~90 s here), so they are not waited for
    wait_for(lambda: not [n for n in map(_alive, ray_procs) if n and not n.startswith(RAY_AGENTS)], 30,
             "the local Ray's GCS, raylet and workers to end")


def _alive(pid: int) -> str | None:
    """The process's name while it runs (a zombie, exited but not reaped by this container's init, has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return None if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X") else stat.split("(", 1)[1].rsplit(")", 1)[0]
