"""`bench ood` (issue 21): the covariate-shift split's keys, on a tiny bundle and tiny sizes (no training)."""

from __future__ import annotations

import numpy as np

from edgeadapt.bench.ood import covariate_stream, run_ood_bench
from edgeadapt.device.ood import DEFAULT_DETECTOR


def test_covariate_stream_mixes_novelty_in_at_the_given_rates():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (200, 1, 32, 32), dtype=np.uint8)
    y = np.arange(200) % 10
    s = covariate_stream(x, y, ["brightness", "contrast"], per_domain=40, near_rate=0.1, far_rate=0.05, seed=0)
    assert s["x"].shape == (2 * (40 + 4 + 2), 1, 32, 32)
    for d in (0, 1):
        kinds = s["kind"][s["domain"] == d]
        assert np.bincount(kinds, minlength=3).tolist() == [40, 4, 2]
    assert (s["domain"][:-1] <= s["domain"][1:]).all()  # domains one after another


def test_bench_ood_json_has_the_covariate_keys(tiny_bundle, tmp_path):
    res = run_ood_bench(tmp_path, per_set=32, corruptions=["brightness", "contrast"], per_domain=48,
                        near_rate=0.1, far_rate=0.1, bundle_dir=tiny_bundle)
    assert res["default"] == DEFAULT_DETECTOR and DEFAULT_DETECTOR in res["detectors"]
    assert res["covariate"]["n"] == {"in": 96, "near": 10, "far": 10}
    for name in ("msp", "mahalanobis", "mahalanobis_domain", "mahalanobis_aligned", "rmds_aligned"):
        row = res["detectors"][name]
        cov = row["covariate"]
        assert 0.0 <= cov["flag_rate"] <= 1.0
        assert set(cov["flag_rate_by_domain"]) == {"brightness", "contrast"}
        for kind in ("near", "far"):
            assert 0.0 <= row[kind]["auroc"] <= 1.0 and 0.0 <= cov[kind]["auroc"] <= 1.0
