"""Turn one ONNX export (normalization nodes preserved) into the bundle's two graphs.

* static graph: every weight a constant initializer named as in the torch state dict; BatchNormalization
  nodes are left in place so ONNX Runtime folds them into the convolutions when a session is built. A new
  parameter version is applied by overriding those initializers at session build (no re-export), and a
  TensorRT engine can refit them by name.
* adaptive graph: the adaptable tensors (norm affine, norm statistics, adapters) are graph inputs; every
  BatchNormalization also computes its input's batch mean/variance, mixes them with the given statistics by
  a per-layer weight ``stat_mix`` (0 = given statistics only -> parity with the static graph; n/(N+n) =
  Schneider et al.'s prior), and exposes the batch statistics as outputs ``<layer>.batch_mean|batch_var``.
  The penultimate feature (the head's input) is exposed as ``features``. LayerNorm and GroupNorm have no
  batch statistics: their affine parameters are inputs like any adaptable tensor, nothing else changes.
* weights once: ``externalize`` points initializers at the bytes of the bundle's ``source.safetensors`` (ONNX
  external data with the safetensors offsets), so both graphs share the one copy of the weights.

Pure onnx, no torch: the device can re-derive graphs too.
"""

from __future__ import annotations

import copy
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STAT_MIX = "stat_mix"
FEATURES = "features"
LOGITS = "logits"


class GraphSurgeryError(ValueError):
    pass


@dataclass
class NormNode:
    layer: str
    kind: str  # "batchnorm" | "layernorm" | "groupnorm"
    channels: int
    eps: float
    tensors: dict[str, str]  # role -> tensor name


def dealias_identities(model: onnx.ModelProto, state: dict[str, np.ndarray]) -> None:
    """The TorchScript exporter de-duplicates equal tensors through Identity nodes; give each name its own
    initializer again so every adaptable tensor can be overridden independently."""
    g = model.graph
    init_names = {i.name for i in g.initializer}
    keep = []
    for n in g.node:
        if n.op_type == "Identity" and n.input[0] in init_names and n.output[0] in state:
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(state[n.output[0]]), n.output[0]))
            init_names.add(n.output[0])
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)


def find_norm_nodes(model: onnx.ModelProto) -> list[NormNode]:
    out = []
    for n in model.graph.node:
        attrs = {a.name: a for a in n.attribute}
        if n.op_type == "BatchNormalization":
            if not n.input[1].endswith(".weight"):
                continue  # affine=False BN or unnamed: not adaptable by name
            layer = n.input[1][: -len(".weight")]
            eps = attrs["epsilon"].f if "epsilon" in attrs else 1e-5
            roles = dict(zip(("weight", "bias", "running_mean", "running_var"), n.input[1:5], strict=True))
            out.append(NormNode(layer, "batchnorm", 0, eps, roles))
        elif n.op_type == "LayerNormalization" and len(n.input) >= 2 and n.input[1].endswith(".weight"):
            layer = n.input[1][: -len(".weight")]
            eps = attrs["epsilon"].f if "epsilon" in attrs else 1e-5
            roles = {"weight": n.input[1]}
            if len(n.input) > 2 and n.input[2]:
                roles["bias"] = n.input[2]
            out.append(NormNode(layer, "layernorm", 0, eps, roles))
    return out


def affine_norm_nodes(model: onnx.ModelProto, layers: list[tuple[str, str, float]]) -> list[NormNode]:
    """Norm layers found by module name rather than by node (GroupNorm: at opset < 18 the exporter writes it
    as Reshape + InstanceNormalization + Mul/Add, no single node): their ``.weight``/``.bias`` wherever the
    graph uses them as named initializers. ``layers``: (module name, kind, eps)."""
    inits = {i.name for i in model.graph.initializer}
    used = {i for n in model.graph.node for i in n.input}
    out = []
    for name, kind, eps in layers:
        roles = {r: f"{name}.{r}" for r in ("weight", "bias") if f"{name}.{r}" in inits and f"{name}.{r}" in used}
        if roles:
            out.append(NormNode(name, kind, 0, eps, roles))
    return out


