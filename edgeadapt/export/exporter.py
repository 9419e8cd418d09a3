"""torch model -> verified bundle (DESIGN §3, §11).

The model is exported once with normalization nodes preserved; graph_surgery derives the static and the
adaptive graph from that one export; both are checked against torch (max |Δlogit| relative to the logits'
scale, at the calibration batch, at batch 1 and at an odd batch) and nothing is written unless both pass.
Inputs go through the bundle's own input codec (``core/input_codec.py``), so the graphs see exactly what a
device feeds them. Calibration runs the static graph on clean data to fit OOD detectors and entropy stats.

One copy of the weights: ``source.safetensors`` is written first and both graphs point their initializers into
it as ONNX external data (offsets of the safetensors layout), so the bundle holds the weights once.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeadapt.core import bundle as B
from edgeadapt.core.input_codec import InputCodec, InputError
from edgeadapt.core.mathops import entropy_from_logits
from edgeadapt.core.tensorfile import save_params
from edgeadapt.export import graph_surgery as GS
from edgeadapt.export.profile import ExportProfile
from edgeadapt.export.verify import relative_tolerance

#: what export supports, said in every refusal that is about the model's structure
SUPPORTED = ("supported: CNNs with BatchNorm2d, LayerNorm (incl. channels-last) or GroupNorm, and vision "
             "transformers with LayerNorm and nn.MultiheadAttention or F.scaled_dot_product_attention, ending in "
             "an nn.Linear head")
#: norm layers the adaptive graph cannot handle: refused with a line naming them, not a failure deep in ONNX
UNSUPPORTED_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm3d, nn.SyncBatchNorm)
#: the batch sizes parity is checked at besides the calibration batch (1 and an odd one)
EXTRA_PARITY_BATCHES = (1, 5)
#: elements of one calibration batch (inputs): 16 MB of float32, whatever the resolution (256 at 1x32x32,
#: 27 at 3x224x224); a fixed 256 at 224x224 took ~1 GB of activations in ONNX Runtime alone
CALIB_BATCH_ELEMS = 1 << 22
#: class-conditional OOD detectors need this many calibration samples in the median class
MIN_SAMPLES_PER_CLASS = 5
CLASS_CONDITIONAL = ("mahalanobis", "rmds")
COVARIANCE_DETECTORS = ("mahalanobis", "rmds", "vim")


class ExportError(Exception):
    """Export refused: the message says why and what to do."""


class ParityError(ExportError):
    pass


@dataclass
class ExportSpec:
    arch: str
    model_name: str
    labels: list[str]
    input_shape: list[int]
    arch_kwargs: dict = field(default_factory=dict)
    adapters: dict = field(default_factory=dict)
    cloud_public_key: str | None = None
    model_version: str = "1"
    #: value range, mean/std, uint8 scale as the model was trained (``shape`` is taken from input_shape);
    #: None = [0, 1] values, uint8 / 255, no normalization
    input: B.InputSpec | None = None

    def input_spec(self) -> B.InputSpec:
        base = self.input or B.InputSpec(shape=list(self.input_shape))
        return base.model_copy(update={"shape": [int(d) for d in self.input_shape]})


def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ExportError(f"the model has no nn.Linear classifier head (the last nn.Linear is taken as the "
                          f"head); {SUPPORTED}")
    return linears[-1]


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) and not isinstance(m, UNSUPPORTED_NORMS)]


def _check_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    bad = [(n, type(m).__name__) for n, m in model.named_modules() if isinstance(m, UNSUPPORTED_NORMS)]
    if bad:
        names = ", ".join(f"{n} ({t})" for n, t in bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise ExportError(f"unsupported normalization layer {names}: the adaptive graph mixes batch statistics of "
                          f"4-D BatchNorm2d only; {SUPPORTED}. Replace it (e.g. BatchNorm1d on [N, C] by LayerNorm) "
                          "or fold it into the neighbouring layer before export")
    norms = norm_modules(model)
    if not norms:
        raise ExportError("the model has no normalization layer: forward-only adaptation needs normalization "
                          f"statistics or affine parameters to adapt; {SUPPORTED}")
    if not any(getattr(m, "weight", None) is not None or isinstance(m, nn.BatchNorm2d) for _, m in norms):
        raise ExportError("the model's LayerNorm/GroupNorm layers have no affine parameters (elementwise_affine / "
                          "affine = False): nothing to adapt; keep the affine parameters")
    return norms


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """nn.MultiheadAttention in eval mode without grad takes PyTorch's fused fast path
    (``aten::_native_multi_head_attention``), which has no ONNX export; the plain path exports."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:  # pragma: no cover - torch < 2.1
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """The TorchScript exporter's C++ side prints the whole IR graph (std::cout) when an operator fails; the
    refusal is one line, so during the export fds 1 and 2 go to a scratch file (fd level: C++ bypasses
    sys.stdout)."""
    import os
    import sys

    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
    except (OSError, ValueError, AttributeError):  # no real fds (embedded interpreter): leave them alone
        yield
        return
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 1)
        os.dup2(scratch.fileno(), 2)
        try:
            yield
        finally:
            for fd, old in zip((1, 2), saved, strict=True):
                os.dup2(old, fd)
                os.close(old)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:240]


