"""`edgeadapt bench ood`: AUROC and FPR@95%TPR of every OOD detector, scored on the device side (ONNX), on clean
images and on a covariate-shifted stream streamed through the adapting engine (issue 21).

Open-set split: the edge model is trained on Fashion-MNIST classes 0-7 only; in-distribution = test images
of classes 0-7; near-OOD = test images of the held-out classes 8 (bag) and 9 (ankle boot); far-OOD =
synthetic inputs: uniform noise, salt-and-pepper, inverted in-distribution images, blank frames of random
gray levels. Detectors and thresholds are fitted at export on clean training images of classes 0-7.

The last ``DEV_HOLDOUT`` training images are never trained on nor used for calibration: corrupted with other
seeds they are the development stream a default detector is chosen on (the test images' labels never are).

Covariate split: every benchmark corruption (severity 5) of the in-distribution images, one domain after
another, in batches as a device sees them, through ``AdaptiveEngine`` with the standalone device method; the
same corruption of near-OOD images and far-OOD inputs is mixed into each domain at a small rate. Per detector:
the fraction of the shifted in-distribution flagged (``covariate.flag_rate``) and near/far AUROC against the
shifted in-distribution. Online detectors observe the stream as they would on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

HELD_OUT = (8, 9)
#: the last training images: never trained on nor calibrated on (the development images)
DEV_HOLDOUT = 2000
#: corruption seed of each split (the test split's seed is the benchmark stream's)
SPLIT_SEEDS = {"test": 0, "dev": 1}


def far_ood(x_in: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = n // 4
    noise = rng.integers(0, 256, (k, *x_in.shape[1:]), dtype=np.uint8)
    sp = (rng.random((k, *x_in.shape[1:])) < 0.5).astype(np.uint8) * 255
    inverted = 255 - x_in[rng.choice(len(x_in), k, replace=len(x_in) < k)]
    blank = np.broadcast_to(rng.integers(0, 256, (n - 3 * k, 1, 1, 1), dtype=np.uint8),
                            (n - 3 * k, *x_in.shape[1:])).copy()
    return np.concatenate([noise, sp, inverted, blank])


def corrupt(x: np.ndarray, name: str, severity: int = 5, seed: int = 0) -> np.ndarray:
    """``x`` under one FMNIST-C corruption, seeded per chunk as the benchmark stream is."""
    from edgeadapt.datasets.fmnist import CHUNK, _corrupt_chunk

    return np.concatenate([_corrupt_chunk((name, severity, seed, ci, x[s : s + CHUNK]))
                           for ci, s in enumerate(range(0, len(x), CHUNK))]) if len(x) else x.copy()


class _ScoreAll:
    """Stands in for the engine's detector: every detector observes and scores each batch exactly as the
    engine's own would (same logits and adapted features, same order), the engine flags by ``primary``."""

    def __init__(self, detectors: dict, primary: str) -> None:
        self.detectors = detectors
        self.primary = detectors[primary]
        self.threshold = self.primary.threshold
        self.scores: dict[str, list[np.ndarray]] = {n: [] for n in detectors}

    def observe(self, logits: np.ndarray, features: np.ndarray | None = None, shift: bool = False) -> None:
        for det in self.detectors.values():
            det.observe(logits, features, shift)

    def score(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        out = {n: det.score(logits, features) for n, det in self.detectors.items()}
        for n, s in out.items():
            self.scores[n].append(s)
        return out[next(n for n, d in self.detectors.items() if d is self.primary)]

    def reset_domain(self) -> None:
        for det in self.detectors.values():
            det.reset_domain()


def _open_set_bundle(work: Path, epochs: float):
    """The edge model trained on classes 0-7 of the training images but the last ``DEV_HOLDOUT``, exported with
    2,048 calibration images of the same pool (cached under ``work``)."""
    from edgeadapt.core.bundle import Bundle
    from edgeadapt.datasets.fmnist import load_fmnist
    from edgeadapt.export.exporter import ExportSpec, export_bundle
    from edgeadapt.export.profile import ExportProfile
    from edgeadapt.models.reference import FMNIST_LABELS, build_arch
    from edgeadapt.models.training import load_weights, train_model

    xtr, ytr = load_fmnist("train")
    xte, yte = load_fmnist("test")
    pool = ~np.isin(ytr, HELD_OUT)
    pool[len(ytr) - DEV_HOLDOUT :] = False
    known_te = ~np.isin(yte, HELD_OUT)
    weights = work / f"resnet_edge_open8_dev{DEV_HOLDOUT}.safetensors"
    if not weights.is_file():
        train_model("resnet_edge", weights, epochs=epochs, progress=False,
                    data=(xtr[pool], ytr[pool], xte[known_te], yte[known_te]))
    bundle_dir = work / f"bundle-open8-dev{DEV_HOLDOUT}"
    if not (bundle_dir / "manifest.json").is_file():
        model = build_arch("resnet_edge")
        load_weights(model, weights)
        idx = np.random.default_rng(0).choice(np.flatnonzero(pool), 2048, replace=False)
        export_bundle(model, ExportSpec(arch="resnet_edge", model_name="fmnist-open8", labels=FMNIST_LABELS,
                                        input_shape=[1, 32, 32]), xtr[idx], ytr[idx], bundle_dir, ExportProfile())
    return Bundle(bundle_dir)


def split_images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a split: the test images, or the held-out development training images."""
    from edgeadapt.datasets.fmnist import load_fmnist

    if split == "test":
        return load_fmnist("test")
    if split == "dev":
        x, y = load_fmnist("train")
        return x[len(y) - DEV_HOLDOUT :], y[len(y) - DEV_HOLDOUT :]
    raise ValueError(f"split must be 'test' or 'dev', not {split!r}")


def covariate_stream(x: np.ndarray, y: np.ndarray, corruptions: Sequence[str], per_domain: int, near_rate: float,
                     far_rate: float, seed: int, severity: int = 5, cache: Path | None = None) -> dict:
    """Domains one after another: ``per_domain`` in-distribution images under the domain's corruption, with
    corrupted near-OOD images and far-OOD inputs mixed in at ``near_rate`` / ``far_rate`` of the domain, in a
    seeded order. ``kind``: 0 in, 1 near, 2 far."""
    key = f"cov_{seed}_{severity}_{per_domain}_{near_rate}_{far_rate}_{len(x)}_{'-'.join(corruptions)}"
    path = None
    if cache is not None:
        import hashlib

        path = cache / f"covariate-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as d:
                return {k: d[k] for k in d.files}
    known, unknown = np.flatnonzero(~np.isin(y, HELD_OUT)), np.flatnonzero(np.isin(y, HELD_OUT))
    xs, kinds, domains = [], [], []
    for di, name in enumerate(corruptions):
        rng = np.random.default_rng([seed, di])
        n_near = max(1, round(near_rate * per_domain))
        n_far = max(1, round(far_rate * per_domain))
        i_in = rng.choice(known, min(per_domain, len(known)), replace=False)
        i_near = rng.choice(unknown, min(n_near, len(unknown)), replace=False)
        xi = corrupt(np.concatenate([x[i_in], x[i_near]]), name, severity, seed)
        xf = far_ood(x[known], n_far, seed=seed * 1000 + di)
        xd = np.concatenate([xi, xf])
        kd = np.concatenate([np.zeros(len(i_in), np.int64), np.ones(len(i_near), np.int64),
                             np.full(len(xf), 2, np.int64)])
        order = rng.permutation(len(xd))
        xs.append(xd[order])
        kinds.append(kd[order])
        domains.append(np.full(len(xd), di, np.int64))
    out = {"x": np.concatenate(xs), "kind": np.concatenate(kinds), "domain": np.concatenate(domains)}
    if path is not None:
        np.savez(path, **out)
    return out


def _rates(s_in: np.ndarray, s_near: np.ndarray, s_far: np.ndarray, threshold: float) -> dict:
    from edgeadapt.device.ood import auroc, fpr_at_tpr

    row: dict = {}
    for kind, s_out in (("near", s_near), ("far", s_far)):
        row[kind] = {"auroc": float(auroc(s_in, s_out)), "fpr95": float(fpr_at_tpr(s_in, s_out, 0.95)),
                     "flag_rate": float((s_out > threshold).mean())}
    return row


def run_ood_bench(work: Path | None = None, per_set: int = 2000, epochs: float = 1.0, split: str = "test",
                  covariate: bool = True, corruptions: Sequence[str] | None = None, per_domain: int = 400,
                  near_rate: float = 0.05, far_rate: float = 0.05, batch_size: int = 64,
                  method: str | None = None, bundle_dir: Path | None = None) -> dict:
    """Clean and covariate-shifted OOD benchmark of every detector in the open-set bundle (see module doc).
    ``bundle_dir``: score this bundle instead of the open-set one (tests: a tiny bundle, no training)."""
    from edgeadapt.assets import cache_dir
    from edgeadapt.datasets.fmnist import CORRUPTIONS
    from edgeadapt.device.backend import OrtBackend
    from edgeadapt.device.config import DEFAULT_METHOD
    from edgeadapt.device.engine import AdaptiveEngine, EngineConfig
    from edgeadapt.device.ood import DEFAULT_DETECTOR, load_all

    work = Path(work) if work else cache_dir() / "ood-bench"
    work.mkdir(parents=True, exist_ok=True)
    if bundle_dir is not None:
        from edgeadapt.core.bundle import Bundle

        bundle = Bundle(bundle_dir)
    else:
        bundle = _open_set_bundle(work, epochs)
    head = (bundle.calib["head.weight"], bundle.calib["head.bias"])
    x, y = split_images(split)
    known = ~np.isin(y, HELD_OUT)
    backend = OrtBackend(bundle)
    sets = {"in": x[known][:per_set], "near": x[~known][:per_set],
            "far": far_ood(x[known], per_set, seed=SPLIT_SEEDS[split])}
    outs = {}
    for name, xs in sets.items():
        lo, fe = [], []
        for i in range(0, len(xs), 256):
            r = backend.run_static(bundle.preprocess(xs[i : i + 256]))
            lo.append(r.logits)
            fe.append(r.features)
        outs[name] = (np.concatenate(lo), np.concatenate(fe))
    detectors = load_all(bundle.calib, *head)
    res: dict = {"split": f"{split}; in: FMNIST classes 0-7; near: held-out classes 8-9; far: synthetic "
                          "(uniform noise, salt-and-pepper, inverted, blank)",
                 "default": DEFAULT_DETECTOR, "n": {k: len(v) for k, v in sets.items()}, "detectors": {}}
    for name, det in detectors.items():
        s_in = det.score(*outs["in"])
        row = {"tpr_in_at_threshold": float((s_in <= det.threshold).mean())}
        for kind, r in _rates(s_in, det.score(*outs["near"]), det.score(*outs["far"]), det.threshold).items():
            row[kind] = {"auroc": r["auroc"], "fpr95": r["fpr95"]}
        res["detectors"][name] = row
    if not covariate:
        return res
    names = list(corruptions) if corruptions is not None else list(CORRUPTIONS)
    stream = covariate_stream(x, y, names, per_domain, near_rate, far_rate, SPLIT_SEEDS[split], cache=work)
    method = method or DEFAULT_METHOD
    engine = AdaptiveEngine(bundle, EngineConfig(method=method, ood_detector=DEFAULT_DETECTOR), backend=backend)
    tee = _ScoreAll(load_all(bundle.calib, *head), DEFAULT_DETECTOR)
    engine.detector = tee
    for i in range(0, len(stream["x"]), batch_size):
        engine.process(stream["x"][i : i + batch_size])
    kind = stream["kind"]
    res["covariate"] = {"corruptions": names, "severity": 5, "method": method, "batch_size": batch_size,
                        "n": {k: int((kind == v).sum()) for k, v in (("in", 0), ("near", 1), ("far", 2))}}
    for name, det in tee.detectors.items():
        s = np.concatenate(tee.scores[name])
        r = _rates(s[kind == 0], s[kind == 1], s[kind == 2], det.threshold)
        per_domain_rate = [float((s[(kind == 0) & (stream["domain"] == d)] > det.threshold).mean())
                           for d in range(len(names))]
        res["detectors"][name]["covariate"] = {
            "flag_rate": float((s[kind == 0] > det.threshold).mean()),
            "flag_rate_by_domain": dict(zip(names, per_domain_rate, strict=True)), **r}
    return res
