"""OOD detectors: hand-checked scores, separation on Gaussian blobs, metrics, thresholds, storage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeadapt.core.tensorfile import params_from_bytes, params_to_bytes
from edgeadapt.device.ood import (
    all_detectors,
    auroc,
    fit_all,
    fpr_at_tpr,
    get_detector,
    load_all,
    quantile_threshold,
)
from edgeadapt.device.ood.vim import default_principal_dim

TOY = np.array([[2.0, 0.0], [0.0, 0.0]])


def _fit(name, feats=None, logits=TOY, labels=None, w=None, b=None):
    feats = np.zeros((len(logits), 2)) if feats is None else feats
    labels = np.zeros(len(logits), dtype=np.int64) if labels is None else labels
    w = np.eye(2) if w is None else w
    b = np.zeros(2) if b is None else b
    return get_detector(name).fit(feats, logits, labels, w, b)


def test_registry_has_all_detectors():
    names = set(all_detectors())
    assert {"msp", "maxlogit", "energy", "gen", "mahalanobis", "rmds", "vim"} <= names
    with pytest.raises(KeyError, match="unknown OOD detector"):
        get_detector("odin")
    assert not get_detector("msp").uses_features and get_detector("vim").uses_features


def test_logit_detectors_by_hand():
    p = 1.0 / (1.0 + math.exp(-2.0))  # softmax([2, 0])[0]
    np.testing.assert_allclose(_fit("msp").score(TOY), [-p, -0.5])
    np.testing.assert_allclose(_fit("maxlogit").score(TOY), [-2.0, 0.0])
    np.testing.assert_allclose(_fit("energy").score(TOY), [-math.log(math.exp(2) + 1), -math.log(2)])
    g = 0.1
    gen_conf = 2 * (p**g * (1 - p) ** g)  # both classes are in the top-M (M = min(10, 2))
    gen_unif = 2 * (0.5**g * 0.5**g)
    np.testing.assert_allclose(_fit("gen").score(TOY), [gen_conf, gen_unif])
    for name in ("msp", "maxlogit", "energy", "gen"):
        s = _fit(name).score(TOY)
        assert s[1] > s[0], f"{name}: the uncertain sample must score as more OOD"


def test_gen_uses_top_m_only():
    logits = np.log(np.array([[0.5, 0.3] + [0.2 / 18] * 18]))  # 20 classes -> M = 10
    probs = np.exp(logits[0])
    top = np.sort(probs)[-10:]
    want = (top**0.1 * (1 - top) ** 0.1).sum()
    np.testing.assert_allclose(_fit("gen", logits=logits).score(logits), [want])


def _blobs(rng, n_per=200, d=8, c=3):
    """Class blobs that vary in the first d/2 dims only (tiny noise in the rest), a linear head."""
    mus = np.zeros((c, d))
    mus[:, :c] = 6.0 * np.eye(c)
    scale = np.r_[np.ones(d // 2), 0.05 * np.ones(d - d // 2)]
    y = np.repeat(np.arange(c), n_per)
    z = mus[y] + rng.normal(size=(len(y), d)) * scale
    w = mus.copy()
    b = -0.5 * (mus**2).sum(1)
    return z.astype(np.float32), y, w.astype(np.float32), b.astype(np.float32)


@pytest.mark.parametrize("name", ["mahalanobis", "rmds", "vim"])
def test_feature_detectors_separate_far_points(name):
    rng = np.random.default_rng(0)
    z, y, w, b = _blobs(rng)
    logits = z @ w.T + b
    det = get_detector(name).fit(z, logits, y, w, b)
    zt, _, _, _ = _blobs(np.random.default_rng(1), n_per=50)
    s_in = det.score(zt @ w.T + b, zt)
    # OOD: in-distribution-looking first half, large values where the data never varies
    zo = zt.copy()
    zo[:, 4:] += rng.normal(size=(len(zo), 4)) * 3.0 + 3.0
    s_out = det.score(zo @ w.T + b, zo)
    assert s_in.shape == (150,) and s_in.dtype == np.float64
    assert auroc(s_in, s_out) > 0.99
    far = np.full((1, 8), 50.0, dtype=np.float32)
    assert det.score(far @ w.T + b, far)[0] > s_in.max()
    with pytest.raises(ValueError):
        det.score(logits[:2], None)


def test_mahalanobis_by_hand():
    # two classes at +-1 on one axis, identity-like spread: distances follow the formula
    z = np.array([[0.0, 1.0], [0.0, -1.0], [2.0, 1.0], [2.0, -1.0]])
    y = np.array([0, 0, 1, 1])
    det = get_detector("mahalanobis").fit(z, z, y, np.eye(2), np.zeros(2))
    # class means (0,0), (2,0); shared cov diag(0, 1) + ridge -> only the 2nd axis is measured
    np.testing.assert_allclose(det.means, [[0, 0], [2, 0]])
    s = det.score(None, np.array([[0.0, 2.0]]))
    np.testing.assert_allclose(s, [4.0], rtol=1e-4)


def test_rmds_is_class_minus_background():
    rng = np.random.default_rng(3)
    z, y, w, b = _blobs(rng)
    rmds = get_detector("rmds").fit(z, None, y, w, b)
    mds = get_detector("mahalanobis").fit(z, None, y, w, b)
    x = z[:5].astype(np.float64)
    c = x - rmds.bg_mean
    bg = np.einsum("nd,de,ne->n", c, rmds.bg_precision, c)
    np.testing.assert_allclose(rmds.score(None, x), mds.score(None, x) - bg, rtol=1e-6, atol=1e-6)


def test_vim_principal_dim_rule_and_origin():
    assert default_principal_dim(64) == 32
    assert default_principal_dim(512) == 256
    assert default_principal_dim(768) == 512
    assert default_principal_dim(2048) == 1000
    assert default_principal_dim(2) == 1
    rng = np.random.default_rng(0)
    z, y, w, b = _blobs(rng)
    det = get_detector("vim").fit(z, z @ w.T + b, y, w, b)
    np.testing.assert_allclose(w @ det.origin + b, 0.0, atol=1e-4)  # logits vanish at the origin
    assert det.residual_basis.shape == (8, 4)
    assert det.alpha > 0


def test_metrics_by_hand():
    assert auroc([0, 1], [2, 3]) == 1.0
    assert auroc([2, 3], [0, 1]) == 0.0
    assert auroc([1], [1]) == 0.5
    assert auroc([0, 2], [1, 3]) == 0.75
    assert auroc([0, 1, 1], [1]) == pytest.approx((1 + 0.5 + 0.5) / 3)
    s_in, s_out = [0, 1, 2, 3], [1.5, 2.5, 3.5, 4.5]
    assert fpr_at_tpr(s_in, s_out, 0.5) == 0.0
    assert fpr_at_tpr(s_in, s_out, 0.75) == 0.25
    assert fpr_at_tpr(s_in, s_out, 1.0) == 0.5
    assert fpr_at_tpr(s_in, s_out, 0.95) == 0.5
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=3000), rng.normal(size=2000) + 1.0
    # AUROC of N(0,1) vs N(1,1) is Phi(1/sqrt 2) ~ 0.760
    assert auroc(a, b) == pytest.approx(0.760, abs=0.02)


def test_threshold_passes_95_percent():
    rng = np.random.default_rng(0)
    s = rng.normal(size=1000)
    t = quantile_threshold(s, 0.95)
    assert 0.95 <= (s <= t).mean() < 0.952
    det = _fit("energy")
    det.calibrate_threshold(s)
    assert det.threshold == t
    assert quantile_threshold([1.0, 2.0], 0.95) == 2.0


def test_fit_all_load_all_round_trip():
    rng = np.random.default_rng(0)
    z, y, w, b = _blobs(rng, n_per=300)
    logits = (z @ w.T + b).astype(np.float32)
    flat = fit_all(z, logits, y, w, b)
    names = {k.split(".")[1] for k in flat}
    assert names == set(all_detectors())
    for name in names:
        assert flat[f"ood.{name}.threshold"].shape == (1,) and flat[f"ood.{name}.threshold"].dtype == np.float32
    restored = params_from_bytes(params_to_bytes({**flat, "source.mean": np.zeros(3, np.float32)}))
    dets = load_all(restored, w, b)
    assert set(dets) == names
    zt, yt, _, _ = _blobs(np.random.default_rng(7), n_per=300)
    lt = zt @ w.T + b
    for name, det in dets.items():
        fresh = get_detector(name).from_state(
            {k.split(".", 2)[2]: v for k, v in flat.items() if k.startswith(f"ood.{name}.")}, w, b
        )
        np.testing.assert_allclose(det.score(lt, zt), fresh.score(lt, zt))
        assert det.threshold == pytest.approx(float(flat[f"ood.{name}.threshold"][0]))
        # held-out thresholds: about 95% of new in-distribution data passes
        passed = (~det.is_ood(lt, zt)).mean()
        assert 0.88 <= passed <= 1.0, (name, passed)
    only = fit_all(z, logits, y, w, b, names=["msp", "vim"])
    assert {k.split(".")[1] for k in only} == {"msp", "vim"}