def _export_failure(exc: BaseException, opset: int) -> str:
    text = str(exc)
    m = re.search(r"operator '?((?:aten|prim|onnx)::\w+)'?", text) or re.search(r"((?:aten|prim)::\w+)", text)
    if m:
        return (f"ONNX export failed: operator {m.group(1)} cannot be exported at opset {opset}; {SUPPORTED}. "
                "Rewrite that part of forward() with standard torch ops (or raise `opset` in an export profile, "
                "up to 21) and export again")
    return (f"ONNX export failed ({type(exc).__name__}: {_first_line(exc)}); {SUPPORTED}. forward() must be "
            "traceable: tensors in, tensors out, no data-dependent Python control flow or .item()/numpy calls")


def _onnx_export(model: nn.Module, example: torch.Tensor, opset: int) -> tuple[onnx.ModelProto, list[str]]:
    """The one export (normalization nodes preserved, no constant folding: state-dict names survive) and the
    tracer's warnings (a Python number taken from a tensor size is one way to bake the batch size)."""
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught, _no_mha_fastpath(), _quiet_native_output():
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                model, (example,), buf, input_names=["input"], output_names=[GS.LOGITS],
                dynamic_axes={"input": {0: "N"}, GS.LOGITS: {0: "N"}}, opset_version=opset, dynamo=False,
                training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
            )
        except Exception as exc:
            raise ExportError(_export_failure(exc, opset)) from None
    notes = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    return onnx.load_from_string(buf.getvalue()), notes


def _ort_session(model: onnx.ModelProto | bytes | str | Path, threads: int = 2):
    """An export-time session: no memory arena, so the memory of one check is returned before the next."""
    import onnxruntime as ort

    from edgeadapt.device.backend import session_options

    so = session_options(threads)
    so.enable_cpu_mem_arena = False
    so.log_severity_level = 4  # a failing batch-size check is reported as one line, not an ORT log record
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    if isinstance(data, Path):
        data = str(data)
    try:
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load the exported graph ({_first_line(exc)}); {SUPPORTED}. "
                          "An operator the runtime lacks must be rewritten with standard torch ops") from None


def _batches(x: np.ndarray, size: int):
    for i in range(0, len(x), size):
        yield x[i : i + size]


def calib_batch_size(sample_elems: int) -> int:
    """Calibration batch for one sample size: bounded in elements, not in samples (export memory)."""
    return int(max(1, min(256, CALIB_BATCH_ELEMS // max(1, sample_elems))))


def _torch_logits(model: nn.Module, x: np.ndarray, batch: int | None = None) -> np.ndarray:
    """torch's logits for ``x``, in batches of ``batch`` (eval mode: each sample's logits are its own)."""
    batch = batch or len(x)
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(np.ascontiguousarray(xb))).numpy()
                               for xb in _batches(x, batch)])


