"""Forward-only methods for wild traffic (issue 17), each pinned against a small hand-checked case."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeadapt.device.methods import BatchInfo, build_method
from edgeadapt.device.methods.robust_bn import ClassBalancedMemory
from tests.test_methods import make_ctx, one_hot_logits, stats


def _img(v: float) -> np.ndarray:
    return np.full((1, 2, 2), v, np.float32)


def test_memory_cstu_by_hand():
    # capacity 4, 3 classes: at most 4/3 per class, i.e. 2 (a class with 1 item still has room)
    strict = ClassBalancedMemory(4, 3, fill_free=False)  # RoTTA: a class at its share is refused room
    assert [strict.add(_img(i), 0, 0.0) for i in range(4)] == [True, True, True, True]
    assert len(strict) == 2  # the 3rd and 4th replaced the oldest of class 0
    m = ClassBalancedMemory(4, 3)
    assert [m.add(_img(i), 0, 0.0) for i in range(2)] + [m.add(_img(i), 1, 0.0) for i in (2, 3)] == [True] * 4
    assert sorted(m.inputs()[:, 0, 0, 0].tolist()) == [0, 1, 2, 3]
    assert m.age[m.cls >= 0].tolist() == [4, 3, 2, 1]  # each item ages once per candidate, itself included
    full = ClassBalancedMemory(4, 3)
    assert [full.add(_img(i), 0, 0.0) for i in range(4)] == [True] * 4 and len(full) == 4  # room is filled
    # class 0 is full: its oldest item (value 0, age 4) scores above a new certain one and makes room
    assert m.add(_img(4), 0, 0.0)
    assert sorted(m.inputs()[:, 0, 0, 0].tolist()) == [1, 2, 3, 4]
    # a new class with the memory full: evict the highest score among the largest classes (0 and 1, 2 each):
    # the oldest is value 1 (class 0, age 4)
    assert m.add(_img(5), 2, 0.0)
    assert sorted(m.inputs()[:, 0, 0, 0].tolist()) == [2, 3, 4, 5]
    assert m.counts().tolist() == [1, 2, 1]
    # class 1 full, and the candidate is so uncertain (score 0.5 + 1.0) that no item of class 1 scores above it
    # (oldest: sigmoid(4/4) + 0 = 0.73): refused
    assert not m.add(_img(6), 1, math.log(3))
    assert sorted(m.inputs()[:, 0, 0, 0].tolist()) == [2, 3, 4, 5]


def _rbn_info(labels, ood=None) -> BatchInfo:
    logits = one_hot_logits(np.asarray(labels))
    info = BatchInfo.from_logits(logits)
    if ood is not None:
        info.ood = np.asarray(ood, bool)
    return info


def test_rbn_update_cadence_and_ema_by_hand():
    m = build_method("rbn:min_fill=4", make_ctx())
    x = np.stack([_img(i) for i in range(32)])
    labels = np.arange(32) % 10
    assert m.stats_inputs(x, _rbn_info(labels)) is None  # 32 < 64 samples seen
    req = m.stats_inputs(x, _rbn_info(labels))  # 64 seen: the memory, with RoTTA's training-mode mix alpha
    assert req is not None
    inputs, mix = req
    assert len(inputs) == len(m.memory) and mix.tolist() == [pytest.approx(0.05)] * 2
    assert m.memory.counts().tolist() == [8, 8] + [6] * 8  # the memory fills with what came
    v0 = m.stats_version
    # memory statistics mean 1, var 4 in bn1 (source 0/1 and 1/2): m = 0.05 after one reference batch
    m.update_stats(stats([1.0, 1.0], [4.0, 4.0]), len(inputs))
    mu, var = m.forward_stats()["bn1"]
    np.testing.assert_allclose(mu, [0.05, 1.0], rtol=1e-6)
    np.testing.assert_allclose(var, [0.95 + 0.2, 1.9 + 0.2], rtol=1e-6)
    assert m.stats_version != v0
    # a batch of 128 is two reference batches: m = 1 - 0.95^2
    x128 = np.concatenate([x] * 4)
    assert m.stats_inputs(x128, _rbn_info(np.tile(labels, 4))) is not None
    assert m._pending_momentum == pytest.approx(1 - 0.95 ** 2)


def test_rbn_memory_ignores_flagged_novelty_but_not_a_shifted_domain():
    m = build_method("rbn", make_ctx())
    x = np.stack([_img(i) for i in range(10)])
    m.stats_inputs(x, _rbn_info(np.arange(10), ood=[True] * 2 + [False] * 8))
    assert len(m.memory) == 8  # 2 of 10 flagged: novel, kept out
    m.reset()
    m.stats_inputs(x, _rbn_info(np.arange(10), ood=[True] * 8 + [False] * 2))
    assert len(m.memory) == 10  # most of the batch flagged: a shifted domain, not novelty


def test_rbn_state_round_trip_clears_memory():
    a = build_method("rbn:min_fill=1,ref_batch=8", make_ctx())
    x = np.stack([_img(i) for i in range(8)])
    assert a.stats_inputs(x, _rbn_info(np.arange(8))) is not None
    a.update_stats(stats([2.0, 0.0], [1.0, 1.0]), 8)
    b = build_method("rbn:min_fill=1,ref_batch=8", make_ctx())
    b.stats_inputs(x, _rbn_info(np.arange(8)))
    b.load_state_dict(a.state_dict())
    np.testing.assert_allclose(b.forward_stats()["bn1"][0], a.forward_stats()["bn1"][0])
    assert len(b.memory) == 0


def test_prior_correction_by_hand():
    from edgeadapt.device.methods.prior_correction import smoothed_prior

    p = np.array([[0.9, 0.1]] * 3 + [[0.45, 0.55]])
    # prior (0.7875, 0.2125); smooth = max(1/4, 1/2) / 0.7875; prior' = (prior + smooth) / (1 + 2 smooth)
    s = 0.5 / 0.7875
    np.testing.assert_allclose(smoothed_prior(p), (np.array([0.7875, 0.2125]) + s) / (1 + 2 * s))
    ctx = make_ctx(num_classes=2)
    out = build_method("prior_correction", ctx).adjust(np.log(p).astype(np.float32), np.zeros((4, 4), np.float32))
    assert out.argmax(1).tolist() == [0, 0, 0, 0]  # 0.45 * 0.627 > 0.55 * 0.373: the outlier joins the batch
    assert np.log(p).argmax(1).tolist() == [0, 0, 0, 1]
    # a single sample: the smoothed prior is nearly uniform and never changes the argmax
    one = np.log(np.array([[0.45, 0.55]], np.float32))
    assert build_method("prior_correction", ctx).adjust(one, np.zeros((1, 4), np.float32)).argmax(1).tolist() == [1]
    z = np.array([[2.0, 1.0]] * 3 + [[0.0, 1.0]], np.float32)
    logit_space = build_method("prior_correction:space=logits", ctx).adjust(z, np.zeros((4, 4), np.float32))
    from edgeadapt.core.mathops import softmax

    np.testing.assert_allclose(logit_space, z * smoothed_prior(softmax(z.astype(np.float64))), rtol=1e-6)


def test_marginal_skew_test_tells_skew_from_collapse():
    from edgeadapt.device.methods.lame_skew import MarginalSkewTest

    t = MarginalSkewTest(10, horizon=256)
    one_class = np.eye(10)[np.r_[np.zeros(48, int), np.ones(16, int)]] * 0.5 + 0.05  # uncertain, 2 classes
    # against the uniform start: h = (3/4, 1/4), KL = 3/4 ln(7.5) + 1/4 ln(2.5) by hand
    assert t.score(one_class) == pytest.approx(0.75 * math.log(7.5) + 0.25 * math.log(2.5))
    iid = np.eye(10)[np.arange(64) % 10]
    assert t.score(iid) < 0.01
    # a model that keeps predicting that class: its marginal follows, and the same batch stops reading as skewed
    for _ in range(30):
        t.update(one_class)
    assert t.score(one_class) < 0.05
    # the momentum is per sample: 64 batches of one equal one batch of 64 (of one class)
    a, b = MarginalSkewTest(10, 256), MarginalSkewTest(10, 256)
    a.update(one_class[:48])
    for row in one_class[:48]:
        b.update(row[None])
    np.testing.assert_allclose(a.marginal, b.marginal, rtol=1e-12)


def test_lame_skew_applies_lame_only_to_departures():
    rng = np.random.default_rng(0)
    ctx = make_ctx()
    m = build_method("lame_skew:horizon=256", ctx)
    iid = rng.integers(0, 10, 64)
    feats = rng.normal(size=(64, 4)).astype(np.float32)
    logits = one_hot_logits(iid, scale=2.0)
    assert np.array_equal(m.adjust(logits, feats), logits) and not m.last_skewed  # i.i.d.: untouched
    skew = one_hot_logits(np.r_[np.zeros(60, int), np.ones(4, int)], scale=2.0)
    out = m.adjust(skew, feats)
    assert m.last_skewed and not np.array_equal(out, skew)
    collapsed = build_method("lame_skew:horizon=256", ctx)
    for _ in range(40):  # a collapsed model: every batch looks like this one
        collapsed.adjust(skew, feats)
    assert not collapsed.last_skewed
    small = build_method("lame_skew", ctx)
    assert np.array_equal(small.adjust(skew[:8], feats[:8]), skew[:8])  # fewer than min_batch: never


def test_collapse_reset_sends_the_composite_back_to_source():
    ctx = make_ctx()
    m = build_method("rbn:min_fill=1,ref_batch=8+collapse_reset:horizon=64,min_seen=64", ctx)
    x = np.stack([_img(i) for i in range(8)])
    src = m.forward_stats()["bn1"][0].copy()
    balanced = one_hot_logits(np.arange(8) % 10)
    assert m.stats_inputs(x, BatchInfo.from_logits(balanced)) is not None
    m.update_stats(stats([3.0, 3.0], [1.0, 1.0]), 8)
    assert not np.allclose(m.forward_stats()["bn1"][0], src)
    feats = np.zeros((8, 4), np.float32)
    for _ in range(8):  # 64 balanced predictions: no collapse
        m.adjust(balanced, feats)
    assert m.collapse_resets == 0
    one = one_hot_logits(np.zeros(8, int))
    for _ in range(40):
        m.adjust(one, feats)
        if m.collapse_resets:
            break
    assert m.collapse_resets == 1
    np.testing.assert_allclose(m.forward_stats()["bn1"][0], src)  # the statistics are the source's again
    detector = m.members[1]
    assert detector.resets == 1 and detector.seen == 0


def test_rbn_in_the_engine_runs_its_memory_every_reference_batch(tiny_bundle):
    """Counted at the backend: one adaptive forward of the memory per 64 samples seen (at any batch size), with
    RoTTA's mix; predictions on the folded fast path, refolded after each update."""
    from edgeadapt.core.bundle import Bundle
    from edgeadapt.device.engine import AdaptiveEngine, EngineConfig

    eng = AdaptiveEngine(Bundle(tiny_bundle), EngineConfig(method="rbn:min_fill=1"))
    be = eng.backend
    calls: list[tuple[int, float | None]] = []
    run_adaptive = be.run_adaptive

    def counting(x, params, mix):
        calls.append((len(x), None if mix is None else float(np.asarray(mix)[0])))
        return run_adaptive(x, params, mix)

    be.run_adaptive = counting
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (256, 1, 32, 32), dtype=np.uint8)
    versions = []
    for i in range(0, 256, 16):
        r = eng.process(x[i : i + 16])
        assert not r.info["transductive"]  # never normalized with its own batch
        versions.append(eng.folded_stats_version)
    assert len(calls) == 4 and all(1 <= n <= 64 for n, _ in calls)
    assert all(mix == pytest.approx(0.05) for _, mix in calls)
    assert len(set(versions)) >= 4  # the fast path follows each update
    mu = eng.method.forward_stats()["stem.1"][0]
    assert not np.allclose(mu, eng.bundle.params["stem.1.running_mean"])


