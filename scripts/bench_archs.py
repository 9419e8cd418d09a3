"""The architectures users deploy, at 3x224x224 with 1,000 classes: ResNet-18, MobileNetV2, EfficientNet-B0.

torchvision's layouts written here as small torch modules (torchvision's PyPI wheel does not import on the CPU
torch used here), random weights, BatchNorm statistics from one train-mode pass on random data, exported with the
project's exporter. Why a script and not a test: one export at 224 takes about a minute and up to a GB. Then
measure each bundle with the runtime benchmark (static, default- and transductive-method throughput, swap ms):

    flock /tmp/edgeadapt-bench.lock .venv/bin/python scripts/bench_archs.py --arch mobilenet_v2 --out /tmp/archs --json
    flock /tmp/edgeadapt-bench.lock .venv/bin/edgeadapt bench runtime --bundle /tmp/archs/mobilenet_v2 --batch 16 \\
        --http-batch 16 --no-torch --json

The bundles are also what the 224 loop round trip (tests/test_loop_224.py) and docs/BENCHMARKS.md
"Architectures at 224 (issue 15)" use; ``module:factory`` names for the cloud's student are
``scripts.bench_archs:resnet18`` etc. (run from the repository root).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export import _RssSampler, resnet18  # noqa: E402  (the script directory, run as a script or module)


def _divisible(v: float, d: int = 8) -> int:
    """torchvision's ``_make_divisible``: channel counts rounded to multiples of 8, never below 90% of ``v``."""
    out = max(d, int(v + d / 2) // d * d)
    return out + d if out < 0.9 * v else out


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU6):
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def mobilenet_v2(num_classes: int = 1000) -> nn.Module:
    """torchvision's MobileNetV2 (width 1.0): inverted residuals t, c, n, s; ReLU6; 1280-d head."""

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, t: int):
            super().__init__()
            hidden = cin * t
            layers = [] if t == 1 else [_conv_bn(cin, hidden, 1)]
            layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=None)]
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
            cin = 32
            for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                               (6, 160, 3, 2), (6, 320, 1, 1)):
                for i in range(n):
                    layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers.append(_conv_bn(cin, 1280, 1))
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):
            return self.classifier(self.pool(self.features(x)).flatten(1))

    return MobileNetV2()


def efficientnet_b0(num_classes: int = 1000) -> nn.Module:
    """torchvision's EfficientNet-B0: MBConv with squeeze-excitation (SiLU, sigmoid gate, squeeze = in // 4),
    stochastic depth (identity in eval, 0.2 linearly over the blocks), 1280-d head."""

    class StochasticDepth(nn.Module):
        def __init__(self, p: float):
            super().__init__()
            self.p = p

        def forward(self, x):
            if not self.training or self.p == 0:
                return x
            keep = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(1 - self.p)
            return x * keep / (1 - self.p)

    class SqueezeExcitation(nn.Module):
        def __init__(self, channels: int, squeeze: int):
            super().__init__()
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
            self.act = nn.SiLU(inplace=True)

        def forward(self, x):
            return x * self.fc2(self.act(self.fc1(self.avgpool(x)))).sigmoid()

    class MBConv(nn.Module):
        def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, sd: float):
            super().__init__()
            hidden = _divisible(cin * expand)
            layers: list[nn.Module] = [] if expand == 1 else [_conv_bn(cin, hidden, 1, act=nn.SiLU)]
            layers += [_conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU),
                       SqueezeExcitation(hidden, max(1, cin // 4)), _conv_bn(hidden, cout, 1, act=None)]
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout
            self.stochastic_depth = StochasticDepth(sd)

        def forward(self, x):
            y = self.block(x)
            return x + self.stochastic_depth(y) if self.residual else y

    class EfficientNetB0(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                   (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))
            total, done = sum(c[-1] for c in cfg), 0
            layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2, act=nn.SiLU)]
            for expand, k, stride, cin, cout, n in cfg:
                stage = []
                for i in range(n):
                    stage.append(MBConv(cin if i == 0 else cout, cout, k, stride if i == 0 else 1, expand,
                                        0.2 * done / total))
                    done += 1
                layers.append(nn.Sequential(*stage))
            layers.append(_conv_bn(320, 1280, 1, act=nn.SiLU))
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):
            return self.classifier(self.avgpool(self.features(x)).flatten(1))

    return EfficientNetB0()


ARCHS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2, "efficientnet_b0": efficientnet_b0}


def build(arch: str, num_classes: int = 1000, seed: int = 0, size: int = 224) -> nn.Module:
    """``arch`` with random weights and BatchNorm statistics from one train-mode pass on random data in the input's
    range ([0, 1]: the bundles declare no mean/std), in eval mode. (The recorded runtime figures used N(0, 1) data
    here: against it the deep layers' statistics of [0, 1] inputs were 1e4x off and the engine's guard refused them,
    so the loop method's figures there exclude its refolds; docs/BENCHMARKS.md "Architectures at 224".)"""
    import torch

    torch.manual_seed(seed)
    model = ARCHS[arch](num_classes)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, size, size))
    return model.eval()


