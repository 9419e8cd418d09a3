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
    assert not det.online and get_detector("mahalanobis_aligned").online


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


def test_mahalanobis_aligned_by_hand():
    plain, det = _fit("mahalanobis"), _fit("mahalanobis_aligned")
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


def test_rmds_aligned_is_rmds_of_aligned_features():
    rmds, det = _fit("rmds"), _fit("rmds_aligned")
    np.testing.assert_allclose(det.score(None, Z), rmds.score(None, Z), rtol=1e-9, atol=1e-9)
    det.domain.shift_momentum = 1.0
    det.observe(None, Z_SHIFTED, shift=True)
    aligned = det.domain.align(Z_SHIFTED)
    np.testing.assert_allclose(det.score(None, Z_SHIFTED), rmds.score(None, aligned), rtol=1e-9)
    # the background Gaussian gives the source moments: mean (1, 0), variance (1, 1) (+ ridge)
    np.testing.assert_allclose(aligned[0], [0.0, 2.0 * np.sqrt((1 + 1e-3) / (4 + 1e-3))], atol=1e-3)


@pytest.mark.parametrize("name,parent", [("mahalanobis_domain", "mahalanobis"), ("mahalanobis_aligned", "mahalanobis"),
                                         ("rmds_aligned", "rmds")])
def test_derived_detectors_load_from_an_older_bundle(name, parent):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 4)) + np.repeat(np.eye(4)[:2] * 4, 100, axis=0)
    y = np.repeat([0, 1], 100)
    w, b = np.eye(4)[:2], np.zeros(2)
    flat = fit_all(z, z @ w.T, y, w, b, names=[parent])  # exported before the derived detector existed
    dets = load_all(flat, w, b)
    assert name in dets and dets[name].threshold == dets[parent].threshold
    np.testing.assert_allclose(dets[name].score(None, z), dets[parent].score(None, z), rtol=1e-6, atol=1e-9)


