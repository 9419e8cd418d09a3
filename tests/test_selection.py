"""CEMA selective entropy: each exclusion rule, warm-up, budgets, novel routing, state."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeadapt.core.mathops import entropy_from_probs
from edgeadapt.core.reliability import ReliabilityPolicy
from edgeadapt.device.selection import COUNTER_NAMES, SampleSelector

C = 10
LN_C = math.log(C)
COLD = ReliabilityPolicy(warmup=10_000)  # the warm-up never ends: E_max(t) stays E_max


def peaked(k: int, a: float, c: int = C) -> np.ndarray:
    p = np.full(c, (1.0 - a) / (c - 1))
    p[k] = a
    return p


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_thresholds_follow_ln_c():
    s = SampleSelector(C)
    assert s.e_max == pytest.approx(0.4 * LN_C)
    assert s.e_min == pytest.approx(0.02 * LN_C)


def test_exclusion_rules():
    s = SampleSelector(C, COLD, novel_budget_samples_per_s=None)
    probs = np.stack([np.full(C, 0.1), peaked(0, 0.99999), peaked(1, 0.9), peaked(2, 0.9)])
    ent = entropy_from_probs(probs)
    assert ent[0] > s.e_max and ent[1] < s.e_min and s.e_min < ent[2] < s.e_max
    ood = np.array([False, False, False, True])
    r = s.select(probs, ent, ood)
    assert r.adapt.tolist() == [2]
    assert r.novel.tolist() == [3]
    assert r.reliable.tolist() == [False, True, True, False]
    assert r.counts["unreliable"] == 1 and r.counts["low_info"] == 1 and r.counts["ood"] == 1
    assert r.counts["selected"] == 1 and r.counts["novel_selected"] == 1
    # entropy defaults to the entropy of probs
    r2 = SampleSelector(C, COLD).select(probs[:3])
    assert r2.adapt.tolist() == [2]


def test_redundancy_similar_rule():
    s = SampleSelector(C, COLD)
    first = s.select(np.stack([peaked(3, 0.9)]))
    assert first.adapt.tolist() == [0]  # m is empty: nothing is redundant yet
    np.testing.assert_allclose(s.m, peaked(3, 0.9))
    # same prediction again: cos(p, m) = 1 > 1 - eps -> redundant; another class: kept
    r = s.select(np.stack([peaked(3, 0.9), peaked(3, 0.85), peaked(5, 0.9)]))
    assert r.adapt.tolist() == [2]
    assert r.counts["redundant"] == 2
    np.testing.assert_allclose(s.m, 0.9 * peaked(3, 0.9) + 0.1 * peaked(5, 0.9))


def test_redundancy_literal_eata_rule():
    s = SampleSelector(C, COLD, redundancy="eata", redundancy_eps=0.4)
    s.select(np.stack([peaked(k, 0.9) for k in range(C)]))  # m ~ uniform: cos(onehot-ish, m) ~ 0.32..0.4
    cos = float(peaked(3, 0.9) @ s.m / np.linalg.norm(peaked(3, 0.9)) / np.linalg.norm(s.m))
    assert cos == pytest.approx(0.351, abs=0.01)  # ~ 1/sqrt(10) for a near-uniform m
    assert s.select(np.stack([peaked(3, 0.9)])).adapt.size == 1  # < 0.4: kept
    s.m = peaked(3, 0.5)  # recent uploads dominated by class 3 -> class 3 is redundant, class 4 is not
    r = s.select(np.stack([peaked(3, 0.9), peaked(4, 0.9)]))
    assert r.adapt.tolist() == [1] and r.counts["redundant"] == 1
    s2 = SampleSelector(C, COLD, redundancy="eata", redundancy_eps=0.05)
    s2.select(np.stack([peaked(k, 0.9) for k in range(C)]))
    # literal eps=0.05 at C=10: once m is spread over the classes, every sample is "redundant"
    assert s2.select(np.stack([peaked(k, 0.9) for k in range(C)])).adapt.size == 0


def test_warmup_then_dynamic_e_max():
    s = SampleSelector(C, ReliabilityPolicy(warmup=8, now_window=1), redundancy="off")
    p = np.stack([peaked(0, 0.9)] * 4)
    s.select(p, np.full(4, 0.5))
    assert not s.warmed_up and s.e_max == pytest.approx(0.4 * LN_C)
    s.select(np.stack([peaked(0, 0.9)] * 6), np.full(6, 0.5))  # crosses the warm-up inside the batch
    assert s.warmed_up and s.warm_mean == pytest.approx(0.5)
    assert s.e_max == pytest.approx(0.4 * LN_C)  # the rest of the batch had the same entropy
    # the stream gets harder: mean entropy doubles -> E_max(t) doubles, E=1.2 becomes reliable
    ent = np.array([1.2, 0.8, 0.8, 0.8])
    r = s.select(np.stack([peaked(0, 0.9)] * 4), ent)
    assert s.e_max == pytest.approx(0.4 * LN_C * 0.9 / 0.5)
    assert r.e_max == pytest.approx(s.e_max)
    assert 0 in r.adapt and r.counts["unreliable"] == 0
    # before warm-up the same sample would have been unreliable
    fresh = SampleSelector(C, ReliabilityPolicy(warmup=8))
    assert fresh.select(np.stack([peaked(0, 0.9)]), np.array([1.2])).counts["unreliable"] == 1


def test_lam_scales_e_max():
    s = SampleSelector(C, ReliabilityPolicy(warmup=2, lam=0.5, now_window=1))
    s.select(np.stack([peaked(0, 0.9)] * 2), np.full(2, 0.5))
    assert s.e_max == pytest.approx(0.5 * 0.4 * LN_C)


def test_now_mean_window_is_batch_size_independent():
    a = SampleSelector(C, ReliabilityPolicy(warmup=1, now_window=100))
    b = SampleSelector(C, ReliabilityPolicy(warmup=1, now_window=100))
    for s in (a, b):
        s.select(np.stack([peaked(0, 0.9)]), np.array([0.5]))
    a.select(np.stack([peaked(0, 0.9)] * 64), np.full(64, 0.8))
    for _ in range(8):
        b.select(np.stack([peaked(0, 0.9)] * 8), np.full(8, 0.8))
    assert a.now_mean == pytest.approx(b.now_mean)
    assert 0.5 < a.now_mean < 0.8


def test_sample_budget_prefers_informative():
    clock = FakeClock()
    s = SampleSelector(C, COLD, redundancy="off", budget_samples_per_s=10, burst_s=1.0, clock=clock)
    ent = np.linspace(0.1, 0.9, 30)
    probs = np.stack([peaked(i % C, 0.9) for i in range(30)])
    r = s.select(probs, ent)
    assert r.adapt.tolist() == list(range(20, 30))  # the 10 highest entropies
    assert r.counts["budget_dropped"] == 20
    assert s.select(probs, ent).adapt.size == 0  # bucket empty, no time passed
    clock.t += 0.5
    assert s.select(probs, ent).adapt.size == 5
    clock.t += 100.0  # refills only up to the burst
    assert s.select(probs, ent).adapt.size == 10
    assert s.counters()["selected"] == 25


def test_byte_budget():
    clock = FakeClock()
    s = SampleSelector(C, COLD, redundancy="off", budget_bytes_per_s=1000, burst_s=1.0, clock=clock)
    probs = np.stack([peaked(i % C, 0.9) for i in range(30)])
    assert s.select(probs, sample_bytes=100).adapt.size == 10
    clock.t += 1.0
    assert s.select(probs, sample_bytes=300).adapt.size == 3
    # a zero budget uploads nothing
    z = SampleSelector(C, COLD, budget_samples_per_s=0, clock=clock)
    assert z.select(probs).adapt.size == 0


def test_novel_budget_by_ood_score():
    clock = FakeClock()
    s = SampleSelector(C, COLD, novel_budget_samples_per_s=2, burst_s=1.0, clock=clock)
    probs = np.stack([peaked(i % C, 0.9) for i in range(6)])
    ood = np.array([True, True, True, True, False, False])
    scores = np.array([0.1, 5.0, 3.0, 0.2, 0.0, 0.0])
    r = s.select(probs, None, ood, ood_scores=scores)
    assert r.novel.tolist() == [1, 2]
    assert r.counts["novel_budget_dropped"] == 2
    assert not set(r.adapt) & set(np.flatnonzero(ood))


def test_state_round_trip():
    s = SampleSelector(C, ReliabilityPolicy(warmup=4, now_window=10))
    s.select(np.stack([peaked(k, 0.9) for k in range(6)]), np.linspace(0.3, 0.7, 6))
    st = s.state()
    assert set(st) == {"m", "stats", "counters"} and all(isinstance(v, np.ndarray) for v in st.values())
    t = SampleSelector(C, ReliabilityPolicy(warmup=4, now_window=10))
    t.load_state(st)
    assert t.e_max == pytest.approx(s.e_max) and t.warmed_up
    np.testing.assert_allclose(t.m, s.m)
    assert t.counters() == s.counters() and set(t.counters()) == set(COUNTER_NAMES)
    empty = SampleSelector(C)
    fresh = SampleSelector(C)
    fresh.load_state(empty.state())
    assert fresh.m is None and not fresh.warmed_up
    with pytest.raises(ValueError):
        SampleSelector(5).load_state(st)
