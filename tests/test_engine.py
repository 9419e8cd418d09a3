"""The adaptive engine on a real exported bundle (ONNX Runtime): when it runs the adaptive graph, when it detects
a domain shift, when it refolds statistics into the fast path — counted at the backend, not inferred."""

from __future__ import annotations

import numpy as np
import pytest

from edgeadapt.core.bundle import Bundle
from edgeadapt.core.reliability import ReliabilityPolicy
from edgeadapt.device.engine import AdaptiveEngine, EngineConfig

TRUST_ALL = ReliabilityPolicy(adapt_factor=1.01)  # above ln C: every sample that is not OOD may adapt


def _domain(n: int, seed: int, level: float, contrast: float) -> np.ndarray:
    """uint8 images whose brightness/contrast define a 'domain'; batches of one domain differ only by noise."""
    rng = np.random.default_rng(seed)
    img = level + contrast * rng.standard_normal((n, 1, 32, 32))
    return np.clip(img, 0, 255).astype(np.uint8)


class Counting:
    """Counts the backend calls the engine makes (wraps the real ORT backend)."""

    def __init__(self, engine: AdaptiveEngine):
        self.static = self.adaptive = self.adaptive_images = self.refolds = 0
        be = engine.backend
        run_static, run_adaptive, set_params = be.run_static, be.run_adaptive, be.set_params

        def _static(x):
            self.static += 1
            return run_static(x)

        def _adaptive(x, params, mix):
            self.adaptive += 1
            self.adaptive_images += len(x)
            return run_adaptive(x, params, mix)

        def _set(params):
            self.refolds += 1
            return set_params(params)

        be.run_static, be.run_adaptive, be.set_params = _static, _adaptive, _set


@pytest.fixture()
def engine(tiny_bundle):
    return AdaptiveEngine(Bundle(tiny_bundle), EngineConfig(method="ema_stats", hybrid_batches=1))


def test_shift_runs_the_batch_once_on_the_adaptive_graph(engine):
    calls = Counting(engine)
    a = _domain(64 * 12, 1, 60, 20)
    b = _domain(64 * 12, 2, 170, 45)
    results = [engine.process(a[i : i + 64]) for i in range(0, len(a), 64)]
    # the stream's first batch is a new domain: predicted with its own statistics, and only once
    assert results[0].info["shift"] and results[0].info["transductive"]
    assert calls.static == 0 or calls.static == len(results) - 1
    assert [r.info["shift"] for r in results[1:]] == [False] * 11, "no shift inside a stationary domain"
    before = (calls.static, calls.adaptive)
    r = engine.process(b[:64])
    assert r.info["shift"] and r.info["transductive"]
    assert calls.static == before[0], "a shift seen in the input is not run twice"
    assert calls.adaptive == before[1] + 1
    later = [engine.process(b[i : i + 64]) for i in range(64, len(b), 64)]
    assert not any(x.info["shift"] for x in later), "the engine's own refolds are not taken for domain shifts"
    assert not any(x.info["transductive"] for x in later), "hybrid_batches=1: back on the fast path at once"
    assert engine.shifts == 2


def test_statistics_follow_the_domain_and_reach_the_fast_path(engine):
    calls = Counting(engine)
    layer = engine.manifest.norm_layers[0].name
    source_mean = engine.base_params[f"{layer}.running_mean"].copy()
    b = _domain(64 * 20, 3, 200, 30)
    for i in range(0, len(b), 64):
        engine.process(b[i : i + 64])
    adapted = engine.method.forward_stats()[layer][0]
    batch_mean = engine.backend.run_adaptive(engine.prepare(b[:64]), engine.base_params, None).batch_stats[layer][0]
    # the adapted mean sits much nearer this domain's batch mean than the source statistics do
    assert np.abs(adapted - batch_mean).mean() < 0.5 * np.abs(source_mean - batch_mean).mean()
    assert calls.refolds >= 1, "adapted statistics are folded into the static session"
    folded = engine.current_params()[f"{layer}.running_mean"]
    assert np.allclose(folded, adapted)


def test_refold_tolerance_skips_needless_session_rebuilds(tiny_bundle):
    a = _domain(64 * 40, 4, 90, 25)  # an untrained model is unsure of everything: count every sample reliable

    def refolds(tol: float) -> int:
        eng = AdaptiveEngine(Bundle(tiny_bundle), EngineConfig(method="ema_stats", refresh_tol=tol, stats_every=2,
                                                               refresh_every=2, reliability=TRUST_ALL))
        calls = Counting(eng)
        for i in range(0, len(a), 64):
            eng.process(a[i : i + 64])
        return calls.refolds

    eager, lazy, never = refolds(0.0), refolds(0.3), refolds(1e9)
    assert never == 0
    assert eager > lazy >= 1, (eager, lazy)


def test_adapt_false_changes_nothing(engine):
    a = _domain(64 * 3, 5, 120, 30)
    calls = Counting(engine)
    version = engine.method.stats_version
    for i in range(0, len(a), 64):
        r = engine.process(a[i : i + 64], adapt=False)
        assert not r.info["shift"] and not r.info["transductive"]
    assert engine.method.stats_version == version and calls.adaptive == 0 and calls.refolds == 0
