"""The cloud keeps uploads on disk, not in RAM (issue 15 item 2): the trainer's replay holds stored records and
loads a step's inputs through the store's cache, which is bounded in bytes; training is the same either way."""

from __future__ import annotations

import numpy as np
import pytest

from edgeadapt.cloud.store import StoredSample
from edgeadapt.cloud.store.input_cache import InputCache
from edgeadapt.core.wire import SampleBatch

pytest_plugins = ["tests.cloud_fixtures"]
pytestmark = pytest.mark.timeout(300)

BLOB = 16  # samples per upload batch: one blob of 16 x 1 KiB each
TRAINER = {"holdout_fraction": 0.0, "replay_min": 32, "replay_per_step": 32, "min_steps_per_round": 4}


def _rounds(kit, cloud_env, path, rounds: int, **trainer):
    """Ingest 96 uploads per round in batches of BLOB and train; -> (service, [(replay samples, cache bytes)],
    params hashes)."""
    service = kit.make_service(cloud_env, path, trainer={**TRAINER, **trainer})
    device = service.store.authenticate(service.store.add_device("cam"))
    seen, hashes = [], []
    for r in range(rounds):
        xs = kit.synthetic_images(96, seed=70 + r, shift=kit.TEST_SHIFT)
        for i in range(0, len(xs), BLOB):
            ids = [f"r{r}-s{j:04d}" for j in range(i, i + BLOB)]
            service.ingest(device, SampleBatch.model_validate(kit.batch_body(xs[i : i + BLOB], ids=ids)))
        res = service.trainer.train_now()
        assert res.status == "published", res.reason
        hashes.append(res.params_hash)
        seen.append((service.trainer.replay_samples, service.store._input_cache.nbytes))
    return service, seen, hashes


def test_replay_grows_cache_bytes_do_not(cloud_env, tmp_path, kit):
    limit_mb = 40 / 1024  # 40 KiB: two and a half blobs
    service, seen, small = _rounds(kit, cloud_env, tmp_path / "small", 4, input_cache_mb=limit_mb)
    replay = [n for n, _ in seen]
    assert replay == [96, 192, 288, 384]
    assert all(0 < b <= 40 * 1024 for _, b in seen), seen  # used, and never above its bound
    assert all(isinstance(s, StoredSample) for g in service.trainer.replay for s in g)  # records, not arrays
    service.store.close()
    # the same rounds with the default bound: the cache then holds every blob (what the bound prevents), and the
    # trainer trains exactly the same (inputs loaded from disk or memory are the same bytes)
    service, seen_big, big = _rounds(kit, cloud_env, tmp_path / "big", 4)
    assert seen_big[-1][1] == 384 * 1024
    assert big == small
    service.store.close()


def test_input_cache_evicts_least_recently_used_by_bytes():
    c = InputCache(max_bytes=3000)
    a, b, d = (np.zeros(1000, np.uint8) for _ in range(3))
    c.put("a", a)
    c.put("b", b)
    c.put("d", d)
    assert c.get("a") is a  # a is now the most recent
    c.put("e", np.zeros(1000, np.uint8))
    assert c.get("b") is None and c.get("a") is a and c.nbytes == 3000
    c.put("huge", np.zeros(5000, np.uint8))  # larger than the bound: not kept, nothing evicted for it
    assert c.get("huge") is None and len(c) == 3
    c.resize(1500)
    assert c.nbytes <= 1500 and len(c) == 1
