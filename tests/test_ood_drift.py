"""Novelty under drift (issue 21): detectors that follow the current domain, hand-checked on small cases."""

from __future__ import annotations

import numpy as np
import pytest

from edgeadapt.device.ood import fit_all, get_detector, load_all
from edgeadapt.device.ood.domain_stats import DomainFeatureStats, gaussian_moments

# two classes at (0, 0) and (2, 0), spread only along the second axis (test_ood's by-hand case)
Z = np.array([[0.0, 1.0], [0.0, -1.0], [2.0, 1.0], [2.0, -1.0]])
Y = np.array([0, 0, 1, 1])
# the same features in a shifted domain: +10 on the first axis, twice the spread on the second
Z_SHIFTED = Z * [1.0, 2.0] + [10.0, 0.0]


def _fit(name: str):
    return get_detector(name).fit(Z, Z, Y, np.eye(2), np.zeros(2))


def test_static_detectors_ignore_observe():
    det = _fit("mahalanobis")
    before = det.score(None, Z_SHIFTED)
    det.observe(None, Z_SHIFTED, shift=True)
    det.reset_domain()
    np.testing.assert_allclose(det.score(None, Z_SHIFTED), before)
    assert not det.online and get_detector("mahalanobis_domain").online


def test_gaussian_moments_by_hand():
    det = _fit("mahalanobis")
    mean, var = gaussian_moments(det.means, det.present, det.precision)
    # centre of the class means (1, 0); variance = within-class (ridge, 1) + between-class (1, 0)
    np.testing.assert_allclose(mean, [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(var, [1.0, 1.0], atol=1e-5)


def test_domain_stats_trims_outliers_by_hand():
    st = DomainFeatureStats(np.zeros(1), np.ones(1), momentum=0.5, shift_momentum=1.0, trim=0.2)
    batch = np.array([[1.0], [2.0], [3.0], [4.0], [1000.0]])  # keeps ceil(0.8 * 5) = 4: the outlier is dropped
    st.update(batch)  # first batch of a stream: shift momentum 1 -> the batch's trimmed moments
    np.testing.assert_allclose(st.mean, [2.5])
    np.testing.assert_allclose(st.var, [1.25])
    st.update(np.array([[4.5], [4.5], [4.5], [4.5], [4.5]]))  # momentum 0.5
    np.testing.assert_allclose(st.mean, [3.5])
    np.testing.assert_allclose(st.var, [0.625])
    st.reset()
    np.testing.assert_allclose(st.align(np.array([[7.0]])), [[7.0]])


def test_mahalanobis_domain_by_hand():
    plain, det = _fit("mahalanobis"), _fit("mahalanobis_domain")
    # while the domain is the source the score is the plain one (so the exported threshold holds)
    np.testing.assert_allclose(det.score(None, Z), plain.score(None, Z), rtol=1e-9)
    det.domain.shift_momentum = 1.0
    det.observe(None, Z_SHIFTED, shift=True)
    np.testing.assert_allclose(det.domain.mean, [11.0, 0.0])
    np.testing.assert_allclose(det.domain.var, [1.0, 4.0])
    # (10, 2) aligns to (0, 2 * sqrt(1.001 / 4.001)) ~ (0, 1.0): squared distance 1 to class 0, as (0, 1) is
    floor = 1e-6 + 1e-3 * 1.0
    want = 4.0 * (1.0 + floor) / (4.0 + floor)
    np.testing.assert_allclose(det.score(None, Z_SHIFTED[:1]), [want], rtol=1e-4)
    assert plain.score(None, Z_SHIFTED[:1])[0] > 1e6  # the source distance sees the whole domain as novel
    # a sample 20 out along the spread axis of this domain is still 10 source standard deviations out
    np.testing.assert_allclose(det.score(None, np.array([[10.0, 20.0]])), [400.0 * (1 + floor) / (4 + floor)],
                               rtol=1e-4)
    det.reset_domain()
    np.testing.assert_allclose(det.score(None, Z), plain.score(None, Z), rtol=1e-9)


def test_rmds_domain_is_rmds_of_aligned_features():
    rmds, det = _fit("rmds"), _fit("rmds_domain")
    np.testing.assert_allclose(det.score(None, Z), rmds.score(None, Z), rtol=1e-9, atol=1e-9)
    det.domain.shift_momentum = 1.0
    det.observe(None, Z_SHIFTED, shift=True)
    aligned = det.domain.align(Z_SHIFTED)
    np.testing.assert_allclose(det.score(None, Z_SHIFTED), rmds.score(None, aligned), rtol=1e-9)
    # the background Gaussian gives the source moments: mean (1, 0), variance (1, 1) (+ ridge)
    np.testing.assert_allclose(aligned[0], [0.0, 2.0 * np.sqrt((1 + 1e-3) / (4 + 1e-3))], atol=1e-3)


@pytest.mark.parametrize("name,parent", [("mahalanobis_domain", "mahalanobis"), ("rmds_domain", "rmds")])
def test_derived_detectors_load_from_an_older_bundle(name, parent):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 4)) + np.repeat(np.eye(4)[:2] * 4, 100, axis=0)
    y = np.repeat([0, 1], 100)
    w, b = np.eye(4)[:2], np.zeros(2)
    flat = fit_all(z, z @ w.T, y, w, b, names=[parent])  # exported before the derived detector existed
    dets = load_all(flat, w, b)
    assert name in dets and dets[name].threshold == dets[parent].threshold
    np.testing.assert_allclose(dets[name].score(None, z), dets[parent].score(None, z), rtol=1e-6, atol=1e-9)
