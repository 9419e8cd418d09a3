"""Forward-only adaptation methods: hand-checked cases, state round trips, spec parsing (numpy only)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from edgeadapt.core.bundle import NormLayer
from edgeadapt.core.mathops import entropy_from_logits
from edgeadapt.device.methods import (
    AdaptationMethod,
    AdaptContext,
    BatchInfo,
    CompositeMethod,
    available,
    build_method,
    get_method,
    parse_spec,
)
from edgeadapt.device.methods.guard import skew_score


def make_ctx(num_classes: int = 10, dim: int = 4, seed: int = 0) -> AdaptContext:
    rng = np.random.default_rng(seed)
    layers = [NormLayer(name="bn1", channels=2, eps=1e-5), NormLayer(name="bn2", channels=3, eps=1e-5)]
    return AdaptContext(
        num_classes=num_classes,
        norm_layers=layers,
        source_stats={
            "bn1": (np.array([0.0, 1.0], np.float32), np.array([1.0, 2.0], np.float32)),
            "bn2": (np.zeros(3, np.float32), np.ones(3, np.float32)),
        },
        head_weight=rng.normal(size=(num_classes, dim)).astype(np.float32),
        head_bias=rng.normal(size=num_classes).astype(np.float32) * 0.1,
        feature_mean=rng.normal(size=dim).astype(np.float32),
        feature_var=np.ones(dim, np.float32),
        entropy_mean=0.3,
    )


def stats(a1, v1, a2=(0.0, 0.0, 0.0), v2=(1.0, 1.0, 1.0)):
    return {"bn1": (np.array(a1, np.float32), np.array(v1, np.float32)),
            "bn2": (np.array(a2, np.float32), np.array(v2, np.float32))}


def one_hot_logits(labels, num_classes=10, scale=4.0, seed=0):
    rng = np.random.default_rng(seed)
    return (np.eye(num_classes)[labels] * scale + rng.normal(size=(len(labels), num_classes)) * 0.1).astype(np.float32)


def test_registry_lists_all_methods():
    assert {"none", "norm_stats", "ema_stats", "dua", "lame", "t3a", "feature_shift", "lame_guard"} <= set(available())
    with pytest.raises(ValueError, match="available"):
        get_method("tent")
    with pytest.raises(TypeError):
        AdaptationMethod(make_ctx())


def test_none_is_source():
    m = build_method("none", make_ctx())
    fs = m.forward_stats()
    np.testing.assert_array_equal(fs["bn1"][0], [0.0, 1.0])
    assert fs["bn1"][0].dtype == np.float32
    assert m.forward_mix(8) is None and not m.needs_stats
    x = np.ones((3, 10), np.float32)
    assert m.adjust(x, np.ones((3, 4)), BatchInfo.from_logits(x)) is x
    assert m.state_dict() == {}


def test_norm_stats_mix_weight():
    m = build_method("norm_stats", make_ctx())
    assert not m.needs_stats
    np.testing.assert_allclose(m.forward_mix(16), [0.5, 0.5])
    np.testing.assert_allclose(m.forward_mix(1), [1 / 17, 1 / 17], rtol=1e-6)
    m = build_method("norm_stats:prior=4", make_ctx())
    np.testing.assert_allclose(m.forward_mix(12), [0.75, 0.75])
    np.testing.assert_array_equal(m.forward_stats()["bn1"][1], [1.0, 2.0])  # always the source


def test_ema_stats_two_steps_by_hand():
    m = build_method("ema_stats:ref_batch=4", make_ctx())
    assert m.needs_stats and m.forward_mix(4) is None
    v0 = m.stats_version
    # step 1: a full reference batch -> k = 1, m = max(0.05, 0.1 * 0.94) + 0.005 = 0.099
    m.update_stats(stats([1.0, 1.0], [1.0, 0.0]), 4, None)
    assert m.stats_version != v0
    mu, var = m.forward_stats()["bn1"]
    assert mu.dtype == np.float32
    np.testing.assert_allclose(mu, [0.099, 1.0], rtol=1e-6)
    # var: 0.901 * (var + mu^2) + 0.099 * (var_b + mu_b^2) - mu_new^2
    np.testing.assert_allclose(var, [0.901 * 1 + 0.099 * 2 - 0.099**2, 0.901 * 3 + 0.099 * 1 - 1.0], rtol=1e-6)
    # step 2: batch size 1 -> a quarter step: k = 1.25, m = (0.1 * 0.94**1.25 + 0.005) / 4
    mom = (0.1 * 0.94**1.25 + 0.005) * 0.25
    m.update_stats(stats([2.0, 0.0], [0.5, 0.5]), 1, None)
    mu2, var2 = m.forward_stats()["bn1"]
    mu1 = np.array([0.099, 1.0])
    var1 = np.array([0.901 + 0.198 - 0.099**2, 1.802])
    exp_mu = (1 - mom) * mu1 + mom * np.array([2.0, 0.0])
    exp_var = (1 - mom) * (var1 + mu1**2) + mom * (np.array([0.5, 0.5]) + np.array([4.0, 0.0])) - exp_mu**2
    np.testing.assert_allclose(mu2, exp_mu, rtol=1e-6)
    np.testing.assert_allclose(var2, exp_var, rtol=1e-6)
    # momentum schedule: continual floor vs DUA's published schedule
    assert m.momentum(1000) == pytest.approx(0.055)
    dua = build_method("dua", make_ctx())
    assert dua.momentum(1) == pytest.approx(0.1 * 0.94 + 0.005)
    assert dua.momentum(1000) == pytest.approx(0.005)
    # reset returns to the source and changes the version
    v = m.stats_version
    m.reset()
    assert m.stats_version != v
    np.testing.assert_array_equal(m.forward_stats()["bn1"][0], [0.0, 1.0])


def test_ema_stats_options():
    m = build_method("ema_stats:transductive=true,prior=16", make_ctx())
    np.testing.assert_allclose(m.forward_mix(16), [0.5, 0.5])
    m = build_method("ema_stats:publish_every=2,ref_batch=1", make_ctx())
    v = m.stats_version
    m.update_stats(stats([1.0, 1.0], [1.0, 1.0]), 1)
    assert m.stats_version == v  # not published yet
    np.testing.assert_array_equal(m.forward_stats()["bn1"][0], [0.0, 1.0])
    m.update_stats(stats([1.0, 1.0], [1.0, 1.0]), 1)
    assert m.stats_version != v
    assert m.forward_stats()["bn1"][0][0] > 0
    with pytest.raises(ValueError, match="missing"):
        m.update_stats({"bn1": stats([0, 0], [1, 1])["bn1"]}, 4)
    m.update_stats(stats([5.0, 5.0], [1.0, 1.0]), 0)  # no reliable samples: ignored
    assert m.state_dict()["updates"][0] == 2


def _two_clusters():
    feats = np.array([[1, 0.05], [1, -0.05], [1, 0], [0.05, 1], [-0.05, 1], [0, 1]], np.float64)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.1, 0.9], [0.1, 0.9], [0.1, 0.9]])
    return feats, np.log(probs)


def test_lame_flips_outlier_to_its_cluster():
    feats, logits = _two_clusters()
    m = build_method("lame:knn=2", make_ctx(num_classes=2, dim=2))
    out = m.adjust(logits, feats, BatchInfo.from_logits(logits))
    assert out.shape == (6, 2)
    np.testing.assert_allclose(np.exp(out).sum(1), 1.0, rtol=1e-5)  # log-probabilities
    assert list(out.argmax(1)) == [0, 0, 0, 1, 1, 1]
    assert logits.argmax(1)[2] == 1
    assert 1 <= m.last_steps < 100
    # lam = 0: the prediction is the input distribution
    m0 = build_method("lame:knn=2,lam=0", make_ctx(num_classes=2, dim=2))
    np.testing.assert_allclose(m0.adjust(logits, feats), logits, atol=1e-6)
    # fewer than knn + 1 samples: unchanged
    small = build_method("lame", make_ctx(num_classes=2, dim=2))
    five, one = logits[:5], logits[:1]
    assert small.adjust(five, feats[:5]) is five
    assert small.adjust(one, feats[:1]) is one


def test_t3a_hand_case_keeps_lowest_entropy():
    ctx = AdaptContext(num_classes=2, norm_layers=[], source_stats={}, head_weight=np.eye(2, dtype=np.float32),
                       head_bias=np.zeros(2, np.float32))
    m = build_method("t3a:filter_k=2", ctx)
    sup0, ent0 = m.supports(0)
    np.testing.assert_allclose(sup0, [[1, 0]])  # warm start: the classifier row
    np.testing.assert_allclose(ent0, entropy_from_logits(np.array([[1.0, 0.0]])))
    z = np.array([[2.0, 0.1], [1.0, 0.9], [3.0, 0.0], [0.0, 5.0]])
    logits = z @ np.eye(2)  # the head's output
    info = BatchInfo.from_logits(logits, reliable=[True, True, True, False])
    out = m.adjust(logits, z, info)
    # class 0 candidates: warm row H=0.58, [2,.1] H=0.39, [1,.9] H=0.69, [3,0] H=0.19 -> keep [3,0] and [2,.1]
    sup0, ent0 = m.supports(0)
    np.testing.assert_allclose(sup0, [[1, 0], z[0] / np.linalg.norm(z[0])], rtol=1e-6)
    assert ent0[0] < ent0[1]
    # class 1: the unreliable sample [0,5] is not added, the warm row stays
    np.testing.assert_allclose(m.supports(1)[0], [[0, 1]])
    c0 = np.array([1, 0]) + z[0] / np.linalg.norm(z[0])
    c = np.stack([c0 / np.linalg.norm(c0), [0.0, 1.0]])
    np.testing.assert_allclose(out, z @ c.T, rtol=1e-5)
    # cosine mode with a temperature
    mc = build_method("t3a:filter_k=2,normalize_z=true,temperature=0.1", ctx)
    outc = mc.adjust(logits, z, info)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(outc, zn @ c.T / 0.1, rtol=1e-5)
    # keep-all mode accumulates sums
    ma = build_method("t3a:filter_k=-1", ctx)
    outa = ma.adjust(logits, z, BatchInfo.from_logits(logits))
    ca = np.stack([[1, 0] + zn[0] + zn[1] + zn[2], [0, 1] + zn[3]])
    np.testing.assert_allclose(outa, z @ (ca / np.linalg.norm(ca, axis=1, keepdims=True)).T, rtol=1e-5)


def test_feature_shift_moves_features_by_delta():
    ctx = AdaptContext(num_classes=2, norm_layers=[], source_stats={}, head_weight=np.array([[1.0, 0], [0, 2.0]]),
                       head_bias=np.array([0.5, -0.5]), feature_mean=np.array([0.0, 0.0]))
    m = build_method("feature_shift:ref_batch=4", ctx)
    head = lambda z: z @ ctx.head_weight.T + ctx.head_bias  # noqa: E731
    z1 = np.array([[1.0, 2.0]] * 4) + np.array([[0.1, 0], [-0.1, 0], [0, 0.1], [0, -0.1]])
    out = m.adjust(head(z1), z1, BatchInfo.from_logits(head(z1)))
    # first full batch initializes the test mean: mu = [1, 2], shift = [-1, -2]
    np.testing.assert_allclose(m.shift, [-1.0, -2.0])
    np.testing.assert_allclose(out, head(z1 + [-1.0, -2.0]), rtol=1e-6)
    # second batch: m = max(0.1 * 4/4, 4/8) = 0.5 -> mu = 0.5 [1,2] + 0.5 [3,2] = [2, 2]
    z2 = np.array([[3.0, 2.0]] * 4)
    out2 = m.adjust(head(z2), z2, BatchInfo.from_logits(head(z2)))
    np.testing.assert_allclose(m.shift, [-2.0, -2.0])
    np.testing.assert_allclose(out2, head(z2 + [-2.0, -2.0]), rtol=1e-6)
    # unreliable samples do not move the test mean
    z3 = np.array([[100.0, 100.0]] * 4)
    m.adjust(head(z3), z3, BatchInfo.from_logits(head(z3), reliable=[False] * 4))
    np.testing.assert_allclose(m.shift, [-2.0, -2.0])


def test_guard_detects_label_skew():
    g = build_method("lame_guard", make_ctx())
    rng = np.random.default_rng(0)
    iid = one_hot_logits(rng.integers(0, 10, 64))
    two = one_hot_logits(rng.choice([3, 7], 64))
    one = one_hot_logits(np.full(64, 5))
    assert not g.detect(iid) and skew_score(iid) > 0.85
    assert g.detect(two) and g.detect(one)
    assert skew_score(two) == pytest.approx(math.log(2) / math.log(10), abs=0.02)
    for seed in range(200):  # no false alarms on seeded i.i.d. batches of 64 over 10 classes
        assert not g.detect(one_hot_logits(np.random.default_rng(seed).integers(0, 10, 64)))
    assert not g.detect(two[:8])  # below min_batch
    feats = rng.normal(size=(64, 4))
    out = g.adjust(iid, feats, BatchInfo.from_logits(iid))
    assert out is iid and not g.last_skewed
    out = g.adjust(two, feats, BatchInfo.from_logits(two))
    assert g.last_skewed and out.shape == (64, 10)
    np.testing.assert_allclose(np.exp(out).sum(1), 1.0, rtol=1e-5)


def test_composite_guard_skips_stats_update_on_skewed_batch():
    ctx = make_ctx()
    m = build_method("ema_stats:transductive=true+lame_guard", ctx)
    assert isinstance(m, CompositeMethod) and m.needs_stats and m.provides_stats
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(64, 4))
    two = one_hot_logits(rng.choice([1, 2], 64))
    iid = one_hot_logits(rng.integers(0, 10, 64))
    bs = stats([3.0, 3.0], [1.0, 1.0])
    v0 = m.stats_version
    assert m.forward_mix(64) is not None
    # runtime order: forward_stats, forward_mix, graph, update_stats, adjust
    m.update_stats(bs, 32, BatchInfo(np.ones(64, bool), np.zeros(64, bool), np.zeros(64)))  # no logits: deferred
    out = m.adjust(two, feats, BatchInfo.from_logits(two))
    assert m.last_skewed and m.stats_version == v0 and m.skipped_updates == 1
    np.testing.assert_allclose(np.exp(out).sum(1), 1.0, rtol=1e-5)  # LAME applied
    assert m.forward_mix(64) is None  # after a skewed batch: no in-batch mixing
    m.update_stats(bs, 32, BatchInfo(np.ones(64, bool), np.zeros(64, bool), np.zeros(64)))
    out = m.adjust(iid, feats, BatchInfo.from_logits(iid))
    assert not m.last_skewed and m.stats_version != v0
    np.testing.assert_array_equal(out, iid)
    assert m.forward_stats()["bn1"][0][0] > 0
    np.testing.assert_allclose(m.forward_mix(64), [0.8, 0.8])
    # with logits in BatchInfo the decision is immediate
    v1 = m.stats_version
    m.update_stats(bs, 32, BatchInfo.from_logits(two))
    assert m.stats_version == v1 and m.last_skewed
    m.update_stats(bs, 32, BatchInfo.from_logits(iid))
    assert m.stats_version != v1


def test_composite_chains_adjust_and_rejects_two_stats_methods():
    ctx = make_ctx(num_classes=2, dim=2)
    feats, logits = _two_clusters()
    m = build_method("norm_stats:prior=8+lame:knn=2", ctx)
    np.testing.assert_allclose(m.forward_mix(8), [0.5, 0.5])
    assert not m.needs_stats
    assert list(m.adjust(logits, feats).argmax(1)) == [0, 0, 0, 1, 1, 1]
    m2 = build_method("feature_shift+lame", ctx)
    assert m2.stats_version == 0 and m2.forward_mix(4) is None
    with pytest.raises(ValueError, match="at most one statistics method"):
        build_method("norm_stats+ema_stats", ctx)


def test_spec_parsing_and_bad_options():
    assert parse_spec("ema_stats:min_momentum=0,transductive=true,ref_batch=32,symmetry=max+lame_guard") == [
        ("ema_stats", {"min_momentum": 0, "transductive": True, "ref_batch": 32, "symmetry": "max"}),
        ("lame_guard", {}),
    ]
    m = build_method("ema_stats:min_momentum=0,transductive=true,ref_batch=32", make_ctx())
    assert m.options["min_momentum"] == 0.0 and isinstance(m.options["min_momentum"], float)
    assert m.options["transductive"] is True and m.options["ref_batch"] == 32
    with pytest.raises(ValueError, match=r"unknown option.*momentum.*valid options: decay, eps"):
        build_method("ema_stats:momentum=0.1", make_ctx())
    with pytest.raises(ValueError, match="must be int"):
        build_method("ema_stats:ref_batch=abc", make_ctx())
    with pytest.raises(ValueError, match="must be bool"):
        build_method("ema_stats:transductive=1", make_ctx())
    with pytest.raises(ValueError, match="key=value"):
        build_method("lame:knn", make_ctx())
    with pytest.raises(ValueError, match="unknown adaptation method"):
        build_method("ema_stats+tent", make_ctx())
    with pytest.raises(ValueError, match="empty"):
        build_method("lame+", make_ctx())
    with pytest.raises(ValueError, match="knn must be"):
        build_method("lame:knn=0", make_ctx())
    with pytest.raises(ValueError, match="needs head_weight"):
        build_method("t3a", AdaptContext(num_classes=2, norm_layers=[], source_stats={}))


SPECS = ["none", "norm_stats", "ema_stats", "dua:ref_batch=8", "lame", "t3a:filter_k=3", "t3a:filter_k=-1",
         "feature_shift", "lame_guard", "ema_stats+t3a:filter_k=2+lame_guard", "feature_shift+lame"]


@pytest.mark.parametrize("spec", SPECS)
def test_state_dict_round_trip(spec):
    ctx = make_ctx()
    rng = np.random.default_rng(2)

    def batch(seed):
        r = np.random.default_rng(seed)
        labels = r.choice([0, 1], 32) if seed % 2 else r.integers(0, 10, 32)
        logits = one_hot_logits(labels, seed=seed) * r.uniform(0.3, 1.0, (32, 1)).astype(np.float32)
        feats = r.normal(size=(32, 4)).astype(np.float32) + labels[:, None] * 0.2
        return logits, feats, BatchInfo.from_logits(logits, reliable=r.random(32) > 0.2)

    def step(m, seed):
        logits, feats, info = batch(seed)
        m.forward_stats()
        m.forward_mix(32)
        if m.needs_stats:
            bs = stats(rng.normal(size=2), rng.uniform(0.5, 2, 2), rng.normal(size=3), rng.uniform(0.5, 2, 3))
            m.update_stats(bs, int(info.reliable.sum()), info)
        return m.adjust(logits, feats, info)

    a = build_method(spec, ctx)
    for s in range(3):
        step(a, s)
    blob = st_save(a.state_dict())
    b = build_method(spec, ctx)
    b.load_state_dict(st_load(blob))
    for layer, (mu, var) in a.forward_stats().items():
        np.testing.assert_allclose(b.forward_stats()[layer][0], mu)
        np.testing.assert_allclose(b.forward_stats()[layer][1], var)
    logits, feats, info = batch(10)
    np.testing.assert_allclose(b.adjust(logits, feats, info), a.adjust(logits, feats, info), rtol=1e-5, atol=1e-6)
    state = a.state_dict()
    if state:
        key = next(iter(state))
        bad = dict(state)
        bad[key] = np.zeros(tuple(s + 1 for s in state[key].shape) or (2,), state[key].dtype)
        with pytest.raises(ValueError, match="shape"):
            b.load_state_dict(bad)
        bad = dict(state)
        del bad[key]
        with pytest.raises(ValueError, match="missing"):
            b.load_state_dict(bad)
    with pytest.raises(ValueError, match="unexpected"):
        b.load_state_dict({**state, "bogus": np.zeros(1)})


def test_context_validation():
    with pytest.raises(ValueError, match="do not match"):
        AdaptContext(num_classes=2, norm_layers=[NormLayer(name="a", channels=2, eps=1e-5)], source_stats={})
    with pytest.raises(ValueError, match="shapes"):
        AdaptContext(num_classes=2, norm_layers=[NormLayer(name="a", channels=2, eps=1e-5)],
                     source_stats={"a": (np.zeros(3), np.ones(3))})
    with pytest.raises(ValueError, match="head_weight"):
        AdaptContext(num_classes=3, norm_layers=[], source_stats={}, head_weight=np.zeros((2, 4)))
