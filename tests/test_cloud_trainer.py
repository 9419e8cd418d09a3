"""The distillation trainer and the gate, driven through the real server (admin endpoint) where it matters."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from edgeadapt.cloud.config import TrainerConfig
from edgeadapt.cloud.edge_model import extract_params, load_teacher, rebuild_edge_model
from edgeadapt.cloud.trainer import cema_loss, to_float_batch
from edgeadapt.core.bundle import read_manifest
from edgeadapt.core.tensorfile import params_hash

pytest_plugins = ["tests.cloud_fixtures"]  # the cloud fixtures (cloud_env, live_cloud)
pytestmark = pytest.mark.timeout(300)  # includes building the shared trained-bundle fixture on a loaded machine


def _upload(cloud, token, xs, **kw):
    from tests.cloud_fixtures import batch_body  # registered as a plugin by now

    with cloud.client(token) as c:
        for i in range(0, len(xs), 64):
            r = c.post("/v1/samples", json=batch_body(xs[i : i + 64], **kw))
            assert r.status_code == 200, r.text


def _loss(bundle, teacher, params, xs) -> float:
    manifest = read_manifest(bundle)
    model = rebuild_edge_model(bundle, params)
    x = to_float_batch(list(xs), manifest)
    with torch.no_grad():
        return float(cema_loss(model(x), teacher(x)))


def test_rebuild_and_extract_round_trip(cloud_env):
    manifest = read_manifest(cloud_env.bundle)
    model = rebuild_edge_model(cloud_env.bundle)
    from edgeadapt.core.tensorfile import load_params

    params = extract_params(model, manifest)
    assert params_hash(params) == params_hash(load_params(cloud_env.bundle / "params.safetensors"))
    from edgeadapt.export.verify import parity_input

    calib = load_params(cloud_env.bundle / "calib.safetensors")
    with torch.no_grad():  # parity inputs are stored as uint8 images; the bundle's codec normalizes them
        logits = model(torch.from_numpy(parity_input(calib, manifest))).numpy()
    assert np.abs(logits - calib["parity.logits"]).max() < 1e-4


def test_trainer_lowers_distillation_loss(live_cloud, cloud_env, kit):
    cloud = live_cloud(trainer={"holdout_fraction": 0.0})  # the published hyper-parameters
    tok = cloud.add_device("cam")
    xs = kit.synthetic_images(192, seed=21, shift=kit.TEST_SHIFT)  # a "corrupted" stream
    _upload(cloud, tok, xs)
    _upload(cloud, tok, kit.synthetic_images(8, seed=22), novel=True)  # stored, never trained on
    with cloud.client(cloud.admin, timeout=120) as c:
        r = c.post("/v1/admin/train")
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["status"] == "published" and res["version"] == 1 and res["samples"] == 192
    cfg = TrainerConfig()
    per_pass = 192 // 32 * cfg.steps_per_chunk  # every group of new uploads
    assert res["steps"] == per_pass * max(cfg.epochs, math.ceil(cfg.min_steps_per_round / per_pass)) == 36
    assert res["loss_after"] < res["loss_before"]
    store = cloud.service.store
    assert store.count_samples("train", consumed=False) == 0 and store.count_samples("novel") == 8
    # independent check with a freshly rebuilt student and teacher
    teacher = load_teacher("resnet_edge", cloud_env.teacher_weights)
    before = _loss(cloud_env.bundle, teacher, store.get_params(0), xs)
    after = _loss(cloud_env.bundle, teacher, store.get_params(1), xs)
    assert after < before - 1e-3, (before, after)
    # only adaptable tensors changed, and statistics moved (BN in train mode during distillation)
    p0, p1 = store.get_params(0), store.get_params(1)
    kinds = {t.name: t.kind for t in read_manifest(cloud_env.bundle).adaptable}
    moved = {kinds[n] for n in p0 if not np.array_equal(p0[n], p1[n])}
    assert moved == {"norm_affine", "norm_stats"}
    with cloud.client(cloud.admin) as c:
        assert c.post("/v1/admin/train").json()["status"] == "idle"
        versions = c.get("/v1/admin/versions").json()
    assert [v["version"] for v in versions["versions"]] == [0, 1]
    metrics = cloud.client().get("/metrics").text
    assert 'edgeadapt_cloud_versions_published_total{model="fmnist-edge"} 1.0' in metrics
    assert 'edgeadapt_cloud_train_seconds_count{model="fmnist-edge"} 1.0' in metrics


def test_gate_rejects_bad_candidate(live_cloud, cloud_env, kit):
    # one pass only: this test is about the gate; the tiny test teacher and student already agree on every held-back
    # sample, and 30 steps on 128 synthetic uploads can flip three of them, a significant drop from 100%
    cloud = live_cloud(trainer={"holdout_fraction": 0.5, "min_steps_per_round": 0})
    tok = cloud.add_device("cam")
    _upload(cloud, tok, kit.synthetic_images(256, seed=31, shift=kit.TEST_SHIFT))
    store = cloud.service.store
    assert store.count_samples("holdout") > 80
    with cloud.client(cloud.admin, timeout=120) as c:
        good = c.post("/v1/admin/train").json()
    assert good["status"] == "published" and good["version"] == 1
    # distillation kept teacher agreement (normalized per group, the tiny test teacher and student already agree
    # on nearly every held-back sample, so a sample or two may flip either way)
    assert good["gate"]["candidate"] >= good["gate"]["current"] - 0.03
    p1 = store.get_params(1)
    bad = {k: (-v if k.endswith(".weight") else v) for k, v in p1.items()}  # flip every norm scale
    res = cloud.service.trainer.submit_candidate(bad, note="deliberately bad")
    assert res.status == "rejected" and res.version is None
    assert res.gate["candidate"] < res.gate["current"]
    assert store.latest_version() == 1
    rejected = [c_ for c_ in store.list_candidates() if c_.status == "rejected"]
    assert len(rejected) == 1 and "agreement" in rejected[0].reason and rejected[0].params_hash == params_hash(bad)
    with cloud.client(tok) as c:
        assert c.get("/v1/updates", params={"model": "fmnist-edge", "have": 1}).status_code == 204
    nan = {k: np.full_like(v, np.nan) for k, v in p1.items()}
    assert cloud.service.trainer.submit_candidate(nan).status == "rejected"
    # finite but out of the bounds every device applies (a negative variance): never published
    var = next(k for k in p1 if k.endswith("running_var"))
    neg = cloud.service.trainer.submit_candidate({**p1, var: -np.ones_like(p1[var])})
    assert neg.status == "rejected" and "out of bounds" in neg.reason and var in neg.reason
    # a candidate as good as the current one passes; every decision is listed
    assert cloud.service.trainer.submit_candidate({k: v.copy() for k, v in p1.items()}).status == "published"
    with cloud.client(cloud.admin) as c:
        cands = c.get("/v1/admin/versions").json()["candidates"]
    assert [c_["status"] for c_ in cands] == ["published", "rejected", "rejected", "rejected", "published"]
    assert 'edgeadapt_cloud_versions_rejected_total{model="fmnist-edge"} 3.0' in cloud.client().get("/metrics").text


def test_training_is_seeded(cloud_env, tmp_path, kit):
    hashes = []
    for run in range(2):
        service = kit.make_service(cloud_env, tmp_path / f"s{run}", trainer={"holdout_fraction": 0.0, "replay_min": 32,
                                                                         "replay_per_step": 16})
        dev = service.store.add_device("cam")
        device = service.store.authenticate(dev)
        from edgeadapt.core.wire import SampleBatch

        service.ingest(device, SampleBatch.model_validate(kit.batch_body(kit.synthetic_images(96, seed=41),
                                                                     ids=[f"sample-{i:04d}" for i in range(96)])))
        res = service.trainer.train_now()
        assert res.status == "published" and res.steps == 30  # 3 groups x 2 steps per pass, 5 passes
        assert service.trainer.replay_samples == 96  # remembered once, not once per pass
        hashes.append(res.params_hash)
        service.store.close()
    assert hashes[0] == hashes[1]


def test_min_steps_per_round_adds_passes_and_remembers_once(cloud_env, tmp_path, kit):
    """A round over few uploads keeps taking full passes until it has taken ``min_steps_per_round`` steps; the
    uploads enter replay once, not once per pass."""
    service = kit.make_service(cloud_env, tmp_path / "s", trainer={"holdout_fraction": 0.0, "steps_per_chunk": 2,
                                                                   "min_steps_per_round": 9, "replay_min": 32})
    device = service.store.authenticate(service.store.add_device("cam"))
    from edgeadapt.core.wire import SampleBatch

    service.ingest(device, SampleBatch.model_validate(kit.batch_body(kit.synthetic_images(64, seed=43))))
    res = service.trainer.train_now()  # 2 groups x 2 steps = 4 per pass: 3 passes to reach 9
    assert res.status == "published" and res.steps == 12
    assert service.trainer.replay_samples == 64
    service.ingest(device, SampleBatch.model_validate(kit.batch_body(kit.synthetic_images(320, seed=44))))
    assert service.trainer.train_now().steps == 20  # 10 groups x 2: one pass is already enough
    service.store.close()


def test_capped_round_trains_on_newest_and_replays_the_rest(cloud_env, tmp_path, kit):
    """A round that has fallen behind trains on the most recent ``limit`` uploads; the older ones go to replay
    untrained and are consumed with the round."""
    service = kit.make_service(cloud_env, tmp_path / "s", trainer={"holdout_fraction": 0.0, "min_steps_per_round": 0,
                                                                   "replay_min": 32})
    device = service.store.authenticate(service.store.add_device("cam"))
    from edgeadapt.core.wire import SampleBatch

    for seed, n in ((47, 96), (48, 64)):
        service.ingest(device, SampleBatch.model_validate(kit.batch_body(kit.synthetic_images(n, seed=seed))))
    pending = [s_.seq for s_ in service.store.pending_samples()]
    loaded: list[list[int]] = []
    real_load = service.store.load_inputs
    service.store.load_inputs = lambda samples: (loaded.append([s_.seq for s_ in samples]), real_load(samples))[1]
    res = service.trainer.train_now(limit=64)
    assert res.status == "published" and (res.samples, res.skipped, res.steps) == (64, 96, 4)
    assert loaded and set(loaded[0]) <= set(pending[-64:])  # the loss probe: the newest uploads, trained on
    # the older ones went to replay untrained, as records: their inputs stay in the store
    assert sorted(s_.seq for g in service.trainer.replay for s_ in g) == sorted(pending)
    assert service.trainer.replay_samples == 160
    assert service.store.count_samples("train", consumed=False) == 0
    assert service.trainer.train_now(limit=64).status == "idle"
    service.store.close()


def test_background_trainer_triggers(live_cloud, kit):
    cloud = live_cloud(trainer={"enabled": True, "holdout_fraction": 0.0, "train_every": 64,
                                "train_interval_s": 3600})
    tok = cloud.add_device("cam")
    _upload(cloud, tok, kit.synthetic_images(32, seed=51))
    time.sleep(1.5)
    assert cloud.service.store.latest_version() == 0  # below the trigger
    _upload(cloud, tok, kit.synthetic_images(40, seed=52))
    deadline = time.monotonic() + 30
    while cloud.service.store.latest_version() == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cloud.service.store.latest_version() == 1
    assert cloud.service.store.count_samples("train", consumed=False) == 0
    with cloud.client(tok) as c:
        r = c.get("/v1/updates", params={"model": "fmnist-edge", "have": 0})
        assert r.status_code == 200 and r.headers["x-edgeadapt-version"] == "1"


def test_teacher_adaptation_option(cloud_env, tmp_path, kit):
    service = kit.make_service(cloud_env, tmp_path / "s", trainer={"holdout_fraction": 0.0, "teacher_adapt": True,
                                                                   "min_steps_per_round": 0})
    before = {k: v.clone() for k, v in service.trainer.teacher.state_dict().items()}
    dev = service.store.authenticate(service.store.add_device("cam"))
    from edgeadapt.core.wire import SampleBatch

    service.ingest(dev, SampleBatch.model_validate(kit.batch_body(kit.synthetic_images(64, seed=61, shift=kit.TEST_SHIFT))))
    assert service.trainer.train_now().steps == 2 * TrainerConfig().steps_per_chunk
    after = service.trainer.teacher.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith((".weight", ".bias")) for k in changed)
    assert all(after[k].ndim == 1 for k in changed)  # norm affine only
    service.store.close()


def test_batch_statistics_normalizes_with_the_batch_and_keeps_running_stats(cloud_env):
    from edgeadapt.cloud.trainer import batch_statistics

    model = rebuild_edge_model(cloud_env.bundle).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, *read_manifest(cloud_env.bundle).input.shape) * 3 + 1  # far from the running stats
    with torch.no_grad():
        eval_out = model(x)
        with batch_statistics(model):
            batch_out = model(x)
        model.train()
        train_out = model(x)  # plain train mode: batch statistics (and it moves the running stats)
        model.load_state_dict(before)
        model.eval()
        with batch_statistics(model, enabled=False):
            off_out = model(x)
    torch.testing.assert_close(batch_out, train_out)
    assert not torch.allclose(batch_out, eval_out, atol=1e-3)
    torch.testing.assert_close(off_out, eval_out)
    with torch.no_grad(), batch_statistics(model):
        model(x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats and counters untouched
    assert not model.training and not any(m.training for m in model.modules())


def test_sample_groups_keep_one_device_and_arrival_order():
    from types import SimpleNamespace

    from edgeadapt.cloud.trainer import sample_groups

    samples = [SimpleNamespace(device_id=1 if i % 3 else 2) for i in range(100)]
    inputs = [np.full(1, i) for i in range(100)]
    groups = sample_groups(samples, inputs, 32)
    for g in groups:
        ids = [int(a[0]) for a in g]
        assert len({samples[i].device_id for i in ids}) == 1  # one device per group
        assert ids == sorted(ids)  # arrival order kept
        assert 16 <= len(g) <= 32  # near-equal sizes: no tiny remainder group
    assert sorted(int(a[0]) for g in groups for a in g) == list(range(100))
