"""The device's model, rebuilt in torch in the cloud from its bundle; and the teacher.

``rebuild_edge_model`` builds the architecture the manifest names, inserts the same adapters, loads the full
source state dict (``source.safetensors``) and overwrites the adaptable tensors with the version being trained
from. ``extract_params`` reads the adaptable tensors back out as the float32 numpy parameter set that update
packages carry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeadapt.core import bundle as B
from edgeadapt.core.tensorfile import ParamSet, load_params
from edgeadapt.models.adapters import insert_adapters
from edgeadapt.models.reference import build_arch, build_registered


class ModelError(ValueError):
    pass


def _manifest(bundle_dir_or_manifest) -> B.BundleManifest:
    if isinstance(bundle_dir_or_manifest, B.BundleManifest):
        return bundle_dir_or_manifest
    return B.read_manifest(bundle_dir_or_manifest)


def apply_params(model: nn.Module, params: ParamSet) -> None:
    """Copy a parameter set into the model's state tensors in place (names are state_dict keys)."""
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, arr in params.items():
            if name not in state:
                raise ModelError(f"adaptable tensor {name!r} is not in the model's state dict")
            t = state[name]
            src = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
            if tuple(t.shape) != tuple(src.shape):
                raise ModelError(f"{name}: model shape {list(t.shape)} != parameter shape {list(src.shape)}")
            t.data.copy_(src.to(t.dtype))


def build_student(manifest: B.BundleManifest, student_model: str | None = None) -> nn.Module:
    """The bundle's architecture as an untrained torch module: from the registry when the manifest names a
    registered arch, or from ``student_model``, the ``module:factory`` (or registered name) the operator gave.
    Never from the manifest's text alone: a bundle is data, and its ``arch`` would otherwise be imported and
    called (``"os:system"`` ran a command, issue 22)."""
    try:
        if student_model:
            return build_arch(student_model, **manifest.arch_kwargs)
        return build_registered(manifest.arch, **manifest.arch_kwargs)
    except ValueError as exc:
        raise ModelError(str(exc)) from None


def rebuild_edge_model(bundle_dir: str | Path, params: ParamSet | None = None,
                       student_model: str | None = None) -> nn.Module:
    """The edge model as torch ``nn.Module`` (eval mode), with ``params`` (default: the bundle's version 0);
    ``student_model``: see ``build_student``."""
    bundle_dir = Path(bundle_dir)
    manifest = _manifest(bundle_dir)
    model = build_student(manifest, student_model)
    if manifest.adapters:
        insert_adapters(model, int(manifest.adapters["rank"]), manifest.adapters.get("patterns"))
    source = load_params(bundle_dir / B.SOURCE_WEIGHTS)
    state = model.state_dict()
    float_keys = {k for k, v in state.items() if v.dtype.is_floating_point}
    missing = sorted(float_keys - set(source))
    unexpected = sorted(set(source) - set(state))
    if missing or unexpected:
        raise ModelError(f"{bundle_dir / B.SOURCE_WEIGHTS} does not fit arch {manifest.arch!r}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    apply_params(model, source)
    apply_params(model, params if params is not None else load_params(bundle_dir / B.PARAMS))
    return model.eval()


def extract_params(model: nn.Module, manifest) -> ParamSet:
    """The adaptable tensors of ``model`` as float32 numpy (the names the manifest lists)."""
    manifest = _manifest(manifest)
    state = model.state_dict()
    out: ParamSet = {}
    for t in manifest.adaptable:
        if t.name not in state:
            raise ModelError(f"adaptable tensor {t.name!r} is not in the model's state dict")
        out[t.name] = state[t.name].detach().cpu().numpy().astype(np.float32).copy()
    return out


def preprocess(x: np.ndarray, manifest: B.BundleManifest) -> torch.Tensor:
    """uint8 / float16 / float32 [N, *shape] -> float32 tensor normalized like the bundle's graphs expect."""
    from edgeadapt.core.input_codec import InputCodec

    codec = InputCodec(manifest.input)
    return torch.from_numpy(np.ascontiguousarray(codec.normalize(codec.to_values(x).astype(np.float32))))


def load_weights(model: nn.Module, weights: str | Path) -> nn.Module:
    """safetensors, or a ``.pt``/``.pth`` state dict (``torch.load(weights_only=True)``); errors as ModelError."""
    from edgeadapt.models import training

    try:
        return training.load_weights(model, weights)
    except (FileNotFoundError, ValueError) as exc:
        raise ModelError(str(exc)) from exc


def load_teacher(arch: str, weights: str | Path | None = None, **kwargs) -> nn.Module:
    """A teacher: reference arch name or ``package.module:factory``, weights from safetensors or .pt."""
    model = build_arch(arch, **kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()