def test_robust_stats_shallow_ema_and_deep_memory_by_hand():
    ctx = make_ctx()  # layers bn1 (2 channels), bn2 (3 channels): shallow = the first half
    m = build_method("robust_stats:shallow=0.5,min_fill=1,gate=0", ctx)
    assert m.n_shallow == 1
    np.testing.assert_allclose(m.forward_mix(64), [0.8, 0.0])  # 64 / (16 + 64) in the shallow layer only
    x = np.stack([_img(i) for i in range(64)])
    info = _rbn_info(np.arange(64) % 10)
    info.batch_stats = stats([2.0, 2.0], [1.0, 1.0], [5.0] * 3, [9.0] * 3)
    req = m.stats_inputs(x, info)
    # shallow EMA, m = 0.5 after 64 samples, E[x^2] mixing: source bn1 mean (0, 1), var (1, 2)
    mu, var = m.forward_stats()["bn1"]
    np.testing.assert_allclose(mu, [1.0, 1.5])
    np.testing.assert_allclose(var, [0.5 * 1 + 0.5 * 5 - 1.0, 0.5 * 3 + 0.5 * 5 - 2.25])
    np.testing.assert_allclose(m.forward_stats()["bn2"][0], 0.0)  # deep layers never follow the batch itself
    assert req is not None and req[1].tolist() == [0.0, 1.0]  # memory: its own deep statistics only
    m.update_stats(stats([7.0, 7.0], [1.0, 1.0], [3.0] * 3, [4.0] * 3), len(req[0]))
    np.testing.assert_allclose(m.forward_stats()["bn2"][0], 3.0)  # alpha = 1: the memory's statistics
    np.testing.assert_allclose(m.forward_stats()["bn1"][0], [1.0, 1.5])  # shallow: untouched by the memory


