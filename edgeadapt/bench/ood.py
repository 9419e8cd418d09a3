"""`edgeadapt bench ood`: AUROC and FPR@95%TPR of every OOD detector, scored on the device side (ONNX).

Open-set split: the edge model is trained on Fashion-MNIST classes 0-7 only; in-distribution = test images
of classes 0-7; near-OOD = test images of the held-out classes 8 (bag) and 9 (ankle boot); far-OOD =
synthetic inputs: uniform noise, salt-and-pepper, inverted in-distribution images, blank frames of random
gray levels. Detectors and thresholds are fitted at export on clean training images of classes 0-7.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HELD_OUT = (8, 9)


def far_ood(x_in: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = n // 4
    noise = rng.integers(0, 256, (k, *x_in.shape[1:]), dtype=np.uint8)
    sp = (rng.random((k, *x_in.shape[1:])) < 0.5).astype(np.uint8) * 255
    inverted = 255 - x_in[rng.choice(len(x_in), k, replace=False)]
    blank = np.broadcast_to(rng.integers(0, 256, (n - 3 * k, 1, 1, 1), dtype=np.uint8),
                            (n - 3 * k, *x_in.shape[1:])).copy()
    return np.concatenate([noise, sp, inverted, blank])


def run_ood_bench(work: Path | None = None, per_set: int = 2000, epochs: float = 1.0) -> dict:
    from edgeadapt.assets import cache_dir
    from edgeadapt.core.bundle import Bundle
    from edgeadapt.datasets.fmnist import load_fmnist
    from edgeadapt.device.backend import OrtBackend
    from edgeadapt.device.ood import auroc, fpr_at_tpr, load_all
    from edgeadapt.export.exporter import ExportSpec, export_bundle
    from edgeadapt.export.profile import ExportProfile
    from edgeadapt.models.reference import FMNIST_LABELS, build_arch
    from edgeadapt.models.training import load_weights, train_model

    work = Path(work) if work else cache_dir() / "ood-bench"
    work.mkdir(parents=True, exist_ok=True)
    xtr, ytr = load_fmnist("train")
    xte, yte = load_fmnist("test")
    known_tr, known_te = ~np.isin(ytr, HELD_OUT), ~np.isin(yte, HELD_OUT)
    weights = work / "resnet_edge_open8.safetensors"
    if not weights.is_file():
        train_model("resnet_edge", weights, epochs=epochs, progress=False,
                    data=(xtr[known_tr], ytr[known_tr], xte[known_te], yte[known_te]))
    bundle_dir = work / "bundle-open8"
    if not (bundle_dir / "manifest.json").is_file():
        model = build_arch("resnet_edge")
        load_weights(model, weights)
        idx = np.random.default_rng(0).choice(np.flatnonzero(known_tr), 2048, replace=False)
        export_bundle(model, ExportSpec(arch="resnet_edge", model_name="fmnist-open8", labels=FMNIST_LABELS,
                                        input_shape=[1, 32, 32]), xtr[idx], ytr[idx], bundle_dir, ExportProfile())
    bundle = Bundle(bundle_dir)
    backend = OrtBackend(bundle)
    detectors = load_all(bundle.calib, bundle.calib["head.weight"], bundle.calib["head.bias"])
    sets = {
        "in": xte[known_te][:per_set],
        "near": xte[~known_te][:per_set],
        "far": far_ood(xte[known_te], per_set),
    }
    outs = {}
    for name, x in sets.items():
        lo, fe = [], []
        for i in range(0, len(x), 256):
            r = backend.run_static(bundle.preprocess(x[i : i + 256]))
            lo.append(r.logits)
            fe.append(r.features)
        outs[name] = (np.concatenate(lo), np.concatenate(fe))
    res: dict = {"split": "in: FMNIST classes 0-7 (test); near: held-out classes 8-9 (test); far: synthetic "
                          "(uniform noise, salt-and-pepper, inverted, blank)",
                 "n": {k: len(v) for k, v in sets.items()}, "detectors": {}}
    for name, det in detectors.items():
        s_in = det.score(*outs["in"])
        row = {"tpr_in_at_threshold": float((s_in <= det.threshold).mean())}
        for kind in ("near", "far"):
            s_out = det.score(*outs[kind])
            row[kind] = {"auroc": float(auroc(s_in, s_out)), "fpr95": float(fpr_at_tpr(s_in, s_out, 0.95))}
        res["detectors"][name] = row
    return res
