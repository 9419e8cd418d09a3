"""Fixtures for the cloud tests: a tiny bundle signed for a test cloud home, a teacher, a live server.

A test module uses them with ``pytest_plugins = ["tests.cloud_fixtures"]`` and reaches the helpers through the
``kit`` fixture (this module), so it never imports this module itself before pytest registers it as a plugin.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

SHAPE = (1, 32, 32)
NUM_CLASSES = 10
TRAIN_STEPS = 60
TEST_SHIFT = 0.4


def synthetic_task(n: int, seed: int = 0, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A 10-class toy task: a bar at one of 10 orientations (random position, width, length, intensity).

    ``shift`` is a crude corruption (lower contrast, brighter, noisy): a model trained on clean bars drops to
    near chance at 0.4, and the same model with its BatchNorm statistics re-estimated on shifted bars recovers
    (that is the tests' "teacher"). -> (uint8 [n, 1, 32, 32], int64 labels)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) - 15.5
    th = y * np.pi / NUM_CLASSES + rng.normal(0, 0.05, n)
    cx, cy = rng.uniform(-5, 5, (2, n))
    w, length = rng.uniform(1.5, 3.0, n), rng.uniform(8, 14, n)
    c, s = np.cos(th)[:, None, None], np.sin(th)[:, None, None]
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    u, v = dx * c + dy * s, -dx * s + dy * c
    img = np.exp(-((v / w[:, None, None]) ** 2)) * (np.abs(u) < length[:, None, None])
    img = img * rng.uniform(0.6, 1.0, (n, 1, 1)) + rng.normal(0, 0.03, img.shape)
    if shift:
        img = img * (1 - shift) + shift * 0.6 + rng.normal(0, 0.25 * shift, img.shape)
    return (np.clip(img, 0, 1)[:, None] * 255).astype(np.uint8), y.astype(np.int64)


def synthetic_images(n: int, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    return synthetic_task(n, seed, shift)[0]


@dataclass
class CloudEnv:
    home: Path
    bundle: Path
    public_key: str
    admin_token: str
    teacher_weights: Path


_ENV: list[CloudEnv] = []


@pytest.fixture(scope="session")
def cloud_env(tmp_path_factory) -> CloudEnv:
    """A cloud home, and a bundle exported for it: resnet_edge briefly trained on clean bars (~80% clean, near
    chance on shifted bars). Teacher: the same model with BN statistics re-estimated on shifted bars.

    Built once per test process even though every test module imports this fixture (an imported fixture is a
    separate definition per module, so pytest's session scope alone would build it once per module)."""
    if not _ENV:
        _ENV.append(_build_env(tmp_path_factory))
    return _ENV[0]


def _build_env(tmp_path_factory) -> CloudEnv:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from edgeadapt.cloud.admin import init_home, read_admin_token
    from edgeadapt.cloud.trainer import SGD
    from edgeadapt.export.exporter import ExportSpec, export_bundle
    from edgeadapt.export.profile import ExportProfile
    from edgeadapt.models.reference import FMNIST_LABELS, build_arch

    root = tmp_path_factory.mktemp("cloud")
    home = root / "home"
    info = init_home(home)
    torch.manual_seed(0)
    model = build_arch("resnet_edge")
    x, y = synthetic_task(64 * TRAIN_STEPS, seed=1)
    xt, yt = torch.from_numpy(x).float() / 255, torch.from_numpy(y)
    opt = SGD(list(model.parameters()), lr=0.05, momentum=0.9)
    model.train()
    for i in range(TRAIN_STEPS):
        loss = F.cross_entropy(model(xt[i * 64 : (i + 1) * 64]), yt[i * 64 : (i + 1) * 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    calib_x, calib_y = synthetic_task(256, seed=2)
    bundle = root / "bundle"
    export_bundle(model, ExportSpec(arch="resnet_edge", model_name="fmnist-edge", labels=FMNIST_LABELS,
                                    input_shape=list(SHAPE), cloud_public_key=info["public_key"]),
                  calib_x, calib_y, bundle, ExportProfile(calib_samples=256))
    teacher = build_arch("resnet_edge")
    teacher.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        teacher.train()
        teacher(torch.from_numpy(synthetic_images(512, seed=4, shift=TEST_SHIFT)).float() / 255)
        teacher.eval()
    weights = root / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))
    return CloudEnv(home=home, bundle=bundle, public_key=info["public_key"], admin_token=read_admin_token(home),
                    teacher_weights=weights)


def make_service(env: CloudEnv, store_dir: Path, **overrides):
    from edgeadapt.cloud.config import load_config
    from edgeadapt.cloud.service import CloudService

    trainer = {"enabled": False, "seed": 0, **overrides.pop("trainer", {})}
    cfg = load_config(env.home, {"bundle": str(env.bundle), "teacher": "resnet_edge",
                                 "teacher_weights": str(env.teacher_weights), "store_dir": str(store_dir),
                                 "trainer": trainer, **overrides}, environ={})
    return CloudService(cfg, env.home)


@dataclass
class LiveCloud:
    url: str
    service: object
    admin: str
    server: object

    def client(self, token: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 30.0), **kw)

    def add_device(self, name: str) -> str:
        with self.client(self.admin) as c:
            r = c.post("/v1/admin/devices", json={"name": name})
            assert r.status_code == 201, r.text
            return r.json()["token"]