def test_robust_stats_batch_of_one_averages_like_a_batch():
    """64 single samples move the shallow EMA like one batch of 64 with their pooled statistics."""
    ctx = make_ctx()
    rng = np.random.default_rng(0)
    means = rng.normal(1.0, 0.5, (64, 2))
    one = build_method("robust_stats:shallow=0.5,fast_momentum=0.05", ctx)
    x1 = _img(0)[None]
    for mu_i in means:
        info = _rbn_info([0])
        info.batch_stats = stats(mu_i, [1.0, 1.0], [0.0] * 3, [1.0] * 3)
        one.stats_inputs(x1, info)
    batch = build_method("robust_stats:shallow=0.5,fast_momentum=0.05", ctx)
    info = _rbn_info(np.zeros(64, int))
    info.batch_stats = stats(means.mean(0), 1.0 + means.var(0), [0.0] * 3, [1.0] * 3)
    batch.stats_inputs(np.stack([_img(0)] * 64), info)
    for k in (0, 1):
        np.testing.assert_allclose(one.forward_stats()["bn1"][k], batch.forward_stats()["bn1"][k], rtol=0.05)


def test_stats_distance_by_hand():
    from edgeadapt.device.methods.robust_stats import stats_distance

    a = {"l": (np.array([1.0, 1.0]), np.array([4.0, 4.0]))}
    b = {"l": (np.zeros(2), np.ones(2))}
    assert stats_distance(a, b, ["l"], eps=0.0) == pytest.approx(1.0 + math.log(4.0))
    assert stats_distance(b, b, ["l"]) == 0.0


