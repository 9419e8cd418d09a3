"""torch model -> verified bundle (DESIGN §3).

The model is exported once with normalization nodes preserved; graph_surgery derives the static and the
adaptive graph from that one export; both are checked against torch (max |Δlogit|) and nothing is written
unless both pass. Calibration runs the static graph on clean data to fit OOD detectors and entropy stats.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeadapt.core import bundle as B
from edgeadapt.core.mathops import entropy_from_logits
from edgeadapt.core.tensorfile import save_params
from edgeadapt.export import graph_surgery as GS
from edgeadapt.export.profile import ExportProfile


class ExportError(Exception):
    """Export refused: the message says why."""


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


def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ExportError("the model has no nn.Linear classifier head; the last nn.Linear is taken as the head")
    return linears[-1]


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))]


def _onnx_export(model: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), buf, input_names=["input"], output_names=[GS.LOGITS],
            dynamic_axes={"input": {0: "N"}, GS.LOGITS: {0: "N"}}, opset_version=opset, dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
        )
    return onnx.load_from_string(buf.getvalue())


def _ort_session(model: onnx.ModelProto | bytes | str, threads: int = 2):
    import onnxruntime as ort

    from edgeadapt.device.backend import session_options

    so = session_options(threads)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _batches(x: np.ndarray, size: int):
    for i in range(0, len(x), size):
        yield x[i : i + size]


def to_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def export_bundle(
    model: nn.Module,
    spec: ExportSpec,
    calib_x: np.ndarray,
    calib_y: np.ndarray,
    out_dir: str | Path,
    profile: ExportProfile,
    progress=None,
) -> B.BundleManifest:
    out_dir = Path(out_dir)
    say = progress or (lambda msg: None)
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    norms = norm_modules(model)
    if not norms:
        raise ExportError(
            "the model has no normalization layer (BatchNorm2d or LayerNorm): forward-only adaptation needs "
            "normalization statistics or affine parameters to adapt"
        )
    head_name, head = find_head(model)
    if calib_x.ndim != 4 or list(calib_x.shape[1:]) != list(spec.input_shape):
        raise ExportError(
            f"calibration data has shape {list(calib_x.shape)}, the model input is [N, {spec.input_shape}]"
        )
    if len(calib_x) < profile.parity_batch:
        raise ExportError(f"need at least {profile.parity_batch} calibration samples, got {len(calib_x)}")
    example = torch.from_numpy(to_float(calib_x[: profile.parity_batch]))
    try:
        with torch.no_grad():
            ref_logits = model(example).numpy()
    except Exception as exc:
        raise ExportError(f"the model failed on an input of shape {list(example.shape)}: {exc}") from exc
    if ref_logits.ndim != 2 or ref_logits.shape[1] != len(spec.labels):
        raise ExportError(f"model output shape {list(ref_logits.shape)} does not match {len(spec.labels)} labels")

    say("exporting ONNX")
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()
             if v.dtype.is_floating_point}
    base = _onnx_export(model, example, profile.opset)
    GS.dealias_identities(base, state)
    nodes = GS.find_norm_nodes(base)
    if not nodes:
        raise ExportError("no normalization node survived ONNX export; cannot build an adaptive graph")
    adaptable: list[B.AdaptableTensor] = []
    norm_layers: list[B.NormLayer] = []
    for nn_ in nodes:
        for role, tname in nn_.tensors.items():
            kind = "norm_stats" if role.startswith("running_") else "norm_affine"
            adaptable.append(B.AdaptableTensor(name=tname, shape=list(state[tname].shape), kind=kind, layer=nn_.layer))
        if nn_.kind == "batchnorm":
            norm_layers.append(B.NormLayer(name=nn_.layer, channels=int(state[nn_.tensors["weight"]].shape[0]),
                                           eps=nn_.eps))
    for name in state:
        if ".adapter." in name:
            adaptable.append(B.AdaptableTensor(name=name, shape=list(state[name].shape), kind="adapter",
                                               layer=name.rsplit(".", 2)[0]))
    params = {t.name: state[t.name] for t in adaptable}
    feature_dim = head.in_features
    head_weight = f"{head_name}.weight"
    static = GS.build_static(base, params, head_weight, feature_dim)
    adaptive = GS.build_adaptive(base, params, nodes, head_weight, feature_dim)

    say("checking parity")
    xs = example.numpy()
    s_static, s_adapt = _ort_session(static), _ort_session(adaptive)
    out_static = s_static.run([GS.LOGITS], {"input": xs})[0]
    feeds = {"input": xs, **params}
    if norm_layers:
        feeds[GS.STAT_MIX] = np.zeros(len(norm_layers), np.float32)
    out_adapt = s_adapt.run([GS.LOGITS], feeds)[0]
    d_static = float(np.abs(out_static - ref_logits).max())
    d_adapt = float(np.abs(out_adapt - ref_logits).max())
    tol = profile.parity_tolerance
    if d_static > tol or d_adapt > tol:
        bad = [f"{name} graph max |Δlogit| = {d:.3g}" for name, d in (("static", d_static), ("adaptive", d_adapt))
               if d > tol]
        raise ParityError(f"parity check failed (tolerance {tol:g}): " + "; ".join(bad) + " — bundle not written")

    say("calibrating")
    calib = calibrate(s_static, calib_x[: profile.calib_samples], calib_y[: profile.calib_samples],
                      state[head_weight], state.get(f"{head_name}.bias", np.zeros(head.out_features, np.float32)),
                      profile)
    calib["parity.input"] = xs
    calib["parity.logits"] = ref_logits.astype(np.float32)
    calib["head.weight"] = state[head_weight]
    calib["head.bias"] = state.get(f"{head_name}.bias", np.zeros(head.out_features, np.float32))
    for nl in norm_layers:
        calib[f"source.{nl.name}.running_mean"] = state[f"{nl.name}.running_mean"]
        calib[f"source.{nl.name}.running_var"] = state[f"{nl.name}.running_var"]

    say("writing bundle")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    try:
        onnx.save(static, tmp / B.STATIC_GRAPH)
        onnx.save(adaptive, tmp / B.ADAPTIVE_GRAPH)
        save_params(params, tmp / B.PARAMS, metadata={"param_version": "0"})
        save_params(calib, tmp / B.CALIB)
        save_params(state, tmp / B.SOURCE_WEIGHTS)
        files = [B.ADAPTIVE_GRAPH, B.STATIC_GRAPH, B.PARAMS, B.CALIB, B.SOURCE_WEIGHTS]
        manifest = B.BundleManifest(
            model_name=spec.model_name, model_version=spec.model_version, arch=spec.arch,
            arch_kwargs=spec.arch_kwargs, adapters=spec.adapters,
            input=B.InputSpec(shape=list(spec.input_shape)), labels=list(spec.labels),
            feature_dim=feature_dim, norm_layers=norm_layers, adaptable=adaptable,
            files=B.hash_files(tmp, files), cloud_public_key=spec.cloud_public_key,
            profile=profile.model_dump(), parity_max_abs_logit_diff=max(d_static, d_adapt),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        B.write_manifest(tmp, manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def calibrate(session, x: np.ndarray, y: np.ndarray, head_w: np.ndarray, head_b: np.ndarray,
              profile: ExportProfile) -> dict[str, np.ndarray]:
    logits, feats = [], []
    for xb in _batches(x, 256):
        lo, fe = session.run([GS.LOGITS, GS.FEATURES], {"input": to_float(xb)})
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
    calib.update(fit_all(feats_a, logits_a, y, head_w, head_b, names=list(profile.ood_detectors), tpr=profile.ood_tpr))
    return calib


def manifest_json(manifest: B.BundleManifest) -> str:
    return json.dumps(manifest.model_dump(), indent=2)
