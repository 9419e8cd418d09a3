"""Shared fixtures: a tiny exported bundle (BN-warmed, untrained resnet_edge) built once per session."""

from __future__ import annotations

import socket

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    import torch

    from edgeadapt.export.exporter import ExportSpec, export_bundle
    from edgeadapt.export.profile import ExportProfile
    from edgeadapt.models.reference import FMNIST_LABELS, build_arch

    torch.manual_seed(0)
    m = build_arch("resnet_edge")
    m.train()
    with torch.no_grad():
        m(torch.rand(128, 1, 32, 32))
    m.eval()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (256, 1, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, 256)
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    export_bundle(m, ExportSpec(arch="resnet_edge", model_name="fmnist-edge", labels=FMNIST_LABELS,
                                input_shape=[1, 32, 32]), x, y, out, ExportProfile(calib_samples=256))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