@pytest.fixture
def live_cloud(cloud_env, tmp_path):
    """Factory: ``live_cloud(**config_overrides)`` -> a LiveCloud on 127.0.0.1 (real HTTP); stopped after the test."""
    from edgeadapt.cloud.server import ServerThread, create_app

    started = []

    def _start(**overrides) -> LiveCloud:
        service = make_service(cloud_env, tmp_path / f"store{len(started)}", **overrides)
        server = ServerThread(create_app(service)).start()
        started.append(server)
        return LiveCloud(server.url, service, cloud_env.admin_token, server)

    yield _start
    for s in started:
        s.stop()


@pytest.fixture
def kit():
    """This module: helpers (synthetic_task, batch_body, make_service, TEST_SHIFT, ...)."""
    import sys

    return sys.modules[__name__]


def wire_sample(x: np.ndarray, sid: str | None = None, novel: bool = False, version: int = 0,
                logits: list[float] | None = None) -> dict:
    return {"id": sid or uuid.uuid4().hex, "input": {"dtype": str(x.dtype), "shape": list(x.shape),
                                                     "data": base64.b64encode(np.ascontiguousarray(x).tobytes()).decode()},
            "logits": logits if logits is not None else [0.0] * NUM_CLASSES, "entropy": 1.0, "ood_score": 0.0,
            "novel": novel, "param_version": version}


def batch_body(xs: np.ndarray, ids: list[str] | None = None, model: str = "fmnist-edge", **kw) -> dict:
    ids = ids or [uuid.uuid4().hex for _ in range(len(xs))]
    return {"model": model, "samples": [wire_sample(x, i, **kw) for x, i in zip(xs, ids, strict=True)]}


def race_rounds_publish_once(a, b) -> None:
    """Two services on one store (replicas) call ``trainer.train_now()`` at the same instant: exactly one publishes,
    the other finds the lineage leased or (it came second) nothing left to train, and every upload is consumed."""
    import threading

    results: dict = {}
    go = threading.Barrier(2)

    def run(name, service):
        go.wait()
        results[name] = service.trainer.train_now()

    threads = [threading.Thread(target=run, args=(n, s)) for n, s in (("a", a), ("b", b))]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    statuses = sorted(r.status for r in results.values())
    assert statuses == ["idle", "published"], {k: (r.status, r.reason) for k, r in results.items()}
    idle = next(r for r in results.values() if r.status == "idle")
    assert "another worker" in idle.reason or "no pending" in idle.reason, idle.reason
    assert a.store.latest_version() == 1 and len(a.store.list_candidates()) == 1
    assert a.store.count_samples("train", consumed=False) == 0
