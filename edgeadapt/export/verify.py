"""Torch-free bundle verification: file hashes, then both graphs against the logits torch produced at export, at
the calibration batch, at batch 1 and at an odd batch (a graph that baked its batch size fails here too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeadapt.core import bundle as B
from edgeadapt.core.archs import arch_problem
from edgeadapt.core.tensorfile import ParamSet, load_params

#: the batch sizes checked besides the stored parity batch (as export does)
EXTRA_BATCHES = (1, 5)


def parity_input(calib: ParamSet, manifest: B.BundleManifest) -> np.ndarray:
    """The stored parity inputs as the graphs take them. They are stored as a client sends them (uint8, or
    float16 where uint8 cannot hold the range) and normalized by the bundle's codec; float32 is the form of
    bundles written before the input codec (already the graphs' input)."""
    x = calib["parity.input"]
    if x.dtype == np.float32:
        return x
    from edgeadapt.core.input_codec import InputCodec

    return InputCodec(manifest.input).normalize(x)


def relative_tolerance(tol: float, ref: np.ndarray) -> float:
    """Parity is relative to the logits' scale: ``tol * max(1, max|logit|)``. float32 rounding grows with the
    logits' magnitude, so an absolute 1e-4 refused trained models whose logits reach ~30."""
    return float(tol) * max(1.0, float(np.abs(ref).max()))


def verify_bundle(path: str | Path, check_parity: bool = True, student_model: str | None = None) -> dict:
    """Return {"ok": bool, "problems": [...], "parity": {...}}; never raises on a bad bundle.

    An architecture the cloud would refuse to build (not registered, and no ``student_model`` named by the
    operator) is a problem: the bundle cannot be served as it stands."""
    path = Path(path)
    result: dict = {"bundle": str(path), "ok": False, "problems": [], "parity": {}}
    try:
        manifest = B.read_manifest(path)
    except B.BundleError as exc:
        result["problems"].append(str(exc))
        return result
    result["problems"] = B.verify_hashes(path, manifest)
    problem = arch_problem(manifest.arch, student_model)
    if problem:
        result["problems"].append(problem)
    if result["problems"] or not check_parity:
        result["ok"] = not result["problems"]
        return result
    import onnxruntime as ort

    from edgeadapt.device.backend import session_options

    try:
        calib = load_params(path / B.CALIB)
        params = load_params(path / B.PARAMS)
        x, ref = parity_input(calib, manifest), calib["parity.logits"]
        so = session_options()
        tol = relative_tolerance(manifest.profile.get("parity_tolerance", 1e-4), ref)
        static = ort.InferenceSession(str(path / B.STATIC_GRAPH), so, providers=["CPUExecutionProvider"])
        adaptive = ort.InferenceSession(str(path / B.ADAPTIVE_GRAPH), so, providers=["CPUExecutionProvider"])
        extra = dict(params)
        if manifest.norm_layers:
            extra["stat_mix"] = np.zeros(len(manifest.norm_layers), np.float32)
        sizes = [len(x), *[b for b in EXTRA_BATCHES if b < len(x)]]
        for name, sess, f in (("static", static, {}), ("adaptive", adaptive, extra)):
            worst = 0.0
            for b in sizes:
                out = sess.run(["logits"], {"input": x[:b], **f})[0]
                d = float(np.abs(out - ref[:b]).max()) if out.shape == ref[:b].shape else float("inf")
                if not d <= worst:
                    worst = d
                if not d <= tol:
                    result["problems"].append(f"{name} graph at batch {b}: max |Δlogit| {d:.3g} exceeds {tol:.3g}")
            result["parity"][name] = worst
    except Exception as exc:  # a corrupt graph or tensor file
        result["problems"].append(f"could not run the bundle's graphs: {exc}")
    result["ok"] = not result["problems"]
    return result