@pytest.mark.parametrize("recent_mean, gate_open", [(3.1, True), (6.0, False)])
def test_robust_stats_gate_takes_the_recent_samples_only_when_they_agree(recent_mean, gate_open):
    m = build_method("robust_stats:shallow=0.5,min_fill=1,gate=0.5", make_ctx())
    x = np.stack([_img(i) for i in range(64)])
    reqs = m.stats_inputs(x, _rbn_info(np.arange(64) % 10))
    assert isinstance(reqs, list) and len(reqs) == 2  # the recent samples, then the class-balanced memory
    assert len(reqs[0][0]) == 64 and reqs[0][1].tolist() == [0.0, 1.0]
    m.update_stats(stats([9.0, 9.0], [1.0, 1.0], [recent_mean] * 3, [1.0] * 3), 64)
    np.testing.assert_allclose(m.forward_stats()["bn2"][0], 0.0)  # nothing published before both are in
    m.update_stats(stats([9.0, 9.0], [1.0, 1.0], [3.0] * 3, [1.0] * 3), len(reqs[1][0]))
    assert m.gate_open is gate_open
    np.testing.assert_allclose(m.forward_stats()["bn2"][0], recent_mean if gate_open else 3.0)


def test_robust_stats_in_the_engine(tiny_bundle):
    """Counted at the backend: every batch predicted on the adaptive graph with the batch mixed into the first
    stage only, and per 64 samples two memory forwards (recent, class-balanced) with their own deep statistics."""
    from edgeadapt.core.bundle import Bundle
    from edgeadapt.device.engine import AdaptiveEngine, EngineConfig

    eng = AdaptiveEngine(Bundle(tiny_bundle), EngineConfig(method="robust_stats:min_fill=1,gate=0.08"))
    calls: list[tuple[int, list[float]]] = []
    run_adaptive = eng.backend.run_adaptive

    def counting(x, params, mix):
        calls.append((len(x), np.asarray(mix).round(3).tolist()))
        return run_adaptive(x, params, mix)

    eng.backend.run_adaptive = counting
    x = np.random.default_rng(0).integers(0, 256, (256, 1, 32, 32), dtype=np.uint8)
    for i in range(0, 256, 32):
        eng.process(x[i : i + 32])
    predict = [(n, mix) for n, mix in calls if mix[-1] == 0.0]
    memory = [(n, mix) for n, mix in calls if mix[-1] == 1.0]
    assert len(predict) == 8 and all(n == 32 and mix == pytest.approx([2 / 3] * 3 + [0.0] * 6, abs=1e-3)
                                     for n, mix in predict)  # 32 / (16 + 32) in the first stage
    assert len(memory) == 2 * 4 and all(n == 64 and mix == [0.0] * 3 + [1.0] * 6 for n, mix in memory)
    assert eng.method.updates == 4 and eng.guard_counters["stats_refused"] == 0


