"""Torch-free bundle verification: file hashes, then both graphs against the logits torch produced at export."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeadapt.core import bundle as B
from edgeadapt.core.archs import arch_problem
from edgeadapt.core.tensorfile import load_params


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
        x, ref = calib["parity.input"], calib["parity.logits"]
        so = session_options()
        tol = float(manifest.profile.get("parity_tolerance", 1e-4))
        static = ort.InferenceSession(str(path / B.STATIC_GRAPH), so, providers=["CPUExecutionProvider"])
        adaptive = ort.InferenceSession(str(path / B.ADAPTIVE_GRAPH), so, providers=["CPUExecutionProvider"])
        feeds = {"input": x, **params}
        if manifest.norm_layers:
            feeds["stat_mix"] = np.zeros(len(manifest.norm_layers), np.float32)
        for name, sess, f in (("static", static, {"input": x}), ("adaptive", adaptive, feeds)):
            d = float(np.abs(sess.run(["logits"], f)[0] - ref).max())
            result["parity"][name] = d
            if not d <= tol:
                result["problems"].append(f"{name} graph: max |Δlogit| {d:.3g} exceeds {tol:g}")
    except Exception as exc:  # a corrupt graph or tensor file
        result["problems"].append(f"could not run the bundle's graphs: {exc}")
    result["ok"] = not result["problems"]
    return result
