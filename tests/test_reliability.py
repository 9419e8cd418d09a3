"""One reliability policy (core/reliability.py): its masks on a hand-checked case, and the engine, the selector and
the trainer's loss all following the policy object they are given (change it: all three change)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from edgeadapt.core.reliability import DEFAULT_RELIABILITY, ReliabilityPolicy

C = 10
LN_C = math.log(C)  # 2.302585


def test_masks_on_a_hand_checked_case():
    p = DEFAULT_RELIABILITY
    assert (p.adapt_bound(C), p.upload_bound(C), p.low_info_bound(C)) == pytest.approx(
        (1.842068, 0.921034, 0.046052), abs=1e-6)
    ent = np.array([0.01, 0.5, 1.0, 1.9, 0.3])
    ood = np.array([False, False, False, False, True])  # 1 of 5 flagged: novelty, the flag excludes
    assert p.adapt_mask(ent, ood, C).tolist() == [True, True, True, False, False]  # 1.9 > 1.842
    assert p.upload_mask(ent, ood, p.upload_bound(C)).tolist() == [True, True, False, False, False]
    shift = np.array([False, True, True, True, False])  # 3 of 5 > max_ood_fraction 0.5: a domain shift
    assert p.is_domain_shift(shift) and not p.is_domain_shift(ood)
    assert p.adapt_mask(ent, shift, C).tolist() == [True, True, True, False, True]  # flags do not exclude
    assert p.upload_mask(ent, shift, p.upload_bound(C)).tolist() == [True, False, False, False, True]  # they do
    # E_max(t) after the warm-up: lam * E_max * E_now / E_warm
    assert p.upload_bound_now(C, None, None) == pytest.approx(0.921034, abs=1e-6)
    assert p.upload_bound_now(C, 0.5, 0.75) == pytest.approx(0.921034 * 1.5, abs=1e-6)
    assert ReliabilityPolicy(lam=0.5).upload_bound_now(C, 0.5, 0.75) == pytest.approx(0.921034 * 0.75, abs=1e-6)
    with pytest.raises(ValueError, match="disagree"):
        p.adapt_mask(ent, ood[:3], C)


def test_bad_policies_are_refused():
    for bad, word in [({"adapt_factor": 0}, "adapt_factor"), ({"upload_factor": float("nan")}, "upload_factor"),
                      ({"low_info_factor": 0.5}, "low_info_factor"), ({"max_ood_fraction": 1.5}, "max_ood_fraction"),
                      ({"warmup": 0}, "warmup"), ({"e_max_factor": 0.4}, "e_max_factor")]:
        with pytest.raises(ValidationError, match=word):
            ReliabilityPolicy(**bad)
    with pytest.raises(ValidationError):  # frozen: a consumer cannot change what the others rely on
        DEFAULT_RELIABILITY.adapt_factor = 0.1
    with pytest.raises(ValueError, match="2 classes"):
        DEFAULT_RELIABILITY.adapt_bound(1)


def _images(n: int, seed: int) -> np.ndarray:
    """Images like the tiny bundle's calibration set (uniform noise): in distribution, few flagged OOD."""
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 32, 32), dtype=np.uint8)


def test_engine_selector_and_trainer_follow_one_policy(tiny_bundle):
    import torch

    from edgeadapt.cloud.trainer import cema_loss
    from edgeadapt.core.bundle import Bundle
    from edgeadapt.device.engine import AdaptiveEngine, EngineConfig
    from edgeadapt.device.selection import SampleSelector

    bundle = Bundle(tiny_bundle)
    x = _images(64, 1)
    # the source model's entropies on this batch (method none: the same input, the same answer every time)
    probe = AdaptiveEngine(bundle, EngineConfig(method="none")).process(x)
    nc = bundle.manifest.num_classes
    # strict: the engine may adapt on the lower half of the batch's entropies, the selector uploads the lower quarter
    q50, q25 = (float(np.quantile(probe.entropy, q)) / math.log(nc) for q in (0.5, 0.25))
    strict = ReliabilityPolicy(adapt_factor=q50, upload_factor=q25, low_info_factor=0.0)
    loose = ReliabilityPolicy(adapt_factor=1.01, upload_factor=1.01, low_info_factor=0.0)

    outcomes = {}
    for name, policy in (("strict", strict), ("loose", loose)):
        res = AdaptiveEngine(bundle, EngineConfig(method="none", reliability=policy)).process(x)
        np.testing.assert_allclose(res.entropy, probe.entropy, rtol=1e-6)
        assert res.reliable.tolist() == policy.adapt_mask(res.entropy, res.ood, nc).tolist()
        sel = SampleSelector(nc, policy, redundancy="off", novel_budget_samples_per_s=None).select(
            res.probs, res.entropy, res.ood)
        assert sel.e_max == pytest.approx(policy.upload_bound(nc))
        assert sel.reliable.tolist() == policy.upload_mask(res.entropy, res.ood, sel.e_max).tolist()
        outcomes[name] = (int(res.reliable.sum()), len(sel.adapt))
    n_ok = int((~probe.ood).sum())
    assert n_ok >= 48 and not DEFAULT_RELIABILITY.is_domain_shift(probe.ood)  # the flags exclude, in both roles
    # the loose policy trusts every sample that is not OOD, the strict one about half (adapt) and a quarter (upload)
    assert outcomes["loose"] == (n_ok, n_ok)
    assert 0 < outcomes["strict"][1] < outcomes["strict"][0] < n_ok, outcomes

    # the trainer's loss: every term is weighted by exp(E_max - H), E_max the policy's upload bound, so moving
    # the bound by d nats scales each sample's loss by exp(d)
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(16, nc, generator=g), torch.randn(16, nc, generator=g)
    base = cema_loss(z_s, z_t, reduction="none")
    assert torch.allclose(base, cema_loss(z_s, z_t, reduction="none", reliability=DEFAULT_RELIABILITY))
    for policy in (strict, loose):
        d = policy.upload_bound(nc) - DEFAULT_RELIABILITY.upload_bound(nc)
        moved = cema_loss(z_s, z_t, reduction="none", reliability=policy)
        assert torch.allclose(moved, base * math.exp(d), rtol=1e-5), policy


def test_the_device_config_is_the_one_path_to_engine_and_selector(tiny_bundle, tmp_path):
    from edgeadapt.device.config import ConfigError, DeviceConfig, load_config
    from edgeadapt.device.daemon import DeviceDaemon

    base = {"bundle": tmp_path, "state_dir": tmp_path}
    with pytest.raises(ConfigError, match="reliability"):
        load_config({**base, "reliability": {"upload_factor": -1}}, env={})
    with pytest.raises(ConfigError, match="reliability.adapt_factor"):  # the old second path is gone, and says so
        load_config({**base, "engine": {"reliable_entropy_factor": 0.4}}, env={})
    assert load_config(base, env={}).reliability is DEFAULT_RELIABILITY
    d = DeviceDaemon(DeviceConfig(bundle=tiny_bundle, state_dir=tmp_path / "s", listen="127.0.0.1:0",
                                  reliability={"adapt_factor": 0.6, "upload_factor": 0.3, "warmup": 64}))
    try:
        policy = d.engine.config.reliability
        assert (policy.adapt_factor, policy.upload_factor, policy.warmup) == (0.6, 0.3, 64)
        assert d.selector.policy is policy
        assert d.selector.e_max == pytest.approx(0.3 * math.log(d.manifest.num_classes))
        assert d.selector.warmup == 64
    finally:
        d.stop()
