"""The per-batch adaptation loop shared by the daemon and the benchmarks (numpy + a backend; no torch).

Per batch: predict with the current state (fast static session, or the adaptive graph when the method
mixes in the batch's own statistics) -> entropy and OOD scores -> reliable samples (the adapt role of
``config.reliability``, core/reliability.py: not OOD, entropy below ``adapt_factor * ln C``) -> batch statistics
of a small reliable subset through the adaptive graph -> method state update -> output-side adjustment. When the
method's statistics change, a new static session with the statistics folded in is built and swapped in between
batches.

Covariate shift vs novelty: OOD detectors fitted on clean data flag most samples of a heavily corrupted
domain. Novel inputs are rare by definition, so when more than the policy's ``max_ood_fraction`` of a batch is
flagged the batch is treated as a domain shift: flags are still reported, but samples are not excluded from
adaptation for it (the entropy filter still applies). Otherwise a shifted stream could never adapt. The default
detector (``mahalanobis_domain``) also follows the domain itself: ``detector.observe`` sees each adapting batch
before it is scored, so a corrupted domain is mostly not flagged in the first place (issue 21).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, fields

import numpy as np

from edgeadapt.core import bundle as B
from edgeadapt.core.input_codec import InputError
from edgeadapt.core.mathops import entropy_from_logits, softmax
from edgeadapt.core.reliability import DEFAULT_RELIABILITY, ReliabilityPolicy
from edgeadapt.core.tensorfile import ParamSet
from edgeadapt.device.backend import Backend, make_backend
from edgeadapt.device.methods import build_method
from edgeadapt.device.methods.base import AdaptationMethod, AdaptContext, BatchInfo
from edgeadapt.device.ood import DEFAULT_DETECTOR, load_all
from edgeadapt.device.state_guard import StateGuard, StatsBounds

__all__ = ["AdaptiveEngine", "BatchResult", "EngineConfig", "InputError"]


@dataclass
class EngineConfig:
    method: str = "ema_stats"
    ood_detector: str = DEFAULT_DETECTOR
    #: which samples may drive adaptation (and the selector's upload band: the daemon hands it this same policy)
    reliability: ReliabilityPolicy = field(default_factory=lambda: DEFAULT_RELIABILITY)
    stats_samples: int = 32
    stats_every: int = 32
    refresh_every: int = 16
    refresh_tol: float = 0.02
    hybrid_batches: int = 1
    transductive_prior: float = 16.0
    full_batch_reliable: float = 0.75
    input_shift: float = 0.15
    shift_min_samples: int = 64  # smaller requests are pooled for the input-shift test (its threshold is for 64)
    feature_shift: float = 0.6
    shift_ratio: float = 1.3
    shift_margin: float = 0.15
    entropy_momentum: float = 0.2
    rerun_on_shift: bool = True
    shift_full_batch: bool = True
    post_shift_stats: int = 0
    threads: int = 2
    # ONNX Runtime's intra-op workers spin between runs (true: one process-wide pool) or sleep (false: a pool per
    # session, spinning off); device/backend.py, docs/BENCHMARKS.md "Serving"
    ort_spinning: bool = True
    backend: str = "onnxruntime"
    device: str = "cpu"
    seed: int = 0
    input_range_policy: str = "reject"  # float inputs outside the bundle's value range: "reject" or "clip"
    good_snapshot_every: int = 64  # batches between snapshots of a plausible state (what a reset goes back to)
    stats_bounds: StatsBounds = field(default_factory=StatsBounds)


#: the engine's tuning knobs a device config may set by name (``DeviceConfig.engine``): every numeric or boolean
#: field that has no DeviceConfig field of its own
ENGINE_KNOBS: dict[str, type] = {
    f.name: {"float": float, "int": int, "bool": bool}[str(f.type)] for f in fields(EngineConfig)
    if str(f.type) in ("float", "int", "bool") and f.name != "threads"
}


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


class AdaptiveEngine:
    def __init__(self, bundle: B.Bundle, config: EngineConfig | None = None, backend: Backend | None = None):
        self.bundle = bundle
        self.config = config or EngineConfig()
        self.manifest = bundle.manifest
        self.num_classes = self.manifest.num_classes
        self.backend = backend or make_backend(bundle, self.config.backend, self.config.threads, self.config.device,
                                                  spinning=self.config.ort_spinning)
        self._rng = np.random.default_rng(self.config.seed)
        self._lock = threading.RLock()
        self.codec = bundle.codec(self.config.input_range_policy)
        self.base_params: ParamSet = dict(bundle.params)
        # plausibility is judged against the bundle's own (version 0) statistics, whatever version runs
        self.state_guard = StateGuard({n.name: (bundle.params[f"{n.name}.running_mean"],
                                          bundle.params[f"{n.name}.running_var"]) for n in self.manifest.norm_layers},
                                self.config.stats_bounds)
        self.guard_counters = {"stats_refused": 0, "state_resets": 0, "nonfinite_batches": 0}
        self.guard_last: dict | None = None  # {"event", "reason", "at_batch"} of the latest guard action
        self._last_good: dict[str, np.ndarray] | None = None
        self.param_version = 0
        detectors = load_all(bundle.calib, bundle.calib["head.weight"], bundle.calib["head.bias"])
        if self.config.ood_detector not in detectors:
            raise ValueError(f"OOD detector {self.config.ood_detector!r} not in the bundle: {sorted(detectors)}")
        self.detector = detectors[self.config.ood_detector]
        self.method = self._build_method(self.base_params)
        self._last_good = self.method.state_dict()
        self._folded_stats_version = -1
        self.batches = 0
        self._input_ema: tuple[float, float] | None = None
        self._shift_pool: list = [0, 0.0, 0.0, 0]  # small requests pooled for the input-shift test
        self._model_ref: tuple[float, np.ndarray] | None = None  # (entropy, feature mean) on the current session
        self._hybrid_left = 0
        self._stale = False
        self._folded_stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # a ``folds_mix`` method: the statistics its last in-batch mix normalized with, folded into the fast session
        # for the batches in between (None: none yet, the next adapting batch mixes)
        self._mix_fold: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self.transductive_batches = 0
        self.shifts = 0
        self.refreshes = 0
        self._post_shift_left = 0
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
        return self._params_with(self.base_params, self.method)

    def _fold_stats(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The statistics the fast session normalizes with: the method's, or for a ``folds_mix`` method the last
        in-batch mix's (the batches between two mixing batches are normalized as the last one was)."""
        if self.method.folds_mix and self._mix_fold is not None:
            return self._mix_fold
        return dict(self.method.forward_stats())

    def _fold_params(self) -> ParamSet:
        return self._params_with(self.base_params, self.method, self._fold_stats())

    def _drop_fold(self) -> None:
        """The folded in-batch mix no longer matches the state (reset, new parameters): the next batch mixes."""
        self._mix_fold = None

    def _keep_mix(self, prior: ParamSet, batch_stats, mix: np.ndarray) -> None:
        """Remember the statistics a mixing batch normalized with (prior + w (batch - prior), per layer, as the
        adaptive graph mixes them) for the fast session of the batches that follow."""
        reason = self.state_guard.check_stats(batch_stats, "batch statistics")
        if reason is not None:
            # the guard refuses these statistics for the state, and the fold does not take them either: the fast
            # session keeps the method's own until the next mixing batch (not a mix on every batch); counted
            self.guard_counters["stats_refused"] += 1
            self._guard_event("stats_refused", reason)
            self._mix_fold = dict(self.method.forward_stats())
            self._stale = True
            return
        fold = {}
        for i, n in enumerate(self.manifest.norm_layers):
            rm, rv = prior[f"{n.name}.running_mean"], prior[f"{n.name}.running_var"]
            bm, bv = batch_stats[n.name]
            w = np.float32(mix[i])
            fold[n.name] = ((rm + w * (bm - rm)).astype(np.float32), (rv + w * (bv - rv)).astype(np.float32))
        self._mix_fold = fold
        self._stale = True

    def domain_signature(self) -> np.ndarray:
        """The statistics this device normalizes with now, as a domain signature against the bundle's own
        (core/domain_signature.py): what the cloud groups devices by."""
        from edgeadapt.core.domain_signature import signature

        with self._lock:
            stats = dict(self.method.forward_stats())
        layers = [n.name for n in self.manifest.norm_layers]
        ref = {n: (self.bundle.params[f"{n}.running_mean"], self.bundle.params[f"{n}.running_var"]) for n in layers}
        return signature(stats, ref, layers)

    @property
    def folded_stats_version(self) -> int:
        """Which adapted statistics the fast-path session holds (changes at every refold)."""
        return self._folded_stats_version

    def logits_for(self, x: np.ndarray, base: ParamSet, stat_mix: np.ndarray | None) -> np.ndarray:
        """Logits of prepared inputs ``x`` for base parameters ``base`` with the method's current statistics and
        the given in-batch mix: the update watch runs two versions exactly the way a batch was served."""
        stats = self._fold_stats() if stat_mix is None else None  # a fast-path batch: the folded statistics
        return self.backend.run_adaptive(x, self._params_with(base, self.method, stats), stat_mix).logits

    def _refresh(self, force: bool = False) -> None:
        v = self.method.stats_version
        if force or v != self._folded_stats_version:
            self.backend.set_params(self._fold_params())
            self._folded_stats_version = v
            self._folded_stats = self._fold_stats()
            self._model_ref = None  # outputs move with the parameters: not a domain shift
            self.refreshes += 1

    def _stats_moved(self) -> float:
        """How far the adapted statistics moved since they were last folded: the largest over layers of the
        channel-averaged |mean change| / std plus |variance ratio - 1|. Small moves are not worth a session
        rebuild (a few ms), so the fast path refolds only past ``refresh_tol``."""
        folded = self._folded_stats
        worst = 0.0
        for layer, (mean, var) in self._fold_stats().items():
            if layer not in folded:
                return float("inf")
            m0, v0 = folded[layer]
            sd = np.sqrt(v0 + 1e-5)
            moved = float(np.mean(np.abs(mean - m0) / sd) + np.mean(np.abs((var + 1e-5) / (v0 + 1e-5) - 1)))
            worst = max(worst, moved)
        return worst

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
            self._drop_fold()  # the last mix was of the old parameters' activations
            if session is not None:
                self.backend.swap_static(session)
                self._folded_stats_version = method.stats_version
                self._folded_stats = dict(method.forward_stats())
                self._model_ref = None
            else:
                self._refresh(force=True)

    @staticmethod
    def _params_with(base: ParamSet, method: AdaptationMethod, stats=None) -> ParamSet:
        params = dict(base)
        for layer, (mean, var) in (method.forward_stats() if stats is None else stats).items():
            params[f"{layer}.running_mean"] = np.asarray(mean, np.float32)
            params[f"{layer}.running_var"] = np.asarray(var, np.float32)
        return params

    def reset(self) -> None:
        with self._lock:
            self.method.reset()
            self.detector.reset_domain()
            self._drop_fold()
            self._refresh(force=True)

    # -- input -------------------------------------------------------------------------------------
    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Validate (shape, dtype, finiteness, declared value range) and normalize for the graphs."""
        return self.codec.normalize(self.codec.validate(x))

    # -- the guard ---------------------------------------------------------------------------------
    def _guard_event(self, event: str, reason: str) -> None:
        self.guard_last = {"event": event, "reason": reason, "at_batch": self.batches}

    def _update_stats(self, method: AdaptationMethod, batch_stats, n: int, info: BatchInfo) -> bool:
        """``method.update_stats`` behind the guard: implausible batch statistics never reach the state, and a
        state that is not plausible after the update goes back to the last good snapshot."""
        reason = self.state_guard.check_stats(batch_stats, "batch statistics")
        if reason is not None:
            self.guard_counters["stats_refused"] += 1
            self._guard_event("stats_refused", reason)
            return False
        method.update_stats(batch_stats, n, info)
        reason = self.state_guard.check_stats(method.forward_stats(), "adapted statistics")
        if reason is not None:
            self._reset_to_last_good(reason)
            return False
        return True

    def _reset_to_last_good(self, reason: str) -> None:
        self.guard_counters["state_resets"] += 1
        self._guard_event("state_reset", reason)
        good = self._last_good
        try:
            if good is None:
                raise ValueError("no snapshot")
            self.method.load_state_dict(good)
        except ValueError:
            self.method.reset()
        self._drop_fold()
        self._refresh(force=True)

    def state_problem(self, state: dict[str, np.ndarray] | None = None) -> str | None:
        """Why the (given or current) method state must not be saved or served, or None."""
        method = self.method
        if state is not None:
            method = self._build_method(self.base_params)
            method.load_state_dict(state)
        reason = self.state_guard.check_finite(method.state_dict())
        return reason or self.state_guard.check_stats(method.forward_stats(), "adapted statistics")

    def _snapshot_if_good(self) -> None:
        if self.state_problem() is None:
            self._last_good = self.method.state_dict()

    def _recover_nonfinite(self, x: np.ndarray, out):
        """The batch's logits are not finite: answer it from the last good state, else the source state, else the
        bundle's version-0 parameters (a bad update; the updater's watch rolls it back)."""
        self.guard_counters["nonfinite_batches"] += 1
        self._reset_to_last_good("non-finite logits")
        out = self.backend.run_static(x)
        if np.isfinite(out.logits).all():
            return out
        self.method.reset()
        self._drop_fold()
        self._refresh(force=True)
        out = self.backend.run_static(x)
        if np.isfinite(out.logits).all():
            return out
        return self.backend.run_adaptive(x, dict(self.bundle.params), None)

    # -- the loop ----------------------------------------------------------------------------------
    def process(self, x: np.ndarray, adapt: bool = True, validated: bool = False) -> BatchResult:
        """One batch. ``validated=True``: ``x`` came out of this engine's ``codec.check`` (the daemon's input
        boundary checks every request there): it is only normalized, not checked a second time."""
        xf = self.codec.normalize(x) if validated else self.prepare(x)
        with self._lock:
            return self._process(xf, adapt)

    def _transductive_mix(self, n: int) -> np.ndarray:
        w = n / (self.config.transductive_prior + n)
        return np.full(len(self.manifest.norm_layers), w, np.float32)

    def _process(self, x: np.ndarray, adapt: bool) -> BatchResult:
        n = len(x)
        method = self.method
        c = self.config
        mix = chosen = method.forward_mix(n) if adapt else None
        if method.last_batch_skewed():
            self._hybrid_left = 0  # label-skewed stream: never normalize with a skewed batch's own statistics
        # a change of the input's own moments is visible before the forward: the shifted batch goes straight
        # to the adaptive graph instead of running twice
        shift = adapt and self._input_shifted(x)
        if shift:
            self._on_shift(method)
        if mix is None and adapt and method.needs_stats and self._hybrid_left > 0:
            mix = self._transductive_mix(n)
            self._hybrid_left -= 1
        elif mix is not None and self._hybrid_left > 0:
            self._hybrid_left -= 1  # the batch mixes anyway: it is the shift's mixing batch
        if mix is None and adapt and method.folds_mix and self._mix_fold is None and not method.last_batch_skewed():
            mix = self._transductive_mix(n)  # nothing folded yet (start, reset, a new version): this batch mixes
        prior = None
        if mix is not None:
            prior = self.current_params()
            out = self.backend.run_adaptive(x, prior, mix)
        else:
            if adapt and self._stale:
                self._stale = False
                if self._stats_moved() > c.refresh_tol:
                    self._refresh(force=True)
            out = self.backend.run_static(x)
        if not np.isfinite(out.logits).all():
            out = self._recover_nonfinite(x, out)
            method, mix = self.method, None
        entropy = entropy_from_logits(out.logits)
        if adapt and mix is None and not shift and self._output_shifted(float(entropy.mean()), out.features):
            shift = True
            self._on_shift(method)
            if method.needs_stats and self._hybrid_left > 0 and c.rerun_on_shift and not (
                    method.detects_skew(out.logits)):
                # predict the shifted batch with its own statistics instead of the stale ones
                mix = self._transductive_mix(n)
                prior = self.current_params()
                out = self.backend.run_adaptive(x, prior, mix)
                entropy = entropy_from_logits(out.logits)
                self._hybrid_left -= 1
        if mix is not None:
            self.transductive_batches += 1
            if adapt and chosen is None:
                method.on_mixed()
            if adapt and method.folds_mix and out.batch_stats is not None and method is self.method:
                self._keep_mix(prior, out.batch_stats, mix)
        logits, feats = out.logits, out.features
        if adapt and self.method.name != "none":
            # an online detector follows the domain with the batch it is about to score (as the norm does); a
            # device that does not adapt (method none) keeps the source detector: the same input, the same answer
            self.detector.observe(logits, feats, shift)
        ood_score = self.detector.score(logits, feats)
        ood = ood_score > self.detector.threshold
        ood_frac = float(ood.mean())
        reliable = c.reliability.adapt_mask(entropy, ood, self.num_classes)
        info = BatchInfo(reliable=reliable, ood=ood, entropy=entropy, logits=logits)
        stats_run = False
        if adapt:
            if method.owns_stats_inputs:
                # the method picks the inputs (e.g. its class-balanced memory) and may use the forward's own
                # batch statistics: same graph, same guard
                if out.batch_stats is not None and mix is not None:
                    reason = self.state_guard.check_stats(out.batch_stats, "batch statistics")
                    if reason is None:
                        info.batch_stats = out.batch_stats
                    else:
                        self.guard_counters["stats_refused"] += 1
                        self._guard_event("stats_refused", reason)
                req = method.stats_inputs(x, info)
                reqs = [] if req is None else req if isinstance(req, list) else [req]
                for inputs, req_mix in reqs:  # in order: each goes to update_stats behind the guard
                    if len(inputs):
                        st = self.backend.run_adaptive(inputs, self.current_params(), req_mix)
                        stats_run = self._update_stats(method, st.batch_stats, len(inputs), info) or stats_run
                if not reqs and info.batch_stats is not None:
                    reason = self.state_guard.check_stats(method.forward_stats(), "adapted statistics")
                    if reason is not None:
                        self._reset_to_last_good(reason)
                    stats_run = reason is None
            elif method.needs_stats and shift and mix is not None and out.batch_stats is not None \
                    and c.shift_full_batch and not c.reliability.is_domain_shift(ood):
                # the first batch of a new domain: its own statistics (all of it, as the transductive forward
                # used them) are the best estimate there is; the reliability filter would leave a handful
                stats_run = self._update_stats(method, out.batch_stats, n, info)
            elif method.needs_stats and reliable.any():
                if mix is not None and out.batch_stats is not None and reliable.mean() >= c.full_batch_reliable:
                    # the forward already computed this batch's statistics; most of it is reliable
                    stats_run = self._update_stats(method, out.batch_stats, int(reliable.sum()), info)
                elif mix is not None or self.batches % c.stats_every == 0 or self._post_shift_left > 0:
                    idx = np.flatnonzero(reliable)
                    if len(idx) > c.stats_samples:
                        idx = np.sort(self._rng.choice(idx, c.stats_samples, replace=False))
                    st = self.backend.run_adaptive(x[idx], self.current_params(), None)
                    stats_run = self._update_stats(method, st.batch_stats, len(idx), info)
            if not shift and self._post_shift_left > 0:
                self._post_shift_left -= 1
                self._stale = True
            logits = method.adjust(logits, feats, info)
            if method.stats_version != self._folded_stats_version and (
                    self.batches % (method.refresh_every or c.refresh_every) == 0 or mix is not None):
                self._stale = True
        self.batches += 1
        if adapt and self.batches % c.good_snapshot_every == 0:
            self._snapshot_if_good()
        probs = softmax(logits)
        return BatchResult(
            logits=logits, probs=probs, pred=probs.argmax(1), entropy=entropy, ood_score=ood_score, ood=ood,
            reliable=reliable, param_version=self.param_version,
            info={"ood_fraction": ood_frac, "stats_run": stats_run, "n": n, "shift": shift,
                  "transductive": mix is not None, "stat_mix": mix},
        )

    def _on_shift(self, method: AdaptationMethod) -> None:
        self.shifts += 1
        method.on_shift()
        self._model_ref = None  # the new domain's outputs become the reference once it runs on the fast path
        self._post_shift_left = self.config.post_shift_stats
        if method.needs_stats and not method.owns_stats_inputs and not method.last_batch_skewed():
            self._hybrid_left = self.config.hybrid_batches

    def _input_shifted(self, x: np.ndarray) -> bool:
        """A change of the input's first or second moment (brightness, contrast, noise) beyond batch-to-batch
        noise, against a running average. Computed on every 4th value: the moments of 64 images barely move."""
        c = self.config
        sub = x.reshape(-1)[::4].astype(np.float64)
        if len(x) < c.shift_min_samples:
            # one image's moments are not a domain's: pool small requests until there are enough to compare (at
            # batch 1 the per-image test fired on 84% of requests of an i.i.d. stream)
            acc = self._shift_pool
            acc[0] += len(x)
            acc[1] += float(sub.sum())
            acc[2] += float((sub * sub).sum())
            acc[3] += sub.size
            if acc[0] < c.shift_min_samples:
                return False
            xm = acc[1] / acc[3]
            xs = math.sqrt(max(acc[2] / acc[3] - xm * xm, 0.0))
            self._shift_pool = [0, 0.0, 0.0, 0]
        else:
            xm, xs = float(sub.mean()), float(sub.std())
        if self._input_ema is None:  # a new stream is a new domain until shown otherwise
            self._input_ema = (xm, xs)
            return True
        pm, ps = self._input_ema
        if abs(xm - pm) > c.input_shift * ps or abs(xs / max(ps, 1e-6) - 1) > c.input_shift:
            self._input_ema = (xm, xs)
            return True
        m = c.entropy_momentum
        self._input_ema = ((1 - m) * pm + m * xm, (1 - m) * ps + m * xs)
        return False

    def _output_shifted(self, mean_entropy: float, feats: np.ndarray) -> bool:
        """A jump of the batch's mean entropy or a move of its mean penultimate feature, compared only with
        earlier batches of the same fast-path session: transductive batches and refolds change the outputs by
        themselves, so the reference restarts after each (otherwise the engine would chase its own tail)."""
        c = self.config
        fm = feats.mean(0)
        if self._model_ref is None:
            self._model_ref = (mean_entropy, fm)
            return False
        prev, pf = self._model_ref
        feat_change = float(np.linalg.norm(fm - pf) / max(float(np.linalg.norm(pf)), 1e-6))
        if (mean_entropy > prev * c.shift_ratio and mean_entropy > prev + c.shift_margin) or \
                feat_change > c.feature_shift:
            return True
        m = c.entropy_momentum
        self._model_ref = ((1 - m) * prev + m * mean_entropy, (1 - m) * pf + m * fm)
        return False

    # -- persistence -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        with self._lock:
            state = {f"method.{k}": v for k, v in self.method.state_dict().items()}
            state["engine.batches"] = np.array([self.batches], np.int64)
            return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Install a saved state; ValueError when it does not fit the method or is not finite and plausible (a
        poisoned state is never restored)."""
        with self._lock:
            mstate = {k[len("method."):]: v for k, v in state.items() if k.startswith("method.")}
            problem = self.state_problem(mstate)
            if problem is not None:
                raise ValueError(f"saved state refused: {problem}")
            self.method.load_state_dict(mstate)
            self._last_good = self.method.state_dict()
            if "engine.batches" in state:
                self.batches = int(state["engine.batches"][0])
            self._refresh(force=True)
