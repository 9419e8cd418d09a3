"""The wild-traffic streams (bench/streams.py) pinned on tiny hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest

from edgeadapt.bench.streams import (
    build_gradual,
    build_stream,
    class_sorted_order,
    dirichlet_slots,
    gradual_severity,
    load_gradual,
    parse_spec,
)

# two domains of 6 samples; x encodes the position in the base stream so orders can be read off
Y = np.array([2, 0, 1, 0, 2, 1, 1, 1, 0, 2, 0, 2])
DOM = np.repeat([0, 1], 6)
X = np.arange(12)[:, None]


def test_parse_spec():
    assert parse_spec("continual") == ("continual", None)
    assert parse_spec("correlated:0.01") == ("correlated", 0.01)
    assert parse_spec("recurring:5") == ("recurring", 5)
    for bad in ("iid", "correlated", "correlated:0", "correlated:x", "recurring:0", "mixed:3", "recurring:1.5"):
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_continual_and_limit_keep_each_domain_prefix():
    s = build_stream("continual", X, Y, DOM, ["a", "b"], limit=4)
    assert s.x[:, 0].tolist() == [0, 1, 2, 3, 6, 7, 8, 9]
    assert s.domain.tolist() == [0] * 4 + [1] * 4 and s.passes == 1


def test_class_sorted_by_hand():
    # domain 0 labels 2 0 1 0 2 1 -> positions of 0s (1, 3), 1s (2, 5), 2s (0, 4); domain 1 likewise
    assert class_sorted_order(Y, DOM).tolist() == [1, 3, 2, 5, 0, 4, 8, 10, 6, 7, 9, 11]
    s = build_stream("class-sorted", X, Y, DOM)
    assert s.y.tolist() == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]


def test_dirichlet_slots_by_hand():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])  # class 0 at 0 2 4 6, class 1 at 1 3 5 7
    partition = np.array([[0.5, 0.5], [0.25, 0.75]])  # class 0: 2 + 2; class 1: 1 + 3
    # slot 0 lists class 1's chunk first, slot 1 class 0's first
    order = dirichlet_slots(labels, partition, [np.array([1, 0]), np.array([0, 1])], 2)
    assert order.tolist() == [1, 0, 2, 4, 6, 3, 5, 7]


def test_correlated_is_a_seeded_permutation_within_each_domain():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 2000)
    dom = np.repeat([0, 1], 1000)
    x = np.arange(2000)[:, None]
    a = build_stream("correlated:0.01", x, y, dom, seed=3, num_classes=10)
    b = build_stream("correlated:0.01", x, y, dom, seed=3, num_classes=10)
    c = build_stream("correlated:0.01", x, y, dom, seed=4, num_classes=10)
    assert np.array_equal(a.x, b.x) and not np.array_equal(a.x, c.x)
    for d in (0, 1):  # a permutation of each domain, domains stay in order
        seg = a.x[a.domain == d, 0]
        assert sorted(seg.tolist()) == list(range(1000 * d, 1000 * (d + 1)))
    assert (a.domain == dom).all()
    # label runs: delta 0.01 puts nearly all of a class in one slot (about 10 runs per domain); delta 100 splits
    # every class over all 10 slots, each slot listing its 10 class chunks contiguously (at most 100 per domain)
    runs_low = 1 + int((np.diff(a.y) != 0).sum())
    runs_high = 1 + int((np.diff(build_stream("correlated:100", x, y, dom, seed=3, num_classes=10).y) != 0).sum())
    assert runs_low < 60 and 150 < runs_high <= 200


def test_mixed_interleaves_domains():
    s = build_stream("mixed", X, Y, DOM, seed=1)
    assert sorted(s.x[:, 0].tolist()) == list(range(12))
    assert (s.y == Y[s.x[:, 0]]).all() and (s.domain == DOM[s.x[:, 0]]).all()
    assert (np.diff(s.domain) != 0).sum() > 1  # not two blocks any more


def test_recurring_repeats_the_sequence():
    s = build_stream("recurring:3", X, Y, DOM, limit=2)
    assert s.x[:, 0].tolist() == [0, 1, 6, 7] * 3
    assert s.pass_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and s.passes == 3


def test_gradual_severity_schedule():
    assert gradual_severity(9).tolist() == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    assert gradual_severity(18).tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1]


def test_gradual_companion_and_stride_limit(tmp_path):
    from edgeadapt.datasets.fmnist import _atomic_savez

    n = 18
    x = np.full((2 * n, 1, 2, 2), 250, np.uint8)  # the severity-5 images
    base = tmp_path / "s.npz"
    _atomic_savez(base, x=x, y=np.tile(np.arange(n) % 10, 2), corruption=np.repeat([0, 1], n),
                  corruption_names=np.array(["fog", "snow"]))
    clean = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 1, 2, 2), np.uint8)
    calls = []

    def fake_corrupt(task):  # records what it is asked for; image = clean value + 10 x severity
        name, sev, seed, chunk, imgs = task
        calls.append((name, sev, seed, chunk, len(imgs)))
        return imgs + 10 * sev

    path = build_gradual(base, clean, seed=7, corrupt=fake_corrupt)
    g = load_gradual(path)
    assert g["severity"].tolist() == gradual_severity(n).tolist() * 2
    assert calls[0] == ("fog", 1, 7, 1000, 2) and len(calls) == 16  # 8 non-5 segments per domain
    assert g["x"][0, 0, 0, 0] == 10 and g["x"][3, 0, 0, 0] == 3 + 20 and g["x"][8, 0, 0, 0] == 250
    s = build_stream("gradual", x, np.tile(np.arange(n) % 10, 2), np.repeat([0, 1], n), ["fog", "snow"],
                     gradual=g, limit=9)
    assert s.severity.tolist() == [1, 2, 3, 4, 5, 4, 3, 2, 1] * 2  # every other image: still 1 -> 5 -> 1
    assert build_gradual(base, clean, seed=7, corrupt=fake_corrupt) == path and len(calls) == 16  # cached
