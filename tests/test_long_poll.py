"""A device long-polls the cloud for updates and names the parameters it holds (issue 18, item 5): a publish
reaches a device that would otherwise not ask again for an hour, a lossy chain of versions applies without the
cloud remembering what it served, and stopping a daemon does not wait out a held check."""

from __future__ import annotations

import time

import numpy as np

from edgeadapt.core.tensorfile import params_hash

pytest_plugins = ["tests.cloud_fixtures"]


def _until(cond, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_a_publish_reaches_a_long_polling_device_at_once(live_cloud, cloud_env, tmp_path):
    from edgeadapt.device.config import DeviceConfig
    from edgeadapt.device.daemon import DeviceDaemon

    # int8 packages are lossy: the second delta must be built against the reconstruction the device holds
    cloud = live_cloud(update_mode="int8", long_poll_recheck_s=60)
    token = cloud.add_device("cam")
    # polls an hour apart: only a held check can bring a version within seconds
    d = DeviceDaemon(DeviceConfig(bundle=cloud_env.bundle, state_dir=tmp_path / "state", cloud_url=cloud.url,
                                  token=token, update_poll_s=3600, update_long_poll_s=20, watch_batches=1))
    d.start()
    try:
        up = d.updater
        _until(lambda: up._long_polling, 20, "the first check to be held by the cloud")
        p0 = cloud.service.store.get_params(0)
        rng = np.random.default_rng(0)
        for version in (1, 2):
            params = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in p0.items()}
            assert cloud.service.trainer.submit_candidate(params).version == version
            took = _until(lambda v=version: d.engine.param_version == v, 10, f"v{version} applied")
            assert took < 5, took
            # a watch of one batch decides whether the version stays; end it so the next check is not "busy"
            x = rng.integers(0, 256, (4, *cloud.service.codec.shape), dtype=np.uint8)
            d.predict(x)
            _until(lambda: up._watch is None, 10, "the watch to decide")
            _until(lambda: up._long_polling, 10, "the next held check")
        assert up.counters["rejected"] == 0 and up.counters["applied"] == 2, up.counters
        # the device holds v2's lossy reconstruction, not v2's exact parameters, and says so by hash
        assert up.held_hash() == params_hash(d.engine.base_params)
        assert up.held_hash() != cloud.service.store.get_version(2).params_hash
    finally:
        t0 = time.monotonic()
        d.stop()
        stop_s = time.monotonic() - t0
    assert stop_s < 5, f"stopping waited {stop_s:.1f} s for a held check"
