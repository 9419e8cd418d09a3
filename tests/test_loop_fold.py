"""The loop method's amortized in-batch mix (``ema_stats:transductive=true,every=K``, device/engine.py): one batch in
K runs the adaptive graph with its own statistics mixed in; the batches in between run the fast static session with
exactly that batch's mixed statistics folded in, so a device in the loop normalizes as the trainer does at about
the static graph's cost. Counted at the real ORT backend, compared with the real adaptive graph."""

from __future__ import annotations

import numpy as np

from edgeadapt.core.bundle import Bundle
from edgeadapt.device.engine import AdaptiveEngine, EngineConfig
from tests.test_engine import Counting, _domain

LOOP_K = "ema_stats:transductive=true,every=4"


def _run(engine: AdaptiveEngine, x: np.ndarray, batch: int = 64):
    # batches of 64: the input-shift test sees each batch on its own (smaller ones are pooled)
    return [engine.process(x[i : i + batch]) for i in range(0, len(x), batch)]


def test_one_batch_in_k_mixes_and_the_rest_run_static(tiny_bundle):
    engine = AdaptiveEngine(Bundle(tiny_bundle), EngineConfig(method=LOOP_K))
    calls = Counting(engine)
    results = _run(engine, _domain(64 * 12, 1, 90, 30))
    mixed = [i for i, r in enumerate(results) if r.info["transductive"]]
    assert mixed == [0, 4, 8], mixed  # a stationary domain: no shift after the first batch, the schedule alone
    assert calls.static == 9 and engine.transductive_batches == 3
    # the prediction forwards on the adaptive graph are the three mixing batches; the rest is the refold
    assert calls.refolds <= 3


def test_the_fast_session_holds_the_last_mix(tiny_bundle):
    engine = AdaptiveEngine(Bundle(tiny_bundle), EngineConfig(method=LOOP_K))
    x = _domain(64 * 2, 2, 120, 40)
    first = engine.process(x[:64])
    assert first.info["transductive"]
    mix = first.info["stat_mix"]
    # what the mixing batch normalized with: the prior (the method's statistics before its update) moved by w
    # toward the batch's own statistics, in every normalization layer
    fold = engine._fold_stats()
    layers = [n.name for n in engine.manifest.norm_layers]
    assert set(fold) == set(layers) and np.all(mix > 0)
    second = engine.process(x[64:128])
    assert not second.info["transductive"]
    # the served static batch equals the adaptive graph run with the folded statistics and no in-batch mix
    ref = engine.backend.run_adaptive(engine.prepare(x[64:128]),
                                      engine._params_with(engine.base_params, engine.method, fold), None).logits
    served = engine.backend.run_static(engine.prepare(x[64:128])).logits
    np.testing.assert_allclose(served, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())))
    # and differs from folding the method's own (slow EMA) statistics: the fold is the mix, not the EMA
    ema = engine.backend.run_adaptive(engine.prepare(x[64:128]), engine.current_params(), None).logits
    assert float(np.abs(ema - served).max()) > 1e-3


def test_every_1_is_the_transductive_method_and_a_new_version_mixes_at_once(tiny_bundle):
    bundle = Bundle(tiny_bundle)
    every1 = AdaptiveEngine(bundle, EngineConfig(method="ema_stats:transductive=true"))
    assert all(r.info["transductive"] for r in _run(every1, _domain(64 * 6, 3, 90, 30)))
    assert not every1.method.folds_mix

    engine = AdaptiveEngine(bundle, EngineConfig(method=LOOP_K))
    x = _domain(64 * 6, 4, 90, 30)
    assert [r.info["transductive"] for r in _run(engine, x[:128])] == [True, False]
    weights = {k: v * np.float32(1.01) for k, v in engine.base_params.items() if k.endswith(".weight")}
    engine.apply_params(weights, 1)
    # the folded mix was of the old parameters' activations: the next batch mixes again, then the fast path
    assert [r.info["transductive"] for r in _run(engine, x[128:])] == [True, False, False, False]
    engine.reset()
    assert engine.process(x[:64]).info["transductive"]
