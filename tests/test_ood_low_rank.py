"""mahalanobis_domain's Woodbury update (device/ood/mahalanobis_domain.py, "Cost"): a stream of small requests
gets the precision a full eigendecomposition per batch would give, at O(n D^2) per request."""

from __future__ import annotations

import numpy as np

from edgeadapt.device.ood import get_detector
from edgeadapt.device.ood.mahalanobis_domain import _woodbury

D, K = 24, 5


def _source():
    """Features of K classes (seeded), their logits and labels, and the class centres."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, (K, D))
    y = np.repeat(np.arange(K), 80)
    z = centers[y] + rng.normal(0, 1, (len(y), D)) * rng.uniform(0.5, 2.0, D)
    return (z, np.eye(K)[y] * 4, y), centers


def _fitted(low_rank_max: int):
    data, centers = _source()
    det = get_detector("mahalanobis_domain").fit(*data, np.eye(K, D), np.zeros(K))
    det.low_rank_max = low_rank_max
    return det, centers, np.random.default_rng(2)


def test_woodbury_is_the_inverse():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(D, 3 * D))
    a = a @ a.T / (3 * D) + 0.1 * np.eye(D)
    u = rng.normal(size=(3, D))
    np.testing.assert_allclose(_woodbury(np.linalg.inv(a), 0.9, u), np.linalg.inv(0.9 * a + u.T @ u), rtol=1e-9,
                               atol=1e-12)


def test_small_requests_get_the_full_updates_precision():
    """Two detectors see the same shifted stream of 1-3 sample requests: one updates by Woodbury, the other
    recomputes every batch. Covariance, precision and scores agree (the ridge, 1e-6 of the scale, is all that
    differs), and the Woodbury one refreshes in full every reference_batch / 4 samples."""
    fast, centers, rng = _fitted(8)
    full, _, _ = _fitted(0)
    shifted = centers * 1.3 + 2.0
    probes = shifted[rng.integers(0, K, 50)] + rng.normal(0, 1.5, (50, D))
    for i in range(120):
        n = 1 + i % 3
        y = rng.integers(0, K, n)
        z = shifted[y] + rng.normal(0, 1.5, (n, D))
        logits = np.eye(K)[y] * 4
        fast.observe(logits, z, shift=i == 0)
        full.observe(logits, z, shift=i == 0)
        assert fast._low_rank_samples < fast.reference_batch // 4
        assert full._low_rank_samples == 0
    np.testing.assert_allclose(fast.domain_within, full.domain_within, rtol=1e-12)
    np.testing.assert_allclose(fast.domain_precision, full.domain_precision, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(fast.score(None, probes), full.score(None, probes), rtol=1e-4)
    # and the stream did move the domain: the source's scores for these probes are far larger
    assert np.median(get_detector("mahalanobis").fit(*_source()[0], np.eye(K, D), np.zeros(K)).score(None, probes)) > \
        3 * np.median(fast.score(None, probes))



def test_the_low_rank_bounds_grow_with_the_feature_dimension():
    """At the reference model's D = 64 the bounds are the fixed ones; at D = 1,280 (MobileNetV2, EfficientNet-B0) a
    batch of 16 requests no longer costs a full eigendecomposition each (issue 15), and still agrees with one."""
    det, _, _ = _fitted(8)
    assert det.low_rank_limits(64) == (8, 16) and det.low_rank_limits(1280) == (80, 320)
    dim, k = 256, 4
    rng = np.random.default_rng(3)
    centers = rng.normal(0, 3, (k, dim))
    y = np.repeat(np.arange(k), 3 * dim // k)
    z = centers[y] + rng.normal(0, 1, (len(y), dim))
    fast = get_detector("mahalanobis_domain").fit(z, np.eye(k)[y] * 4, y, np.eye(k, dim), np.zeros(k))
    full = get_detector("mahalanobis_domain").fit(z, np.eye(k)[y] * 4, y, np.eye(k, dim), np.zeros(k))
    full.low_rank_max = 0
    for i in range(4):
        yb = rng.integers(0, k, 16)
        zb = centers[yb] * 1.2 + rng.normal(0, 1.3, (16, dim))
        fast.observe(np.eye(k)[yb] * 4, zb, shift=i == 0)
        full.observe(np.eye(k)[yb] * 4, zb, shift=i == 0)
    assert fast._low_rank_samples > 0  # the last batches went through Woodbury
    probes = centers[rng.integers(0, k, 20)] * 1.2 + rng.normal(0, 1.3, (20, dim))
    np.testing.assert_allclose(fast.score(None, probes), full.score(None, probes), rtol=1e-3)
