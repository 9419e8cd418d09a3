"""The default device method on a label-sorted stream of a trained bundle: it must not collapse (issue 17)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeadapt.core.bundle import Bundle
from edgeadapt.device.config import DEFAULT_METHOD
from edgeadapt.device.engine import AdaptiveEngine, EngineConfig

pytest_plugins = ["tests.cloud_fixtures"]


def _online(bundle, spec: str, x: np.ndarray, y: np.ndarray, batch: int = 64) -> tuple[float, np.ndarray]:
    eng = AdaptiveEngine(Bundle(bundle), EngineConfig(method=spec))
    pred = np.concatenate([eng.process(x[i : i + batch]).pred for i in range(0, len(x), batch)])
    return float((pred == y).mean()), pred


@pytest.mark.parametrize("spec", [DEFAULT_METHOD])
def test_default_does_not_collapse_on_a_class_sorted_stream(cloud_env, kit, spec):
    """Shifted bars sorted by label (every batch of 64 one or two classes): the source model scores ~47-57% (the
    fixture's training depends on the process's thread settings) and batch statistics collapse to ~20-23%
    (norm_stats, the previous defaults); the default must not fall below the first and must stay far above the
    second."""
    x, y = kit.synthetic_task(1280, seed=11, shift=kit.TEST_SHIFT)
    order = np.argsort(y, kind="stable")
    xs, ys = x[order], y[order]
    source, _ = _online(cloud_env.bundle, "none", xs, ys)
    collapsed, _ = _online(cloud_env.bundle, "norm_stats", xs, ys)
    acc, pred = _online(cloud_env.bundle, spec, xs, ys)
    # not below the unadapted model (it usually gains: 54.9% vs 46.9% with this fixture; a fixture trained under
    # other thread settings gave 57.9% vs 56.7%), and far above batch statistics, which collapse
    assert acc >= source - 0.02, (acc, source)
    assert acc > collapsed + 0.2, (acc, collapsed)
    assert len(np.unique(pred)) >= 8  # predictions still spread over the classes the stream holds