def trace_batch(parity_batch: int, sample_elems: int) -> int:
    """The batch the model is traced (and the parity set is run) at: bounded in elements like calibration
    (export memory), never 1 or 5, so the checks at 1 and 5 catch a graph that baked its batch size."""
    n = min(parity_batch, max(2, calib_batch_size(sample_elems)))
    return n + 1 if n in EXTRA_PARITY_BATCHES else n


def _baked_batch_message(n: int, b: int, detail: str, notes: list[str]) -> str:
    hint = f" (the tracer warned: {notes[0]})" if notes else ""
    return (f"the exported graph fixes the batch size at {n}: at batch {b} {detail}{hint}. forward() turns a tensor "
            "size into a Python number (len(x), int(x.shape[0]), a size stored on the module), which the ONNX tracer "
            "records as a constant. Use shape-agnostic ops (torch.flatten(x, 1), x.reshape(x.shape[0], -1), "
            "x.view(-1, C)) and export again — bundle not written")


def parity_checks(model: nn.Module, xs: np.ndarray, ref: np.ndarray, trace_n: int
                  ) -> list[tuple[slice, np.ndarray]]:
    """(inputs, torch's logits) pairs: the whole parity set in batches of the traced size, then batch 1 and 5."""
    checks = [(slice(i, i + trace_n), ref[i : i + trace_n]) for i in range(0, len(xs), trace_n)]
    return checks + [(slice(0, b), _torch_logits(model, xs[:b])) for b in EXTRA_PARITY_BATCHES if b <= len(xs)]


def check_parity(name: str, session, extra: dict[str, np.ndarray], xs: np.ndarray, ref: np.ndarray,
                 checks: list[tuple[slice, np.ndarray]], profile: ExportProfile, notes: list[str],
                 trace_n: int) -> float:
    """One graph vs torch on every check; returns its worst |Δlogit| or raises ParityError (one line that says
    what failed and what to do)."""
    tol = relative_tolerance(profile.parity_tolerance, ref)
    worst, at = -1.0, 0
    for sl, want in checks:
        xb = xs[sl]
        b = len(xb)
        try:
            got = session.run([GS.LOGITS], {"input": xb, **extra})[0]
        except Exception as exc:
            if b == trace_n:
                raise ExportError(f"the {name} graph fails in ONNX Runtime ({_first_line(exc)}); {SUPPORTED}") \
                    from None
            raise ParityError(_baked_batch_message(trace_n, b, f"ONNX Runtime fails ({_first_line(exc)})",
                                                   notes)) from None
        if got.shape != want.shape:
            raise ParityError(_baked_batch_message(trace_n, b, f"the {name} graph answers shape {list(got.shape)}",
                                                   notes))
        d = float(np.abs(got - want).max())
        if not d <= worst:
            worst, at = d, b
    if not worst <= tol:
        raise ParityError(
            f"parity check failed (tolerance {profile.parity_tolerance:g} x max(1, max|logit| "
            f"{float(np.abs(ref).max()):.3g}) = {tol:.3g}): {name} graph max |Δlogit| = {worst:.3g} at batch {at}. "
            "An operator computes differently in ONNX (randomness or buffer updates in eval mode, data-dependent "
            "Python control flow); if it is only float rounding, raise parity_tolerance in an export profile "
            "(--profile) — bundle not written")
    return worst


