"""The per-batch adaptation loop shared by the daemon and the benchmarks (numpy + a backend; no torch).

Per batch: predict with the current state (fast static session, or the adaptive graph when the method
mixes in the batch's own statistics) -> entropy and OOD scores -> reliable samples (not OOD, entropy below
``reliable_entropy_factor * ln C``) -> batch statistics of a small reliable subset through the adaptive
graph -> method state update -> output-side adjustment. When the method's statistics change, a new static
session with the statistics folded in is built and swapped in between batches.

Covariate shift vs novelty: OOD detectors fitted on clean data flag most samples of a heavily corrupted
domain. Novel inputs are rare by definition, so when more than ``max_ood_fraction`` of a batch is flagged
the batch is treated as a domain shift: flags are still reported, but samples are not excluded from
adaptation for it (the entropy filter still applies). Otherwise a shifted stream could never adapt.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

from edgeadapt.core import bundle as B
from edgeadapt.core.mathops import entropy_from_logits, softmax
from edgeadapt.core.tensorfile import ParamSet
from edgeadapt.device.backend import Backend, make_backend
from edgeadapt.device.methods import build_method
from edgeadapt.device.methods.base import AdaptationMethod, AdaptContext, BatchInfo
from edgeadapt.device.ood import load_all


@dataclass
class EngineConfig:
    method: str = "ema_stats+t3a"
    ood_detector: str = "energy"
    reliable_entropy_factor: float = 0.8
    max_ood_fraction: float = 0.5
    stats_samples: int = 32
    stats_every: int = 16
    refresh_every: int = 16
    hybrid_batches: int = 3
    transductive_prior: float = 16.0
    full_batch_reliable: float = 0.75
    input_shift: float = 0.25
    feature_shift: float = 0.6
    shift_ratio: float = 1.3
    shift_margin: float = 0.15
    entropy_momentum: float = 0.2
    threads: int = 2
    backend: str = "onnxruntime"
    device: str = "cpu"
    seed: int = 0


@dataclass
class BatchResult:
    logits: np.ndarray
    probs: np.ndarray
    pred: np.ndarray
    entropy: np.ndarray
    ood_score: np.ndarray
    ood: np.ndarray
    reliable: np.ndarray
    param_version: int
    info: dict = field(default_factory=dict)


class InputError(ValueError):
    """A request's input does not match the model's input spec."""


class AdaptiveEngine:
    def __init__(self, bundle: B.Bundle, config: EngineConfig | None = None, backend: Backend | None = None):
        self.bundle = bundle
        self.config = config or EngineConfig()
        self.manifest = bundle.manifest
        self.num_classes = self.manifest.num_classes
        self.backend = backend or make_backend(bundle, self.config.backend, self.config.threads, self.config.device)
        self._rng = np.random.default_rng(self.config.seed)
        self._lock = threading.RLock()
        self.base_params: ParamSet = dict(bundle.params)
        self.param_version = 0
        detectors = load_all(bundle.calib, bundle.calib["head.weight"], bundle.calib["head.bias"])
        if self.config.ood_detector not in detectors:
            raise ValueError(f"OOD detector {self.config.ood_detector!r} not in the bundle: {sorted(detectors)}")
        self.detector = detectors[self.config.ood_detector]
        self.method = self._build_method(self.base_params)
        self._folded_stats_version = -1
        self.batches = 0
        self._entropy_ema: float | None = None
        self._hybrid_left = 0
        self._stale = False
        self._feat_ema: np.ndarray | None = None
        self.shifts = 0
        self._refresh(force=True)

    # -- state -------------------------------------------------------------------------------------
    def _context(self, params: ParamSet) -> AdaptContext:
        layers = self.manifest.norm_layers
        return AdaptContext(
            num_classes=self.num_classes,
            norm_layers=list(layers),
            source_stats={n.name: (params[f"{n.name}.running_mean"], params[f"{n.name}.running_var"]) for n in layers},
            head_weight=self.bundle.calib["head.weight"],
            head_bias=self.bundle.calib["head.bias"],
            feature_mean=self.bundle.calib["features.mean"],
            feature_var=self.bundle.calib["features.var"],
            entropy_mean=float(self.bundle.calib["entropy.mean"][0]),
        )

    def _build_method(self, params: ParamSet) -> AdaptationMethod:
        return build_method(self.config.method, self._context(params))

    def current_params(self) -> ParamSet:
        """Base parameters (source or the applied update) with the method's adapted statistics folded in."""
        params = dict(self.base_params)
        for layer, (mean, var) in self.method.forward_stats().items():
            params[f"{layer}.running_mean"] = np.asarray(mean, np.float32)
            params[f"{layer}.running_var"] = np.asarray(var, np.float32)
        return params

    def _refresh(self, force: bool = False) -> None:
        v = self.method.stats_version
        if force or v != self._folded_stats_version:
            self.backend.set_params(self.current_params())
            self._folded_stats_version = v
            self._feat_ema = None  # features move with the parameters: not a domain shift

    def apply_params(self, params: ParamSet, version: int, keep_method_state: bool = True) -> None:
        """Install a new base parameter version (a cloud update or a rollback) between batches."""
        unknown = set(params) - set(self.base_params)
        if unknown:
            raise ValueError(f"update names unknown tensors: {sorted(unknown)[:5]}")
        new_base = dict(self.base_params)
        new_base.update({k: np.asarray(v, np.float32) for k, v in params.items()})
        state = self.method.state_dict() if keep_method_state else None
        method = self._build_method(new_base)
        if state is not None:
            try:
                method.load_state_dict(state)
            except ValueError:
                pass
        session = self.backend.build_static(self._params_with(new_base, method)) \
            if hasattr(self.backend, "build_static") else None
        with self._lock:
            self.base_params, self.method, self.param_version = new_base, method, version
            if session is not None:
                self.backend.swap_static(session)
                self._folded_stats_version = method.stats_version
            else:
                self._refresh(force=True)

    @staticmethod
    def _params_with(base: ParamSet, method: AdaptationMethod) -> ParamSet:
        params = dict(base)
        for layer, (mean, var) in method.forward_stats().items():
            params[f"{layer}.running_mean"] = np.asarray(mean, np.float32)
            params[f"{layer}.running_var"] = np.asarray(var, np.float32)
        return params

    def reset(self) -> None:
        with self._lock:
            self.method.reset()
            self._refresh(force=True)

    # -- input -------------------------------------------------------------------------------------
    def prepare(self, x: np.ndarray) -> np.ndarray:
        shape = list(self.manifest.input.shape)
        if x.ndim == len(shape):
            x = x[None]
        if x.ndim != len(shape) + 1 or list(x.shape[1:]) != shape:
            raise InputError(f"input has shape {list(x.shape)}, expected [N, {', '.join(map(str, shape))}]")
        if x.shape[0] == 0:
            raise InputError("empty batch")
        if x.dtype == np.uint8:
            return self.bundle.preprocess(x)
        if x.dtype.kind != "f":
            raise InputError(f"input dtype {x.dtype} not supported: send uint8 (0-255) or float (0-1)")
        if not np.isfinite(x).all():
            raise InputError("input contains NaN or Inf")
        return self.bundle.preprocess(x.astype(np.float32))

    # -- the loop ----------------------------------------------------------------------------------
    def process(self, x: np.ndarray, adapt: bool = True) -> BatchResult:
        xf = self.prepare(x)
        with self._lock:
            return self._process(xf, adapt)

    def _transductive_mix(self, n: int) -> np.ndarray:
        w = n / (self.config.transductive_prior + n)
        return np.full(len(self.manifest.norm_layers), w, np.float32)

    def _process(self, x: np.ndarray, adapt: bool) -> BatchResult:
        n = len(x)
        method = self.method
        c = self.config
        mix = method.forward_mix(n) if adapt else None
        guard = getattr(method, "guard", None)
        if guard is not None and getattr(method, "last_skewed", False):
            self._hybrid_left = 0  # label-skewed stream: never normalize with a skewed batch's own statistics
        if mix is None and adapt and method.needs_stats and self._hybrid_left > 0:
            mix = self._transductive_mix(n)
            self._hybrid_left -= 1
        if mix is not None:
            out = self.backend.run_adaptive(x, self.current_params(), mix)
        else:
            if adapt and self._stale:
                self._refresh()
                self._stale = False
            out = self.backend.run_static(x)
        entropy = entropy_from_logits(out.logits)
        shift = self._detect_shift(float(entropy.mean()), x, out.features) if adapt else False
        if shift:
            method.on_shift()
            if mix is None and method.needs_stats and c.hybrid_batches > 0 and not (
                    guard is not None and guard.detect(out.logits)):
                # predict the shifted batch with its own statistics instead of the stale ones
                mix = self._transductive_mix(n)
                out = self.backend.run_adaptive(x, self.current_params(), mix)
                entropy = entropy_from_logits(out.logits)
                self._hybrid_left = c.hybrid_batches - 1
        logits, feats = out.logits, out.features
        ood_score = self.detector.score(logits, feats)
        ood = ood_score > self.detector.threshold
        ood_frac = float(ood.mean())
        excluded = ood if ood_frac <= c.max_ood_fraction else np.zeros_like(ood)
        reliable = (~excluded) & (entropy < c.reliable_entropy_factor * math.log(self.num_classes))
        info = BatchInfo(reliable=reliable, ood=ood, entropy=entropy, logits=logits)
        stats_run = False
        if adapt:
            if method.needs_stats and reliable.any():
                if mix is not None and out.batch_stats is not None and reliable.mean() >= c.full_batch_reliable:
                    # the forward already computed this batch's statistics; most of it is reliable
                    method.update_stats(out.batch_stats, int(reliable.sum()), info)
                    stats_run = True
                elif mix is not None or self.batches % c.stats_every == 0:
                    idx = np.flatnonzero(reliable)
                    if len(idx) > c.stats_samples:
                        idx = np.sort(self._rng.choice(idx, c.stats_samples, replace=False))
                    st = self.backend.run_adaptive(x[idx], self.current_params(), None)
                    method.update_stats(st.batch_stats, len(idx), info)
                    stats_run = True
            logits = method.adjust(logits, feats, info)
            if method.stats_version != self._folded_stats_version and (
                    self.batches % c.refresh_every == 0 or mix is not None):
                self._stale = True
        self.batches += 1
        probs = softmax(logits)
        return BatchResult(
            logits=logits, probs=probs, pred=probs.argmax(1), entropy=entropy, ood_score=ood_score, ood=ood,
            reliable=reliable, param_version=self.param_version,
            info={"ood_fraction": ood_frac, "stats_run": stats_run, "n": n, "shift": shift,
                  "transductive": mix is not None},
        )

    def _detect_shift(self, mean_entropy: float, x: np.ndarray, feats: np.ndarray) -> bool:
        """A domain shift shows as a jump of the batch's mean entropy over its running average, or as a change
        of the input's own first and second moments (brightness, contrast, noise) beyond batch-to-batch noise."""
        c = self.config
        xm, xs = float(x.mean()), float(x.std())
        fm = feats.mean(0)
        prev = self._entropy_ema
        m = c.entropy_momentum
        if prev is None:  # a new stream is a new domain until shown otherwise
            self._entropy_ema, self._input_ema, self._feat_ema = mean_entropy, (xm, xs), fm
            self.shifts += 1
            return True
        pm, ps = self._input_ema
        pf = self._feat_ema if self._feat_ema is not None else fm  # None right after new parameters
        feat_change = float(np.linalg.norm(fm - pf) / max(float(np.linalg.norm(pf)), 1e-6))
        shift = (mean_entropy > prev * c.shift_ratio and mean_entropy > prev + c.shift_margin) or \
            abs(xm - pm) > c.input_shift * ps or abs(xs / max(ps, 1e-6) - 1) > c.input_shift or \
            feat_change > c.feature_shift
        if shift:  # restart the running averages at the new domain
            self._entropy_ema, self._input_ema, self._feat_ema = mean_entropy, (xm, xs), fm
            self.shifts += 1
            return True
        self._entropy_ema = (1 - m) * prev + m * mean_entropy
        self._input_ema = ((1 - m) * pm + m * xm, (1 - m) * ps + m * xs)
        self._feat_ema = (1 - m) * pf + m * fm
        return False

    # -- persistence -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        with self._lock:
            state = {f"method.{k}": v for k, v in self.method.state_dict().items()}
            state["engine.batches"] = np.array([self.batches], np.int64)
            return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        with self._lock:
            self.method.load_state_dict({k[len("method."):]: v for k, v in state.items() if k.startswith("method.")})
            if "engine.batches" in state:
                self.batches = int(state["engine.batches"][0])
            self._refresh(force=True)
