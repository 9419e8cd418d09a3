"""The bundle: the directory `edgeadapt export` writes and a device runs. Defined once, used by both sides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from edgeadapt.core.tensorfile import ParamSet, load_params, sha256_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ADAPTIVE_GRAPH = "model.onnx"
STATIC_GRAPH = "model.static.onnx"
PARAMS = "params.safetensors"
CALIB = "calib.safetensors"
SOURCE_WEIGHTS = "source.safetensors"
ENGINE = "engine.plan"

TensorKind = Literal["norm_affine", "norm_stats", "adapter"]


class BundleError(Exception):
    """A bundle is missing, malformed or fails verification."""


class InputSpec(BaseModel):
    shape: list[int] = Field(description="per-sample shape, e.g. [1, 32, 32]")
    dtype: str = "float32"
    layout: str = "NCHW"
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    uint8_scale: float = Field(1.0 / 255.0, description="uint8 inputs are multiplied by this before normalization")
    # how an image file (JPEG/PNG/WebP sent to the device) becomes a uint8 tensor of ``shape``; the defaults are
    # what the reference model was trained on: grey, resized straight to H×W
    image_mode: Literal["L", "RGB"] | None = Field(None, description="colour mode files are converted to "
                                                   "(default: L for 1 channel, RGB for 3)")
    image_resize: int | None = Field(None, ge=1, description="with image_crop=center: the shorter side is resized "
                                     "to this first (default max(H, W)), e.g. 256 before a 224 crop")
    image_crop: Literal["none", "center"] = Field("none", description="none: resized straight to H×W (aspect "
                                                  "not kept); center: shorter side resized, centre crop of H×W")
    image_resample: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    max_image_pixels: int | None = Field(None, ge=1, description="files of more pixels are refused before they "
                                         "are decoded (decompression bombs); default max(4096², 64·H·W)")


class AdaptableTensor(BaseModel):
    name: str
    shape: list[int]
    kind: TensorKind
    layer: str = Field(description="the normalization layer or adapter module it belongs to")


class NormLayer(BaseModel):
    """A BatchNorm layer whose statistics the adaptive graph can mix with the batch's own."""

    name: str
    channels: int
    eps: float


class BundleManifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    model_name: str
    model_version: str = "1"
    arch: str = Field(description="reference arch name or module:factory, to rebuild the torch model in the cloud")
    arch_kwargs: dict = Field(default_factory=dict)
    adapters: dict = Field(default_factory=dict, description="adapter insertion config ({} when none)")
    input: InputSpec
    labels: list[str]
    outputs: list[str] = Field(default_factory=lambda: ["logits", "features"])
    feature_dim: int
    norm_layers: list[NormLayer] = Field(default_factory=list)
    adaptable: list[AdaptableTensor]
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")
    cloud_public_key: str | None = Field(None, description="base64 raw ed25519 public key that signs updates")
    profile: dict = Field(default_factory=dict)
    parity_max_abs_logit_diff: float = 0.0
    created: str = ""
    warnings: list[str] = Field(default_factory=list, description="what export found weak but exported anyway "
                                "(e.g. too few calibration samples per class for class-conditional OOD detectors)")

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def read_manifest(bundle_dir: str | Path) -> BundleManifest:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"not a bundle: {path} does not exist")
    try:
        return BundleManifest.model_validate_json(path.read_text())
    except Exception as exc:  # pydantic.ValidationError or JSON error
        raise BundleError(f"{path}: invalid manifest: {exc}") from exc


def write_manifest(bundle_dir: str | Path, manifest: BundleManifest) -> None:
    Path(bundle_dir, MANIFEST).write_text(json.dumps(manifest.model_dump(), indent=2) + "\n")


def hash_files(bundle_dir: str | Path, names: list[str]) -> dict[str, str]:
    return {n: sha256_file(Path(bundle_dir) / n) for n in names if (Path(bundle_dir) / n).is_file()}


def verify_hashes(bundle_dir: str | Path, manifest: BundleManifest | None = None) -> list[str]:
    """Return a list of problems (empty when every file matches its recorded sha256)."""
    bundle_dir = Path(bundle_dir)
    manifest = manifest or read_manifest(bundle_dir)
    problems = []
    for name, digest in manifest.files.items():
        if "/" in name or "\\" in name or name.startswith("."):
            problems.append(f"{name}: illegal file name in manifest")
            continue
        path = bundle_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: sha256 mismatch (file changed since export)")
    for required in (ADAPTIVE_GRAPH, STATIC_GRAPH, PARAMS, CALIB):
        if required not in manifest.files:
            problems.append(f"{required}: not listed in manifest")
    return problems


class Bundle:
    """A verified, loaded bundle (numpy only)."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if verify:
            problems = verify_hashes(self.path, self.manifest)
            if problems:
                raise BundleError(f"bundle {self.path} failed verification: " + "; ".join(problems))
        self.params: ParamSet = load_params(self.path / PARAMS)
        self.calib: ParamSet = load_params(self.path / CALIB)

    @property
    def adaptive_graph(self) -> Path:
        return self.path / ADAPTIVE_GRAPH

    @property
    def static_graph(self) -> Path:
        return self.path / STATIC_GRAPH

    def codec(self, range_policy: str = "reject"):
        """The input contract of this bundle (``edgeadapt.core.input_codec.InputCodec``)."""
        from edgeadapt.core.input_codec import InputCodec

        return InputCodec(self.manifest.input, range_policy)  # type: ignore[arg-type]

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        """uint8 or float [N,*shape] -> normalized float32 NCHW, as the graphs expect (validated first)."""
        codec = self.codec()
        return codec.normalize(codec.validate(x))