def safetensors_layout(path: str | Path) -> dict[str, tuple[int, int]]:
    """name -> (absolute byte offset, byte length) of every tensor in a safetensors file (its header: u64
    little-endian length, JSON, then the data block)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    return {k: (base + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__" and v.get("dtype") == "F32"}


def externalize(model: onnx.ModelProto, location: str, layout: dict[str, tuple[int, int]],
                values: dict[str, np.ndarray]) -> int:
    """Make every float32 initializer whose bytes equal ``values[name]`` external data at ``location`` (a file
    next to the graph, laid out as ``layout``); returns the bytes moved out of the graph. An initializer that
    differs (or has no entry) stays inline."""
    from onnx.external_data_helper import set_external_data

    moved = 0
    for t in model.graph.initializer:
        if t.name not in layout or t.data_type != TensorProto.FLOAT or not t.HasField("raw_data"):
            continue
        v = values.get(t.name)
        offset, length = layout[t.name]
        if v is None or list(t.dims) != list(v.shape) or len(t.raw_data) != length:
            continue
        if not np.array_equal(np.frombuffer(t.raw_data, np.float32), v.reshape(-1)):
            continue
        set_external_data(t, location, offset=offset, length=length)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        moved += length
    return moved


def _head_input(model: onnx.ModelProto, head_weight: str) -> str:
    for n in model.graph.node:
        if head_weight in n.input and n.op_type in ("Gemm", "MatMul"):
            return n.input[0]
    raise GraphSurgeryError(
        f"could not find the classifier head in the graph (no Gemm/MatMul consumes {head_weight!r}); "
        "the last nn.Linear must be applied to a [N, D] feature"
    )


def _add_features_output(model: onnx.ModelProto, head_weight: str, feature_dim: int) -> None:
    g = model.graph
    src = _head_input(model, head_weight)
    g.node.append(helper.make_node("Identity", [src], [FEATURES], name="features_out"))
    g.output.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", feature_dim]))


def _set_initializers(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
    g = model.graph
    keep = [i for i in g.initializer if i.name not in values]
    del g.initializer[:]
    g.initializer.extend(keep)
    g.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(v, np.float32), k) for k, v in values.items())


def build_static(base: onnx.ModelProto, params: dict[str, np.ndarray], head_weight: str, feature_dim: int):
    m = copy.deepcopy(base)
    _set_initializers(m, params)
    _add_features_output(m, head_weight, feature_dim)
    return m


def build_adaptive(
    base: onnx.ModelProto, params: dict[str, np.ndarray], norms: list[NormNode], head_weight: str, feature_dim: int
) -> onnx.ModelProto:
    m = copy.deepcopy(base)
    g = m.graph
    names = set(params)
    keep = [i for i in g.initializer if i.name not in names]
    del g.initializer[:]
    g.initializer.extend(keep)
    for name, value in params.items():
        g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    bns = [nn for nn in norms if nn.kind == "batchnorm"]
    if bns:
        g.input.append(helper.make_tensor_value_info(STAT_MIX, TensorProto.FLOAT, [len(bns)]))
    index = {nn.layer: i for i, nn in enumerate(bns)}
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 17)
    if bns and opset >= 18:  # ReduceMean's axes became an input at opset 18
        g.initializer.append(numpy_helper.from_array(np.array([0, 2, 3], np.int64), "adapt/axes_nhw"))

    def reduce_mean(src: str, dst: str):
        if opset >= 18:
            return helper.make_node("ReduceMean", [src, "adapt/axes_nhw"], [dst], keepdims=0)
        return helper.make_node("ReduceMean", [src], [dst], keepdims=0, axes=[0, 2, 3])

    new_nodes = []
    for n in g.node:
        layer = n.input[1][: -len(".weight")] if n.op_type == "BatchNormalization" and len(n.input) > 1 else None
        if layer not in index:
            new_nodes.append(n)
            continue
        k = index[layer]
        x, rm, rv = n.input[0], n.input[3], n.input[4]
        p = f"{layer}/adapt/"
        idx = p + "idx"
        g.initializer.append(numpy_helper.from_array(np.array([k], np.int64), idx))
        bmean, bvar = f"{layer}.batch_mean", f"{layer}.batch_var"
        new_nodes += [
            reduce_mean(x, bmean),
            helper.make_node("Mul", [x, x], [p + "sq"]),
            reduce_mean(p + "sq", p + "m2"),
            helper.make_node("Mul", [bmean, bmean], [p + "mm"]),
            helper.make_node("Sub", [p + "m2", p + "mm"], [p + "vraw"]),
            helper.make_node("Relu", [p + "vraw"], [bvar]),
            helper.make_node("Gather", [STAT_MIX, idx], [p + "w"]),
            helper.make_node("Sub", [bmean, rm], [p + "dm"]),
            helper.make_node("Mul", [p + "dm", p + "w"], [p + "wdm"]),
            helper.make_node("Add", [rm, p + "wdm"], [p + "mean"]),
            helper.make_node("Sub", [bvar, rv], [p + "dv"]),
            helper.make_node("Mul", [p + "dv", p + "w"], [p + "wdv"]),
            helper.make_node("Add", [rv, p + "wdv"], [p + "var"]),
        ]
        attrs = {a.name: a for a in n.attribute}
        eps = attrs["epsilon"].f if "epsilon" in attrs else 1e-5
        new_nodes.append(
            helper.make_node(
                "BatchNormalization", [x, n.input[1], n.input[2], p + "mean", p + "var"], list(n.output),
                name=n.name, epsilon=eps,
            )
        )
        channels = int(params[n.input[1]].shape[0])
        g.output.append(helper.make_tensor_value_info(bmean, TensorProto.FLOAT, [channels]))
        g.output.append(helper.make_tensor_value_info(bvar, TensorProto.FLOAT, [channels]))
    del g.node[:]
    g.node.extend(new_nodes)
    _add_features_output(m, head_weight, feature_dim)
    return m
