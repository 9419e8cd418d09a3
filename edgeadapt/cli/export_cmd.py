"""`edgeadapt export`: torch model -> verified bundle."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeadapt.cli.common import console, fail, print_json


def export(
    out: Path = typer.Option(..., "--out", "-o", help="bundle directory to write (replaced atomically)"),
    arch: str = typer.Option(None, help="reference architecture name (resnet_edge, mobilenet_tiny, vit_tiny, ...)"),
    model: str = typer.Option(None, "--model", help="your own model as package.module:factory (instead of --arch)"),
    weights: Path = typer.Option(None, help="weights: .safetensors, or .pt/.pth state dict (loaded weights_only)"),
    calib: Path = typer.Option(None, help="calibration data .npz with x (uint8 or float [N,*input]) and y; "
                               "default: the clean Fashion-MNIST train set"),
    profile: Path = typer.Option(None, help="export profile TOML (export/onnx-cpu.toml, export/tensorrt-fp16.toml)"),
    input_shape: str = typer.Option("1,32,32", help="per-sample input shape C,H,W"),
    labels: str = typer.Option(None, help="comma-separated class labels (default: Fashion-MNIST's 10)"),
    name: str = typer.Option(None, help="model name in the manifest (default: the arch)"),
    adapters: int = typer.Option(0, help="insert zero-initialized low-rank conv adapters of this rank (0 = none)"),
    adapter_layers: str = typer.Option(None, help="comma-separated glob patterns of conv names to get adapters"),
    cloud_key: Path = typer.Option(None, help="the cloud's signing key (public or private PEM, from `cloud init`) "
                                   "whose public half the device will trust for updates"),
    json_out: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
) -> None:
    """Export a torch model to a bundle: adaptive + static ONNX graphs, adaptable tensors, calibration state.

    Parity (both graphs vs torch, max |Δlogit| ≤ the profile's tolerance) is checked before anything is
    written; a failing model leaves no bundle behind.
    """
    import numpy as np

    from edgeadapt.export.exporter import ExportError, ExportSpec, export_bundle
    from edgeadapt.export.profile import load_profile
    from edgeadapt.models.reference import FMNIST_LABELS, build_arch

    if (arch is None) == (model is None):
        fail("give exactly one of --arch NAME or --model package.module:factory")
    if model is not None and weights is None:
        fail("--model needs --weights FILE")
    try:
        prof = load_profile(profile)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    try:
        shape = [int(s) for s in input_shape.split(",")]
    except ValueError:
        fail(f"--input-shape must look like 1,32,32, got {input_shape!r}")
    label_list = [s.strip() for s in labels.split(",")] if labels else list(FMNIST_LABELS)
    arch_name = arch or model
    try:
        net = build_arch(arch_name)
    except ValueError as exc:
        fail(str(exc))
    if weights is not None:
        from edgeadapt.models.training import load_weights

        if not weights.is_file():
            fail(f"weights file {weights} does not exist")
        try:
            load_weights(net, weights)
        except Exception as exc:
            fail(f"cannot load {weights}: {exc}")
    adapter_cfg: dict = {}
    if adapters:
        from edgeadapt.models.adapters import insert_adapters

        patterns = [p.strip() for p in adapter_layers.split(",")] if adapter_layers else None
        try:
            targets = insert_adapters(net, adapters, patterns)
        except ValueError as exc:
            fail(str(exc))
        adapter_cfg = {"rank": adapters, "patterns": patterns, "targets": targets}
    if calib is None:
        from edgeadapt.datasets.fmnist import load_fmnist

        try:
            cx, cy = load_fmnist("train")
        except FileNotFoundError as exc:
            fail(str(exc))
        rng = np.random.default_rng(0)
        idx = rng.choice(len(cx), size=min(prof.calib_samples, len(cx)), replace=False)
        cx, cy = cx[idx], cy[idx]
    else:
        if not calib.is_file():
            fail(f"calibration file {calib} does not exist")
        try:
            with np.load(calib, allow_pickle=False) as z:
                cx, cy = z["x"], z["y"]
        except Exception as exc:
            fail(f"cannot read calibration data {calib} (need an .npz with x and y): {exc}")
    key_b64 = None
    if cloud_key is not None:
        from edgeadapt.core.signing import load_public_key_b64

        if not cloud_key.is_file():
            fail(f"cloud key {cloud_key} does not exist")
        key_b64 = load_public_key_b64(cloud_key)
    spec = ExportSpec(arch=arch_name, model_name=name or arch_name.replace(":", "."), labels=label_list,
                      input_shape=shape, adapters=adapter_cfg, cloud_public_key=key_b64)
    if prof.target == "tensorrt":
        from edgeadapt.export.tensorrt_engine import tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason()
        if reason:
            fail(f"profile {prof.name} builds a TensorRT engine, but {reason}")
    try:
        with console.status("exporting") as status:
            manifest = export_bundle(net, spec, cx, cy, out, prof, progress=lambda m: status.update(m))
    except ExportError as exc:
        fail(str(exc))
    if prof.target == "tensorrt":
        from edgeadapt.export.tensorrt_engine import build_engine

        build_engine(out, fp16=prof.tensorrt_fp16, workspace_mb=prof.tensorrt_workspace_mb)
    if json_out:
        print_json(manifest.model_dump())
    else:
        console.print(f"[green]bundle written:[/] {out}  ({len(manifest.adaptable)} adaptable tensors, "
                      f"parity max |Δlogit| {manifest.parity_max_abs_logit_diff:.2e})")
