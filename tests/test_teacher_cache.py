"""The trainer keeps a frozen teacher's logits per upload: training comes out bit-identical to recomputing them
every step, the gate's figures match, and the teacher runs far less."""

from __future__ import annotations

import pytest
import torch

from edgeadapt.cloud.teacher_cache import TeacherLogitCache

pytest_plugins = ["tests.cloud_fixtures"]
pytestmark = pytest.mark.timeout(300)  # builds the shared trained-bundle fixture on a loaded machine


class _Rec:
    def __init__(self, seq: int):
        self.seq = seq


def test_cache_computes_once_keeps_first_value_and_evicts_least_recent():
    calls: list[list[int]] = []

    def compute(group):
        calls.append([r.seq for r in group])
        return torch.tensor([[float(r.seq), float(len(calls))] for r in group])

    cache = TeacherLogitCache(max_entries=4)
    a = cache.logits([_Rec(1), _Rec(2)], compute)
    assert calls == [[1, 2]] and torch.equal(cache.logits([_Rec(1), _Rec(2)], compute), a)
    # a group with one new member is computed whole, but the kept member keeps its first logits
    b = cache.logits([_Rec(2), _Rec(3)], compute)
    assert calls[-1] == [2, 3] and b[0].tolist() == [2.0, 1.0] and b[1].tolist() == [3.0, 2.0]
    cache.logits([_Rec(4), _Rec(5)], compute)  # 5 entries > 4: the least recently used (1) goes
    assert len(cache) == 4
    cache.logits([_Rec(1)], compute)
    assert calls[-1] == [1]
    # arrays (no sequence number) are never kept
    n = len(calls)
    cache.logits([object()], lambda g: torch.zeros(1, 2))
    assert len(calls) == n and len(cache) == 4


def test_trainer_with_cache_trains_and_gates_exactly_as_without(cloud_env, tmp_path, kit):
    from edgeadapt.core.wire import SampleBatch

    results = []
    for run, keep in enumerate((True, False)):
        service = kit.make_service(cloud_env, tmp_path / f"s{run}", trainer={"holdout_fraction": 0.2, "replay_min": 32,
                                                                         "replay_per_step": 64,
                                                                         "min_steps_per_round": 8})
        if not keep:
            service.trainer.teacher_cache = TeacherLogitCache(0)
        teacher_calls = []
        hook = service.trainer.teacher.register_forward_hook(lambda m, i, o, calls=teacher_calls: calls.append(len(i[0])))
        device = service.store.authenticate(service.store.add_device("cam"))
        rounds = []
        for seed in (61, 62):  # two rounds: the second draws the first's uploads from replay
            service.ingest(device, SampleBatch.model_validate(kit.batch_body(
                kit.synthetic_images(128, seed=seed, shift=kit.TEST_SHIFT), ids=[f"sample-{seed}-{i:04d}" for i in range(128)])))
            res = service.trainer.train_now()
            rounds.append((res.status, res.params_hash, res.gate.get("current"), res.gate.get("candidate")))
        hook.remove()
        results.append((rounds, sum(teacher_calls), service.trainer.teacher_cache.hits))
        service.store.close()
    (cached, cached_images, hits), (plain, plain_images, _) = results
    assert [r[:2] for r in cached] == [r[:2] for r in plain]  # the same candidates, bit for bit
    assert all(r[0] == "published" for r in cached)
    # the gate's teacher labels are kept from the round that first judged an upload (its grouping then), so a
    # later round's agreement may differ a little from recomputing them in that round's grouping
    assert cached[0][2:] == plain[0][2:]
    assert all(abs(a - b) <= 0.05 for r, q in zip(cached, plain, strict=True) for a, b in zip(r[2:], q[2:], strict=True))
    assert hits > 0 and cached_images < plain_images / 2  # the teacher saw under half as many images
