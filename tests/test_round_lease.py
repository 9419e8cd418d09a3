"""Two cloud services on one store (two replicas' trainers) train each lineage one round at a time: racing on the
same pending uploads, exactly one publishes and every upload is trained once; a round longer than its lease keeps
it by renewing (issue 18, item 4: exactly one publish per round)."""

from __future__ import annotations

import numpy as np

pytest_plugins = ["tests.cloud_fixtures"]


def _pending(service, kit, n: int, seed: int) -> None:
    from edgeadapt.cloud.store import NewSample, NotFound

    try:
        dev = service.store.get_device("cam")
    except NotFound:
        dev = service.store.authenticate(service.store.add_device("cam"))
    xs = kit.synthetic_images(n, seed=seed, shift=kit.TEST_SHIFT)
    rng = np.random.default_rng(seed)
    service.store.add_samples(dev.id, [NewSample(sample_id=f"{seed}-{i}", input=x, logits=rng.normal(size=10),
                                                 entropy=1.0, ood_score=0.0, novel=False, param_version=0,
                                                 split="train") for i, x in enumerate(xs)])


def test_two_trainers_on_one_store_publish_once(cloud_env, kit, tmp_path):
    trainer = {"min_steps_per_round": 4, "gate_tolerance": 1.0}
    a = kit.make_service(cloud_env, tmp_path / "store", trainer=trainer)
    b = kit.make_service(cloud_env, tmp_path / "store", trainer=trainer)
    _pending(a, kit, 96, seed=1)
    kit.race_rounds_publish_once(a, b)
    # the next round, by the other service, continues from the published version
    _pending(b, kit, 64, seed=2)
    nxt = b.trainer.train_now()
    assert nxt.status == "published" and nxt.base_version == 1 and nxt.version == 2


def test_a_round_longer_than_its_lease_renews_it(cloud_env, kit, tmp_path):
    # a lease of 0.2 s against a round of many steps: it is renewed every third of that, so it is never lost
    svc = kit.make_service(cloud_env, tmp_path / "store", trainer={"min_steps_per_round": 12, "gate_tolerance": 1.0,
                                                                   "round_lease_s": 0.2})
    _pending(svc, kit, 64, seed=3)
    res = svc.trainer.train_now()
    assert res.status == "published" and res.steps >= 12, (res.status, res.reason)
    assert res.seconds > 0.2  # it did outlast its lease