def export_bundle(
    model: nn.Module,
    spec: ExportSpec,
    calib_x: np.ndarray,
    calib_y: np.ndarray,
    out_dir: str | Path,
    profile: ExportProfile,
    progress: Callable[[str], None] | None = None,
) -> B.BundleManifest:
    """Export ``model`` to a bundle at ``out_dir`` (replaced atomically) or raise ExportError with one line
    that says why. ``manifest.warnings`` lists what was exported but is weak (e.g. too few calibration samples
    for class-conditional OOD detectors); each is also passed to ``progress``."""
    out_dir = Path(out_dir)
    say = progress or (lambda msg: None)
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    norms = _check_layers(model)
    head_name, head = find_head(model)
    try:
        codec = InputCodec(spec.input_spec())
    except ValueError as exc:
        raise ExportError(f"input spec: {exc}") from None
    if calib_x.ndim != 4 or list(calib_x.shape[1:]) != list(spec.input_shape):
        raise ExportError(
            f"calibration data has shape {list(calib_x.shape)}, the model input is [N, {spec.input_shape}]"
        )
    calib_y = np.asarray(calib_y).astype(np.int64).ravel()
    if len(calib_y) != len(calib_x):
        raise ExportError(f"calibration data has {len(calib_x)} inputs but {len(calib_y)} labels")
    if len(calib_x) < profile.parity_batch:
        raise ExportError(f"need at least {profile.parity_batch} calibration samples, got {len(calib_x)}")
    try:
        stored = codec.to_upload(codec.validate(calib_x[: profile.parity_batch]))
    except InputError as exc:
        raise ExportError(f"calibration data: {exc}; if the model takes another range, say so (--value-range, "
                          "--mean/--std)") from None
    # parity inputs are kept as a client sends them (uint8 images; float16 where uint8 cannot hold the range):
    # the reference logits are computed from exactly those, normalized by the codec the device uses
    xs = codec.normalize(stored)
    trace_n = trace_batch(len(xs), codec.sample_elems)
    try:
        ref_logits = _torch_logits(model, xs, trace_n)
    except Exception as exc:
        raise ExportError(f"the model failed on an input of shape {list(xs.shape)}: {_first_line(exc)}") from None
    if ref_logits.ndim != 2 or ref_logits.shape[1] != len(spec.labels):
        raise ExportError(f"model output shape {list(ref_logits.shape)} does not match {len(spec.labels)} labels")
    if calib_y.size and (calib_y.min() < 0 or calib_y.max() >= len(spec.labels)):
        raise ExportError(f"calibration labels must lie in [0, {len(spec.labels)})")

    say("exporting ONNX")
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()
             if v.dtype.is_floating_point}
    base, tracer_notes = _onnx_export(model, torch.from_numpy(xs[:trace_n]), profile.opset)
    GS.dealias_identities(base, state)
    # BatchNorm and LayerNorm are single ONNX nodes; GroupNorm (opset < 18) is not, so it is found by module name
    groupnorms = [(n, "groupnorm", float(m.eps)) for n, m in norms if isinstance(m, nn.GroupNorm)]
    nodes = GS.find_norm_nodes(base) + GS.affine_norm_nodes(base, groupnorms)
    if not nodes:
        raise ExportError("no normalization layer survived ONNX export as named tensors; cannot build an adaptive "
                          f"graph; {SUPPORTED}")
    adaptable: list[B.AdaptableTensor] = []
    norm_layers: list[B.NormLayer] = []
    for nn_ in nodes:
        for role, tname in nn_.tensors.items():
            kind = "norm_stats" if role.startswith("running_") else "norm_affine"
            adaptable.append(B.AdaptableTensor(name=tname, shape=list(state[tname].shape), kind=kind, layer=nn_.layer))
        if nn_.kind == "batchnorm":  # only BatchNorm has batch statistics to mix; LN/GN adapt their affine
            norm_layers.append(B.NormLayer(name=nn_.layer, channels=int(state[nn_.tensors["weight"]].shape[0]),
                                           eps=nn_.eps))
    for name in state:
        if ".adapter." in name:
            adaptable.append(B.AdaptableTensor(name=name, shape=list(state[name].shape), kind="adapter",
                                               layer=name.rsplit(".", 2)[0]))
    params = {t.name: state[t.name] for t in adaptable}
    feature_dim = head.in_features
    head_weight = f"{head_name}.weight"
    head_w = state[head_weight]
    head_b = state.get(f"{head_name}.bias", np.zeros(head.out_features, np.float32))
    source_stats = {f"source.{nl.name}.{s}": state[f"{nl.name}.{s}"] for nl in norm_layers
                    for s in ("running_mean", "running_var")}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    try:
        # the weights once: source.safetensors, which both graphs reference as external data
        save_params(state, tmp / B.SOURCE_WEIGHTS)
        layout = GS.safetensors_layout(tmp / B.SOURCE_WEIGHTS)
        try:
            GS.externalize(base, B.SOURCE_WEIGHTS, layout, state)
            del state
            static = GS.build_static(base, params, head_weight, feature_dim)
            adaptive = GS.build_adaptive(base, params, nodes, head_weight, feature_dim)
        except GS.GraphSurgeryError as exc:
            raise ExportError(f"{exc}; {SUPPORTED}") from None
        del base
        (tmp / B.STATIC_GRAPH).write_bytes(static.SerializeToString())
        (tmp / B.ADAPTIVE_GRAPH).write_bytes(adaptive.SerializeToString())
        del static, adaptive

        # one ONNX Runtime session at a time (export memory): static parity, calibration on it, adaptive parity
        say("checking parity")
        checks = parity_checks(model, xs, ref_logits, trace_n)
        session = _ort_session(tmp / B.STATIC_GRAPH)
        worst = check_parity("static", session, {}, xs, ref_logits, checks, profile, tracer_notes, trace_n)
        say("calibrating")
        calib, notes = calibrate(session, codec, calib_x[: profile.calib_samples],
                                 calib_y[: profile.calib_samples], head_w, head_b, profile)
        del session
        say("checking parity")
        extra = dict(params)
        if norm_layers:
            extra[GS.STAT_MIX] = np.zeros(len(norm_layers), np.float32)
        session = _ort_session(tmp / B.ADAPTIVE_GRAPH)
        worst = max(worst, check_parity("adaptive", session, extra, xs, ref_logits, checks, profile, tracer_notes,
                                        trace_n))
        del session
        for note in notes:
            say(f"warning: {note}")
        calib["parity.input"] = stored
        calib["parity.logits"] = ref_logits.astype(np.float32)
        calib["head.weight"] = head_w
        calib["head.bias"] = head_b
        calib.update(source_stats)

        say("writing bundle")
        save_params(params, tmp / B.PARAMS, metadata={"param_version": "0"})
        save_params(calib, tmp / B.CALIB, metadata={"warnings": json.dumps(notes)})
        files = [B.ADAPTIVE_GRAPH, B.STATIC_GRAPH, B.PARAMS, B.CALIB, B.SOURCE_WEIGHTS]
        manifest = B.BundleManifest(
            model_name=spec.model_name, model_version=spec.model_version, arch=spec.arch,
            arch_kwargs=spec.arch_kwargs, adapters=spec.adapters,
            input=spec.input_spec(), labels=list(spec.labels),
            feature_dim=feature_dim, norm_layers=norm_layers, adaptable=adaptable,
            files=B.hash_files(tmp, files), cloud_public_key=spec.cloud_public_key,
            profile=profile.model_dump(), parity_max_abs_logit_diff=worst,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), warnings=notes,
        )
        B.write_manifest(tmp, manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def ood_fit_plan(labels: np.ndarray, num_classes: int, feature_dim: int, names: list[str], n_fit: int
                 ) -> tuple[list[str], list[str], list[str]]:
    """Which detectors to fit class-conditionally, which class-agnostically, and the warnings to record.

    A class-conditional detector (Mahalanobis, RMDS) estimates one mean per class: with fewer than
    MIN_SAMPLES_PER_CLASS samples in the median class (64 samples for 1,000 classes) those means are noise,
    so Mahalanobis falls back to one Gaussian over all features and RMDS (which is identically 0 with one
    class) is left out. Covariance-based detectors fitted from fewer than 2 x feature_dim samples get a
    warning: their covariance is rank-deficient and held together by the ridge."""
    counts = np.bincount(labels, minlength=num_classes) if labels.size else np.zeros(num_classes, np.int64)
    median = float(np.median(counts))
    conditional = [n for n in names if n in CLASS_CONDITIONAL]
    agnostic: list[str] = []
    notes: list[str] = []
    if conditional and median < MIN_SAMPLES_PER_CLASS:
        agnostic = [n for n in conditional if n == "mahalanobis"]
        dropped = [n for n in conditional if n != "mahalanobis"]
        what = ", ".join([*(f"{n} fitted class-agnostic (one Gaussian over all features)" for n in agnostic),
                          *(f"{n} left out" for n in dropped)])
        notes.append(f"class-conditional OOD detectors need >= {MIN_SAMPLES_PER_CLASS} calibration samples per "
                     f"class; the median class has {median:g} ({labels.size} samples for {num_classes} classes): "
                     f"{what}. Calibrate with >= {MIN_SAMPLES_PER_CLASS * num_classes} labelled samples "
                     "(profile calib_samples) for class-conditional detectors")
        conditional = []
    elif conditional and int(counts.min()) < MIN_SAMPLES_PER_CLASS:
        few = int((counts < MIN_SAMPLES_PER_CLASS).sum())
        notes.append(f"{few} of {num_classes} classes have fewer than {MIN_SAMPLES_PER_CLASS} calibration samples: "
                     f"their means in {', '.join(conditional)} are noisy")
    cov = [n for n in names if n in COVARIANCE_DETECTORS and (n in conditional or n in agnostic or n == "vim")]
    if cov and n_fit < 2 * feature_dim:
        notes.append(f"{', '.join(cov)} fitted from {n_fit} samples for {feature_dim}-dim features (< 2 x "
                     f"{feature_dim}): the feature covariance is rank-deficient; calibrate with >= "
                     f"{int(np.ceil(2 * feature_dim / 0.8))} samples for a full-rank fit")
    plain = [n for n in names if n not in CLASS_CONDITIONAL or n in conditional]
    return plain, agnostic, notes


def calibrate(session, codec: InputCodec, x: np.ndarray, y: np.ndarray, head_w: np.ndarray, head_b: np.ndarray,
              profile: ExportProfile) -> tuple[dict[str, np.ndarray], list[str]]:
    """Clean-data statistics for the device (entropy, features, OOD detectors); float32 throughout (the
    detectors fit in float64, their state is stored in float32: half the bytes, scores move by < 1e-5
    relative). Returns the state and the warnings about it."""
    logits, feats = [], []
    for xb in _batches(x, calib_batch_size(codec.sample_elems)):
        try:
            xb = codec.normalize(codec.validate(xb))
        except InputError as exc:
            raise ExportError(f"calibration data: {exc}; if the model takes another range, say so "
                              "(--value-range, --mean/--std)") from None
        lo, fe = session.run([GS.LOGITS, GS.FEATURES], {"input": xb})
        logits.append(lo)
        feats.append(fe)
    logits_a, feats_a = np.concatenate(logits), np.concatenate(feats)
    ent = entropy_from_logits(logits_a).astype(np.float32)
    calib: dict[str, np.ndarray] = {
        "entropy.mean": np.array([ent.mean()], np.float32),
        "entropy.std": np.array([ent.std()], np.float32),
        "entropy.quantiles": np.quantile(ent, [0.05, 0.25, 0.5, 0.75, 0.95]).astype(np.float32),
        "features.mean": feats_a.mean(0).astype(np.float32),
        "features.var": feats_a.var(0).astype(np.float32),
        "accuracy.clean": np.array([(logits_a.argmax(1) == y).mean()], np.float32),
    }
    from edgeadapt.device.ood import all_detectors, fit_all

    unknown = [n for n in profile.ood_detectors if n not in all_detectors()]
    if unknown:
        raise ExportError(f"unknown OOD detector(s) {unknown} in the profile; known: {sorted(all_detectors())}")
    n_fit = len(y) - int(round(0.2 * len(y))) if round(0.2 * len(y)) >= 20 else len(y)  # fit_all's holdout
    plain, agnostic, notes = ood_fit_plan(y, head_w.shape[0], feats_a.shape[1], list(profile.ood_detectors), n_fit)
    state = fit_all(feats_a, logits_a, y, head_w, head_b, names=plain, tpr=profile.ood_tpr)
    if agnostic:
        state.update(fit_all(feats_a, logits_a, np.zeros_like(y), head_w, head_b, names=agnostic,
                             tpr=profile.ood_tpr))
    calib.update({k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in state.items()})
    return calib, notes


def manifest_json(manifest: B.BundleManifest) -> str:
    return json.dumps(manifest.model_dump(), indent=2)