# class 0 at (0, 0) and class 1 at (4, 0), unit spread in both axes
CORNERS = np.array([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
Z2 = np.vstack([CORNERS, CORNERS + [4.0, 0.0]])
Y2 = np.repeat([0, 1], 4)
LOGITS2 = np.eye(2)[Y2] * 5.0
# the shifted domain: twice the spread, the classes at (10, 0) and (18, 0)
Z2_SHIFTED = Z2 * 2.0 + [10.0, 0.0]


def test_mahalanobis_domain_by_hand():
    plain = get_detector("mahalanobis").fit(Z2, LOGITS2, Y2, np.eye(2), np.zeros(2))
    det = get_detector("mahalanobis_domain").fit(Z2, LOGITS2, Y2, np.eye(2), np.zeros(2))
    det.momentum, det.shift_momentum, det.trim, det.reference_batch = 0.5, 1.0, 0.2, 8
    np.testing.assert_allclose(det.score(None, Z2), plain.score(None, Z2), rtol=1e-9)  # the source: same score
    np.testing.assert_allclose(det.domain_within, np.eye(2), rtol=1e-5)
    # first batch of a domain (weight 1) plus a far sample: the farthest 20% (squared source distances 260, 260 of
    # the class-1 corners and 10036 of the far sample; the 0.8 quantile is 260) leave only the far one out
    batch = np.vstack([Z2_SHIFTED, [[10.0, 100.0]]])
    det.observe(np.vstack([LOGITS2, [[5.0, 0.0]]]), batch, shift=True)
    np.testing.assert_allclose(det.domain_means, [[10.0, 0.0], [18.0, 0.0]])
    np.testing.assert_allclose(det.domain_within, 4.0 * np.eye(2), atol=1e-12)
    # distances in the domain's spread of 2: (10, 2) -> 1, (10, 6) -> 9, (14, 0) -> 4; the far sample stays far
    np.testing.assert_allclose(det.score(None, np.array([[10.0, 2.0], [10.0, 6.0], [14.0, 0.0]])), [1.0, 9.0, 4.0],
                               rtol=1e-5)
    assert det.score(None, batch[-1:])[0] > 2000
    assert plain.score(None, Z2_SHIFTED).min() > 15  # for the source detector the whole domain is far
    # a later batch (no trim: its distances tie at the quantile) moves the domain by the momentum 0.5: means
    # (11, 0), (19, 0); residuals against the updated means (1 +- 2, +-2): covariance diag(5, 4)
    # -> within = 0.5 diag(4, 4) + 0.5 diag(5, 4)
    det.trim = 0.0
    det.observe(LOGITS2, Z2_SHIFTED + [2.0, 0.0])
    np.testing.assert_allclose(det.domain_means, [[11.0, 0.0], [19.0, 0.0]])
    np.testing.assert_allclose(det.domain_within, np.diag([4.5, 4.0]), atol=1e-12)
    np.testing.assert_allclose(det.score(None, np.array([[11.0, 2.0], [15.0, 0.0]])), [1.0, 16.0 / 4.5], rtol=1e-5)
    # weights compound with the samples behind them: 4 samples of class 0 are a whole class share of a reference
    # batch of 8 (weight 0.75: its mean (13, 0) moves it from (11, 0) to 12.5), half a batch for the covariance
    # (1 - 0.25 ** 0.5 = 0.5: residuals (+-2 + 0.5, +-2) -> diag(4.25, 4); within = 0.5 diag(4.5, 4) + 0.5 that)
    det.momentum = 0.75
    det.observe(LOGITS2[:4], Z2_SHIFTED[:4] + [3.0, 0.0])
    np.testing.assert_allclose(det.domain_means, [[12.5, 0.0], [19.0, 0.0]])
    np.testing.assert_allclose(det.domain_within, np.diag([4.375, 4.0]), atol=1e-12)
    det.reset_domain()
    np.testing.assert_allclose(det.score(None, Z2), plain.score(None, Z2), rtol=1e-9)


def test_mahalanobis_domain_pseudo_labels_only_fitted_classes():
    # class 2 of the head was never calibrated (absent): a sample the logits give to it joins the nearest class
    z = np.array([[0.0, 1.0], [0.0, -1.0], [2.0, 1.0], [2.0, -1.0]])
    det = get_detector("mahalanobis_domain").fit(z, None, np.array([0, 0, 1, 1]), np.eye(3, 2), np.zeros(3))
    logits = np.array([[0.0, 0.0, 5.0], [0.0, 0.0, 5.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])
    d = np.array([[1.0, 5.0], [1.0, 5.0], [5.0, 1.0], [5.0, 1.0]])
    np.testing.assert_array_equal(det._pseudo_labels(logits, d), [0, 0, 1, 1])  # argmax over classes 0, 1


def _blob_stream(rng, n: int, shift: bool):
    """Three well-separated classes in 6 dimensions; the shifted domain is an affine change of the same classes."""
    mus = 8.0 * np.eye(3, 6)
    y = rng.integers(0, 3, n)
    z = mus[y] + rng.normal(size=(n, 6))
    if shift:
        z = z * np.array([0.5, 2.0, 1.5, 1.0, 3.0, 0.7]) + np.array([6.0, -4.0, 3.0, 5.0, 0.0, 2.0])
    return z, np.eye(3)[y] * 5.0


def test_covariate_flag_rate_stays_low_while_novel_samples_are_flagged():
    rng = np.random.default_rng(0)
    z, lg = _blob_stream(rng, 600, shift=False)
    y = lg.argmax(1)
    flat = fit_all(z, lg, y, np.eye(3, 6), np.zeros(3), names=["mahalanobis"])
    dets = load_all(flat, np.eye(3, 6), np.zeros(3))
    plain, det = dets["mahalanobis"], dets["mahalanobis_domain"]
    flags, novel_flags, plain_flags = [], [], []
    for b in range(20):  # the shifted domain, 5% novel samples far from every class mixed into each batch
        zb, lb = _blob_stream(rng, 64, shift=True)
        zb[:3] = rng.normal(size=(3, 6)) * 3.0 + 30.0
        lb[:3] = rng.normal(size=(3, 3))
        det.observe(lb, zb, shift=b == 0)
        s = det.score(lb, zb)
        if b >= 2:  # after adaptation
            flags.append(s[3:] > det.threshold)
            novel_flags.append(s[:3] > det.threshold)
            plain_flags.append(plain.score(lb, zb)[3:] > plain.threshold)
    assert np.mean(plain_flags) > 0.9  # fitted on the source, the whole shifted domain looks novel
    assert np.mean(flags) <= 0.10
    assert np.mean(novel_flags) == 1.0


def _low_contrast(rng, n: int) -> np.ndarray:
    """The tiny bundle's in-distribution (uniform noise frames) at a third of the contrast, brighter."""
    return (rng.integers(0, 256, (n, 1, 32, 32)) // 3 + 150).astype(np.uint8)


def _far_frames() -> np.ndarray:
    ij = np.indices((32, 32))
    frames = [np.zeros((32, 32)), ij.sum(0) % 2 * 255, ij[1] // 4 % 2 * 255, (ij[1] >= 16) * 255]
    return np.stack(frames)[:, None].astype(np.uint8)


def test_engine_flags_novel_frames_not_the_shifted_domain(tiny_bundle):
    from edgeadapt.core.bundle import Bundle
    from edgeadapt.device.engine import AdaptiveEngine, EngineConfig

    bundle = Bundle(tiny_bundle)
    rates: dict[str, list[float]] = {}
    engines = {}
    for name in ("mahalanobis_domain", "mahalanobis"):
        engine = engines[name] = AdaptiveEngine(bundle, EngineConfig(ood_detector=name))
        rng = np.random.default_rng(1)
        rates[name] = [float(engine.process(_low_contrast(rng, 64)).ood.mean()) for _ in range(12)]
    assert min(rates["mahalanobis"]) > 0.9  # the source detector flags the whole shifted domain
    assert np.mean(rates["mahalanobis_domain"][4:]) <= 0.10  # after adaptation the domain is in-distribution
    engine = engines["mahalanobis_domain"]
    det = engine.detector
    assert det.domain_batches == 12
    x = _low_contrast(np.random.default_rng(2), 64)
    x[:4] = _far_frames()  # blank, checkerboard, stripes, half-and-half mixed into the domain
    res = engine.process(x)
    assert res.ood[:4].all() and res.ood[4:].mean() <= 0.10
    engine.process(x, adapt=False)  # not adapting: the domain is not followed either
    assert det.domain_batches == 13
    engine.reset()
    assert det.domain_batches == 0
    np.testing.assert_array_equal(det.domain_means, det.means)
