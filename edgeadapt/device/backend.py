"""Inference backends behind one interface (numpy in, numpy out; no torch).

ONNX Runtime: the static graph is the fast path. A parameter set (adapted statistics, a cloud update) is
applied by writing it into the static graph's initializers and building a new session, which folds the
BatchNorms into the convolutions again; the session is swapped in atomically between batches. The
adaptive graph (batch statistics, overridable tensors) runs only when a method needs it.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from edgeadapt.core import bundle as B
from edgeadapt.core.tensorfile import ParamSet

STAT_MIX = "stat_mix"
log = logging.getLogger(__name__)


@dataclass
class ForwardResult:
    logits: np.ndarray
    features: np.ndarray
    batch_stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None


class Backend(ABC):
    name: str = "base"

    @abstractmethod
    def run_static(self, x: np.ndarray) -> ForwardResult:
        """Predict with the current folded parameter set (fast path)."""

    @abstractmethod
    def run_adaptive(self, x: np.ndarray, params: ParamSet, stat_mix: np.ndarray | None) -> ForwardResult:
        """Run the adaptive graph with explicit tensors; returns batch statistics per BatchNorm layer."""

    @abstractmethod
    def set_params(self, params: ParamSet) -> None:
        """Fold a full adaptable parameter set into the fast path (atomic swap)."""


_POOL = {"threads": None}  # the process-wide ONNX Runtime thread pool, once configured


def single_threaded_blas() -> bool:
    """Run numpy's BLAS/LAPACK (OpenBLAS here) on one thread for the rest of the process; -> whether it could.

    Why: the model runs in ONNX Runtime's own pool; what numpy computes on the device (OOD detectors' D x D
    covariances and their eigendecompositions, statistics) is small, where OpenBLAS's extra threads only
    synchronize and spin. On the 2-core machine, beside other load, a 64 x 64 pseudo-inverse took 87 ms with
    OpenBLAS's 2 threads and 0.9 ms with 1 (docs/BENCHMARKS.md "Serving"): at one image per request that was
    nearly all of the daemon's time per request. The daemon and its benchmarks call this; library users keep
    their own setting."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; without it numpy keeps its default
        log.warning("threadpoolctl is not installed: numpy's BLAS keeps its default thread count")
        return False
    threadpool_limits(1, user_api="blas")
    return True


def _shared_pool(threads: int) -> bool:
    """Configure one intra-op thread pool for every session of this process (the static session, its rebuilt
    successors and the adaptive session). With a pool per session, the idle session's workers keep spinning
    while the other runs: on 2 cores a static batch right after an adaptive one took 2x as long, and every
    rebuilt session started new threads. The sizes are fixed once the pool exists (first session to use it)."""
    import onnxruntime.capi._pybind_state as ort_state

    if _POOL["threads"] is None:
        try:
            ort_state.set_global_thread_pool_sizes(threads, 1)
            _POOL["threads"] = threads
        except Exception:  # already created in this process (by an earlier backend): share it as it is
            _POOL["threads"] = -1
    return True


def session_options(threads: int = 2):
    """SessionOptions for any ONNX Runtime session of this process: once the shared pool exists, ORT refuses
    sessions that ask for their own threads, so every session (export checks, verify, benchmarks) goes
    through here."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if _POOL["threads"] is not None:
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError("device=cuda requested but onnxruntime has no CUDAExecutionProvider here")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle: B.Bundle, threads: int = 2, device: str = "cpu", shared_threads: bool = True,
                 spinning: bool = True):
        """``spinning=False``: each session gets its own intra-op pool whose workers sleep between runs instead of
        spinning (ORT's Python API can turn spinning off only per session, not for the shared pool); with
        spinning off an idle session's pool costs nothing, so the reason for sharing one goes away."""
        import onnx
        import onnxruntime as ort

        self._ort = ort
        self.bundle = bundle
        self.threads = threads
        self.spinning = spinning or threads <= 1  # one thread: no pool worker, nothing spins
        self._own_pool = not self.spinning and _POOL["threads"] is None
        if shared_threads and not self._own_pool:
            _shared_pool(threads)
        self.providers = _providers(device)
        self._static_model = onnx.load(str(bundle.static_graph))
        self._init_index = {t.name: i for i, t in enumerate(self._static_model.graph.initializer)}
        missing = [n for n in bundle.params if n not in self._init_index]
        if missing:
            raise B.BundleError(f"static graph lacks initializers for adaptable tensors: {missing[:5]}")
        self._lock = threading.Lock()  # guards the static-model proto while serializing
        self._static = self._build_static(bundle.params)
        self._adaptive = ort.InferenceSession(str(bundle.adaptive_graph), self._options(), providers=self.providers)
        self._layers = [n.name for n in bundle.manifest.norm_layers]
        self._adaptive_outputs = ["logits", "features"] + [
            f"{layer}.batch_{s}" for layer in self._layers for s in ("mean", "var")
        ]

    def _options(self):
        so = session_options(self.threads)
        if self._own_pool:
            so.use_per_session_threads = True
            so.intra_op_num_threads = self.threads
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.log_severity_level = 3
        so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return so

    def _build_static(self, params: ParamSet):
        from onnx import numpy_helper

        with self._lock:
            inits = self._static_model.graph.initializer
            for name, value in params.items():
                inits[self._init_index[name]].CopyFrom(
                    numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name)
                )
            data = self._static_model.SerializeToString()
        return self._ort.InferenceSession(data, self._options(), providers=self.providers)

    def build_static(self, params: ParamSet):
        """Build (off the hot path) a session for ``params``; pass it to ``swap_static``."""
        return self._build_static(params)

    def swap_static(self, session) -> None:
        self._static = session  # a single reference assignment: atomic for concurrent readers

    def set_params(self, params: ParamSet) -> None:
        self.swap_static(self._build_static(params))

    def run_static(self, x: np.ndarray) -> ForwardResult:
        logits, feats = self._static.run(["logits", "features"], {"input": x})
        return ForwardResult(logits, feats)

    def run_adaptive(self, x: np.ndarray, params: ParamSet, stat_mix: np.ndarray | None) -> ForwardResult:
        feeds = {"input": x, **params}
        if self._layers:
            feeds[STAT_MIX] = (np.zeros(len(self._layers), np.float32) if stat_mix is None
                               else np.asarray(stat_mix, np.float32))
        outs = self._adaptive.run(self._adaptive_outputs, feeds)
        stats = {layer: (outs[2 + 2 * i], outs[3 + 2 * i]) for i, layer in enumerate(self._layers)}
        return ForwardResult(outs[0], outs[1], stats)


def make_backend(bundle: B.Bundle, kind: str = "onnxruntime", threads: int = 2, device: str = "cpu",
                 spinning: bool = True) -> Backend:
    if kind in ("onnxruntime", "ort"):
        return OrtBackend(bundle, threads=threads, device=device, spinning=spinning)
    if kind == "tensorrt":
        raise ValueError("the TensorRT backend is not available in this release: the bundle's engine.plan is "
                         "built with REFIT (export profile tensorrt-fp16), but the device runs ONNX Runtime")
    raise ValueError(f"unknown backend {kind!r}: use onnxruntime or tensorrt")
