"""`edgeadapt export`: torch model -> verified bundle."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeadapt.cli.common import console, fail, print_json


def _floats(text: str | None, flag: str, count: int | None = None) -> list[float] | None:
    """'0.485,0.456,0.406' -> floats, or a clean exit naming the flag."""
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{flag} takes comma-separated numbers, got {text!r}")
    if not vals or (count is not None and len(vals) != count):
        fail(f"{flag} takes {count or 'one or more'} comma-separated numbers, got {text!r}")
    return vals


def read_labels_file(path: Path) -> list[str]:
    """One label per line (ImageNet's names contain commas); blank lines and surrounding whitespace ignored."""
    if not path.is_file():
        fail(f"labels file {path} does not exist")
    try:
        labels = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read labels file {path}: {exc}")
    labels = [lb for lb in labels if lb]
    if not labels:
        fail(f"labels file {path} has no labels (one per line)")
    return labels


def model_input_shape(net) -> list[int] | None:
    """The per-sample input shape a model declares (an ``input_shape`` attribute, as timm and our reference
    models carry), else None."""
    shape = getattr(net, "input_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape):
        return list(shape)
    return None




def export(
    out: Path = typer.Option(..., "--out", "-o", help="bundle directory to write (replaced atomically)"),
    arch: str = typer.Option(None, help="reference architecture name (resnet_edge, mobilenet_tiny, vit_tiny, ...)"),
    model: str = typer.Option(None, "--model", help="your own model as package.module:factory (instead of --arch)"),
    weights: Path = typer.Option(None, help="weights: .safetensors, or .pt/.pth state dict (loaded weights_only)"),
    calib: Path = typer.Option(None, help="calibration data .npz with x (uint8 or float [N,*input]) and y; "
                               "default: the clean Fashion-MNIST train set"),
    profile: Path = typer.Option(None, help="export profile TOML (export/onnx-cpu.toml, export/tensorrt-fp16.toml)"),
    input_shape: str = typer.Option(None, help="per-sample input shape C,H,W (default: the model's input_shape "
                                    "attribute, else the calibration data's shape, else 1,32,32)"),
    labels: str = typer.Option(None, help="comma-separated class labels (default: Fashion-MNIST's 10 for a "
                               "10-class model, else class_0..class_{C-1})"),
    labels_file: Path = typer.Option(None, "--labels-file", help="class labels, one per line (names may contain "
                                     "commas)"),
    mean: str = typer.Option(None, help="per-channel mean the model was trained with, in value units "
                             "(e.g. 0.485,0.456,0.406); default 0"),
    std: str = typer.Option(None, help="per-channel std, comma-separated (e.g. 0.229,0.224,0.225); default 1"),
    value_range: str = typer.Option("0,1", "--value-range", help="LOW,HIGH of input values before mean/std "
                                    "(0,1 for images scaled to [0,1]; 0,255 for raw pixel values)"),
    uint8_scale: float = typer.Option(None, "--uint8-scale", help="uint8 inputs are multiplied by this to get "
                                      "values (default HIGH/255 when LOW is 0, e.g. 1/255 for 0,1)"),
    name: str = typer.Option(None, help="model name in the manifest (default: the arch)"),
    adapters: int = typer.Option(0, help="insert zero-initialized low-rank adapters of this rank (0 = none)"),
    adapter_layers: str = typer.Option(None, help="comma-separated glob patterns of module names and kind "
                                       "selectors: kind:conv (dense k>1 convs, the default), kind:pointwise "
                                       "(1x1 convs: depthwise nets), kind:linear (linear layers but the head: ViTs)"),
    cloud_key: Path = typer.Option(None, help="the cloud's signing key (public or private PEM, from `cloud init`) "
                                   "whose public half the device will trust for updates"),
    json_out: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
) -> None:
    """Export a torch model to a bundle: adaptive + static ONNX graphs, adaptable tensors, calibration state.

    Parity (both graphs vs torch, max |Δlogit| ≤ the profile's tolerance x max(1, max|logit|), at the
    calibration batch, batch 1 and batch 5) is checked before anything is written; a failing model leaves no
    bundle behind. --mean/--std/--value-range are recorded in the bundle's input spec: the device normalizes
    every input with them, as the model was trained.
    """
    import numpy as np

    from edgeadapt.core.bundle import InputSpec
    from edgeadapt.export.exporter import ExportError, ExportSpec, export_bundle, find_head
    from edgeadapt.export.profile import load_profile
    from edgeadapt.models.reference import FMNIST_LABELS, build_arch

    if (arch is None) == (model is None):
        fail("give exactly one of --arch NAME or --model package.module:factory")
    if model is not None and weights is None:
        fail("--model needs --weights FILE")
    if labels is not None and labels_file is not None:
        fail("give --labels or --labels-file, not both")
    try:
        prof = load_profile(profile)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    shape: list[int] | None = None
    if input_shape is not None:
        try:
            shape = [int(s) for s in input_shape.split(",")]
        except ValueError:
            fail(f"--input-shape must look like 1,32,32, got {input_shape!r}")
        if len(shape) != 3 or min(shape) <= 0:
            fail(f"--input-shape must be three positive sizes C,H,W, got {input_shape!r}")
    lo_hi = _floats(value_range, "--value-range", 2)
    mean_v, std_v = _floats(mean, "--mean"), _floats(std, "--std")
    if lo_hi[1] <= lo_hi[0]:  # type: ignore[index]
        fail(f"--value-range LOW,HIGH needs LOW < HIGH, got {value_range!r}")
    label_list = (read_labels_file(labels_file) if labels_file is not None
                  else [s.strip() for s in labels.split(",")] if labels else None)
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
    if shape is None:
        shape = model_input_shape(net) or (list(cx.shape[1:]) if calib is not None and cx.ndim == 4 else [1, 32, 32])
    if label_list is None:
        try:
            classes = find_head(net)[1].out_features
        except ExportError as exc:
            fail(str(exc))
        label_list = list(FMNIST_LABELS) if classes == len(FMNIST_LABELS) else [f"class_{i}" for i in range(classes)]
    lo, hi = lo_hi  # type: ignore[misc]
    scale = uint8_scale if uint8_scale is not None else (hi / 255.0 if lo == 0 and hi > 0 else 1.0 / 255.0)
    try:
        in_spec = InputSpec(shape=shape, value_range=(lo, hi), uint8_scale=scale,
                            mean=mean_v if mean_v is not None else [0.0], std=std_v if std_v is not None else [1.0])
        from edgeadapt.core.input_codec import InputCodec

        InputCodec(in_spec)
    except ValueError as exc:
        fail(f"--mean/--std/--value-range: {exc}")
    key_b64 = None
    if cloud_key is not None:
        from edgeadapt.core.signing import load_public_key_b64

        if not cloud_key.is_file():
            fail(f"cloud key {cloud_key} does not exist")
        key_b64 = load_public_key_b64(cloud_key)
    spec = ExportSpec(arch=arch_name, model_name=name or arch_name.replace(":", "."), labels=label_list,
                      input_shape=shape, adapters=adapter_cfg, cloud_public_key=key_b64, input=in_spec)
    if prof.target == "tensorrt":
        from edgeadapt.export.tensorrt_engine import tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason()
        if reason:
            fail(f"profile {prof.name} builds a TensorRT engine, but {reason}")

    def progress(msg: str) -> None:
        if msg.startswith("warning: "):
            from rich.text import Text

            console.print("[yellow]warning:[/]", Text(msg[len("warning: "):]))
        else:
            status.update(msg)

    try:
        with console.status("exporting") as status:
            manifest = export_bundle(net, spec, cx, cy, out, prof, progress=progress)
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