@pytest.mark.parametrize("spec", ["rbn", "robust_stats", "prior_correction", "lame_skew", "collapse_reset",
                                  "robust_stats+prior_correction+lame_skew+collapse_reset"])
def test_state_round_trip_of_the_new_methods(spec):
    from tests.test_methods import test_state_dict_round_trip as round_trip

    round_trip(spec)


def test_single_image_requests_are_pooled_for_the_input_shift_test(tiny_bundle):
    """At batch 1 one image's moments are not a domain's: an i.i.d. stream of single images must not count as a
    stream of shifts, and a real change of brightness must still be seen within a pool of requests."""
    from edgeadapt.core.bundle import Bundle
    from edgeadapt.device.engine import AdaptiveEngine, EngineConfig

    rng = np.random.default_rng(3)
    eng = AdaptiveEngine(Bundle(tiny_bundle), EngineConfig(method="ema_stats"))
    # one domain whose images differ as garments do: each its own share of foreground pixels (20-80%)
    share = rng.uniform(0.2, 0.8, (128, 1, 1, 1))
    same = np.where(rng.random((128, 1, 32, 32)) < share, rng.integers(120, 256, (128, 1, 32, 32)), 0).astype(np.uint8)
    for i in range(len(same)):
        eng.process(same[i : i + 1])
    assert eng.shifts <= 2, eng.shifts  # the stream's first pool is a new domain; tested per image: ~100
    before = eng.shifts
    dark = (same // 4).astype(np.uint8)  # another domain: mean and spread both fall by 4x
    for i in range(64):
        eng.process(dark[i : i + 1])
    assert eng.shifts > before
    # whole batches are tested on their own, as before
    eng64 = AdaptiveEngine(Bundle(tiny_bundle), EngineConfig(method="ema_stats"))
    eng64.process(same[:64])
    eng64.process(dark[:64])
    assert eng64.shifts == 2
