"""Bundle size and export memory for a ResNet-18-sized model (3x224x224, 1,000 classes, random weights).

Why a script and not a test: one export at 224x224 takes tens of seconds and over a GB of memory, more than the
default suite may spend. Run it on a quiet machine:

    .venv/bin/python scripts/bench_export.py --json

It exports in a child process (so peak RSS is the export's own, ``ru_maxrss`` of that process) and prints the
bundle's size per file against the model's fp32 weights.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path


def resnet18(num_classes: int = 1000):
    """torchvision's ResNet-18 layout (BasicBlock x [2, 2, 2, 2], widths 64..512), written here because
    torchvision does not import on this CPU torch."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            idt = x if self.down is None else self.down(x)
            return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + idt)

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
            layers, cin = [], 64
            for cout, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
                layers.append(Block(cin, cout, stride))
                cin = cout
            self.layers = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))

    return ResNet18()


class _RssSampler:
    """Peak resident memory per export stage (the progress messages), sampled from /proc every 20 ms."""

    def __init__(self) -> None:
        import threading

        self.stage = "setup"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * resource.getpagesize()
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss)

    def set(self, stage: str) -> None:
        if not stage.startswith("warning"):
            self.stage = stage

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return {k: round(v / 2**20) for k, v in self.peaks.items()}


def _export(out: str, calib_n: int, q) -> None:
    import numpy as np
    import torch

    from edgeadapt.export.exporter import ExportSpec, export_bundle
    from edgeadapt.export.profile import ExportProfile

    torch.manual_seed(0)
    model = resnet18()
    model.train()
    with torch.no_grad():  # BN statistics that are not the identity
        model(torch.randn(8, 3, 224, 224))
    model.eval()
    weights = sum(v.numel() * 4 for v in model.state_dict().values() if v.dtype.is_floating_point)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (calib_n, 3, 224, 224), dtype=np.uint8)
    y = rng.integers(0, 1000, calib_n)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampler = _RssSampler()
    sampler.set("reference forward")
    t0 = time.perf_counter()
    spec = ExportSpec(arch="bench:resnet18", model_name="resnet18", labels=[f"c{i}" for i in range(1000)],
                      input_shape=[3, 224, 224])
    export_bundle(model, spec, x, y, out, ExportProfile(calib_samples=max(64, calib_n)), progress=sampler.set)
    q.put({"weights_bytes": weights, "export_s": round(time.perf_counter() - t0, 1),
           "peak_rss_mb_by_stage": sampler.stop(),
           "rss_before_export_mb": round(rss_before / 1024),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=256, help="calibration samples (default 256)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "bundle")
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_export, args=(out, args.calib, q))
        p.start()
        res = q.get()
        p.join()
        files = {f.name: f.stat().st_size for f in sorted(Path(out).iterdir())}
    total = sum(files.values())
    res.update(files_mb={k: round(v / 1e6, 2) for k, v in files.items()}, bundle_mb=round(total / 1e6, 1),
               weights_mb=round(res["weights_bytes"] / 1e6, 1), ratio=round(total / res["weights_bytes"], 2),
               calib_samples=args.calib)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