def save_weights(arch: str, path: Path) -> Path:
    """The exported model's own weights (same seed) as a teacher for a 224 loop: what the loop round trip shows is
    that uploads, training, publishing and applying work at that size, not that a random teacher teaches."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in build(arch).state_dict().items()}, str(path))
    return path


def loop_stream(path: Path, per_domain: int = 96, domains: int = 2, size: int = 224, seed: int = 0) -> Path:
    """A small RGB stream ``.npz`` at ``size`` (the layout of ``edgeadapt data``'s streams): smooth synthetic
    images (bars at 10 orientations, upscaled and colourized as ``bench encodings`` does), a brightness change
    per domain; labels 0-9 of the 1,000 classes."""
    import numpy as np

    from edgeadapt.bench.encodings import colourized

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for d in range(domains):
        y = rng.integers(0, 10, per_domain)
        grey = np.zeros((per_domain, 1, 32, 32), np.float32)
        yy, xx = np.mgrid[0:32, 0:32] - 15.5
        for i, c in enumerate(y):
            a = np.pi * c / 10
            dist = np.abs(-np.sin(a) * xx + np.cos(a) * yy)
            grey[i, 0] = np.clip(1.2 - dist / 2.5, 0, 1) * rng.uniform(0.6, 1.0)
        x = colourized((grey * 255).astype(np.uint8), size, seed + d)
        xs.append(np.clip(x.astype(np.int16) + 40 * d, 0, 255).astype(np.uint8))
        ys.append(y)
    np.savez(path, x=np.concatenate(xs), y=np.concatenate(ys).astype(np.int64),
             corruption=np.repeat(np.arange(domains), per_domain),
             corruption_names=np.array([f"bright+{40 * d}" for d in range(domains)]))
    return path


def calibration(calib_n: int, like_stream: bool) -> tuple:
    """Calibration inputs: uniform noise (size and speed figures), or images like ``loop_stream``'s first domain
    (another seed), so that a 224 loop's stream is in-distribution for the OOD flag: a novel upload is never
    trained on, and against noise calibration every smooth image is novel."""
    import numpy as np

    if like_stream:
        with tempfile.TemporaryDirectory() as d:
            s = np.load(loop_stream(Path(d) / "calib.npz", per_domain=calib_n, domains=1, seed=1))
            return s["x"], s["y"]
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (calib_n, 3, 224, 224), dtype=np.uint8), rng.integers(0, 1000, calib_n)


def _export(arch: str, out: str, calib_n: int, q, signed: bool = False, like_stream: bool = False) -> None:
    from edgeadapt.export.exporter import ExportSpec, export_bundle
    from edgeadapt.export.profile import ExportProfile

    model = build(arch)
    weights = sum(v.numel() * 4 for v in model.state_dict().values() if v.dtype.is_floating_point)
    x, y = calibration(calib_n, like_stream)
    sampler = _RssSampler()
    t0 = time.perf_counter()
    key = None
    if signed:  # updates from the benchmarks' cloud home verify on this bundle (bench accuracy's loop rows)
        from edgeadapt.assets import cloud_home, public_key_file
        from edgeadapt.core.signing import load_public_key_b64

        key = load_public_key_b64(public_key_file(cloud_home()))
    spec = ExportSpec(arch=f"bench:{arch}", model_name=arch, labels=[f"c{i}" for i in range(1000)],
                      input_shape=[3, 224, 224], cloud_public_key=key)
    manifest = export_bundle(model, spec, x, y, out, ExportProfile(calib_samples=max(64, calib_n)),
                             progress=sampler.set)
    q.put({"arch": arch, "weights_bytes": weights, "export_s": round(time.perf_counter() - t0, 1),
           "peak_rss_mb_by_stage": sampler.stop(), "warnings": list(manifest.warnings),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})


def export(arch: str, out: Path, calib_n: int = 256, signed: bool = False, like_stream: bool = False) -> dict:
    """Export ``arch`` to ``out`` in a child process (peak RSS is the export's own) and describe the bundle."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_export, args=(arch, str(out), calib_n, q, signed, like_stream))
    p.start()
    res = q.get()
    p.join()
    files = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    total = sum(files.values())
    res.update(bundle=str(out), files_mb={k: round(v / 1e6, 2) for k, v in files.items()},
               bundle_mb=round(total / 1e6, 1), weights_mb=round(res["weights_bytes"] / 1e6, 1),
               ratio=round(total / res["weights_bytes"], 2), calib_samples=calib_n)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet18,mobilenet_v2,efficientnet_b0", help="comma-separated: " +
                    ", ".join(ARCHS))
    ap.add_argument("--out", type=Path, default=None, help="directory for the bundles (<out>/<arch>; default: a "
                                                           "temporary one, removed)")
    ap.add_argument("--calib", type=int, default=256, help="calibration samples (default 256)")
    ap.add_argument("--signed", action="store_true", help="trust the benchmarks' cloud home's key (for bench "
                                                          "accuracy's loop rows)")
    ap.add_argument("--loop-assets", action="store_true", help="also <out>/<arch>.teacher.safetensors (the "
                    "model's own weights) and <out>/stream224.npz (a small RGB stream) for a 224 loop run; the "
                    "bundle is calibrated on images like the stream's")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        ap.error(f"unknown architecture(s) {unknown}: choose from {sorted(ARCHS)}")
    with tempfile.TemporaryDirectory() as tmp:
        base = args.out or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        results = [export(a, base / a, args.calib, args.signed, args.loop_assets) for a in archs]
        if args.loop_assets:
            for r in results:
                r["teacher_weights"] = str(save_weights(r["arch"], base / f"{r['arch']}.teacher.safetensors"))
            loop_stream(base / "stream224.npz")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['arch']}: {r['bundle_mb']} MB ({r['ratio']}x weights), export {r['export_s']} s, "
                  f"peak RSS {r['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
