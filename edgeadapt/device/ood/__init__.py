"""Out-of-distribution detectors (scoring side, numpy only). Higher score = more OOD.

Importing this package registers every detector. ``fit_all`` fits detectors on clean calibration data
(at export) and returns a flat state for ``calib.safetensors``; ``load_all`` rebuilds them on the device.
"""

from __future__ import annotations

import numpy as np

from edgeadapt.device.ood import (  # noqa: F401  (registration)
    energy,
    gen,
    mahalanobis,
    mahalanobis_aligned,
    mahalanobis_domain,
    maxlogit,
    msp,
    rmds_aligned,
    vim,
)
from edgeadapt.device.ood.base import OODDetector, quantile_threshold
from edgeadapt.device.ood.metrics import auroc, fpr_at_tpr
from edgeadapt.device.ood.registry import all_detectors, get_detector, register

PREFIX = "ood."
DEFAULT_TPR = 0.95
#: The daemon's novelty flag. OOD-flagged samples are never uploaded as data the cloud distils on (and, where
#: few of a batch are flagged, not used for statistics), so a flag that fires on plain covariate shift starves
#: the loop of the current domain's harder samples (MSP, the previous default, flagged 25-34% of a corrupted
#: stream; feature-space detectors fitted on clean images 57-95%). ``mahalanobis_domain`` follows the current
#: domain's class Gaussians on the device: chosen on the dev split of ``bench ood`` (held-out training images),
#: it flags 6% of the covariate-shifted in-distribution and separates far-OOD (AUROC 0.98) and held-out classes
#: (0.71 under shift, 0.93 clean) better than any static detector there (docs/BENCHMARKS.md, issue 21).
DEFAULT_DETECTOR = "mahalanobis_domain"

__all__ = [
    "DEFAULT_DETECTOR",
    "OODDetector",
    "all_detectors",
    "auroc",
    "fit_all",
    "fpr_at_tpr",
    "get_detector",
    "load_all",
    "quantile_threshold",
    "register",
    "score_all",
]


def fit_all(
    features: np.ndarray,
    logits: np.ndarray,
    labels: np.ndarray,
    head_weight: np.ndarray,
    head_bias: np.ndarray,
    names: list[str] | None = None,
    tpr: float = DEFAULT_TPR,
    holdout: float = 0.2,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Fit detectors (default: all registered) and their thresholds; return ``{"ood.<name>.<key>": array}``
    including ``ood.<name>.threshold`` (shape [1], float32).

    Feature-based detectors (Mahalanobis, RMDS, ViM) are fitted on a random ``1 - holdout`` share of the
    data and their threshold is set on the held-out rest, because in-sample distances are optimistically
    small and would give a threshold that flags more than ``1 - tpr`` of new in-distribution data. With
    fewer than 20 held-out samples (or ``holdout=0``) everything is in-sample. Logit-only detectors use all
    samples for the threshold.
    """
    features = np.asarray(features)
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    n = features.shape[0]
    if logits.shape[0] != n or labels.shape[0] != n:
        raise ValueError("features, logits and labels disagree on N")
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = int(round(holdout * n))
    if n_hold >= 20 and n - n_hold >= 2:
        fit_idx, thr_idx = np.sort(perm[n_hold:]), np.sort(perm[:n_hold])
    else:
        fit_idx = thr_idx = np.arange(n)
    out: dict[str, np.ndarray] = {}
    for name in names if names is not None else list(all_detectors()):
        cls = get_detector(name)
        if cls.uses_features:
            det = cls.fit(features[fit_idx], logits[fit_idx], labels[fit_idx], head_weight, head_bias)
            det.calibrate_threshold(det.score(logits[thr_idx], features[thr_idx]), tpr)
        else:
            det = cls.fit(features, logits, labels, head_weight, head_bias)
            det.calibrate_threshold(det.score(logits, features), tpr)
        for key, arr in det.state().items():
            out[f"{PREFIX}{name}.{key}"] = np.ascontiguousarray(arr)
        out[f"{PREFIX}{name}.threshold"] = _f32_ceil(det.threshold)
    return out


def _f32_ceil(x: float) -> np.ndarray:
    """[1] float32 not below ``x`` (rounding down would flag the calibration sample at the threshold)."""
    t = np.float32(x)
    if np.isfinite(x) and float(t) < x:
        t = np.nextafter(t, np.float32(np.inf))
    return np.array([t], dtype=np.float32)


def load_all(
    flat_state: dict[str, np.ndarray], head_weight: np.ndarray, head_bias: np.ndarray
) -> dict[str, OODDetector]:
    """Rebuild every detector found in a flat state (other keys are ignored). Unknown detector names raise.
    A registered detector with ``derived_from`` whose own state is absent (a bundle exported before it existed)
    is rebuilt from its parent's state and threshold."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for full, arr in flat_state.items():
        if not full.startswith(PREFIX):
            continue
        name, _, key = full[len(PREFIX) :].partition(".")
        if key:
            grouped.setdefault(name, {})[key] = arr
    out = {name: get_detector(name).from_state(st, head_weight, head_bias) for name, st in grouped.items()}
    for name, cls in all_detectors().items():
        if name not in out and cls.derived_from in grouped:
            out[name] = cls.from_state(grouped[cls.derived_from], head_weight, head_bias)
    return out


def score_all(
    detectors: dict[str, OODDetector], logits: np.ndarray, features: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Scores of several detectors on one batch."""
    return {name: det.score(logits, features) for name, det in detectors.items()}
