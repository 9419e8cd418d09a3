"""Export profiles (TOML files under export/): how a bundle is built for one target."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel, Field

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ExportProfile(BaseModel, extra="forbid"):
    name: str = "onnx-cpu"
    target: str = Field("onnx", pattern="^(onnx|tensorrt)$")
    opset: int = Field(17, ge=17, le=21)
    parity_tolerance: float = Field(1e-4, gt=0, description="max |Δlogit| / max(1, max|logit|), both graphs vs torch")
    parity_batch: int = Field(64, ge=6, description="the calibration batch export traces and checks at; parity is "
                              "also checked at batch 1 and 5, so this one must differ from both")
    calib_samples: int = Field(2048, ge=64)
    ood_detectors: list[str] = Field(default_factory=lambda: ["msp", "maxlogit", "energy", "gen", "mahalanobis", "rmds", "vim"])
    ood_tpr: float = Field(0.95, gt=0, lt=1)
    tensorrt_fp16: bool = False
    tensorrt_workspace_mb: int = 1024


def load_profile(path: str | Path | None) -> ExportProfile:
    if path is None:
        return ExportProfile()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"export profile {p} does not exist")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"export profile {p}: invalid TOML: {exc}") from exc
    return ExportProfile.model_validate(data.get("profile", data))
