"""Device daemon configuration: flags > environment (EDGEADAPT_*) > TOML file > defaults, validated."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from edgeadapt.device.ood import DEFAULT_DETECTOR

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    pass


#: the fast path: statistics folded into the static graph, refreshed now and then (the runtime bench's engine)
STANDALONE_METHOD = "ema_stats"
#: a device in the loop normalizes every batch with its own statistics (mixed with the EMA, w = n/(16+n)): the
#: cloud trains the affine parameters under per-group batch statistics (cloud/trainer.py), and an update only
#: helps a device that normalizes the same way (docs/NOTES.md, "A device in the loop normalizes as the trainer")
LOOP_METHOD = "ema_stats:transductive=true"


class DeviceConfig(BaseModel, extra="forbid"):
    bundle: Path
    state_dir: Path
    cloud_url: str | None = None
    token: str | None = None
    listen: str = "127.0.0.1:8470"
    source: str | None = Field(None, description="npz:PATH streams a file through the device instead of HTTP only")
    source_batch: int = Field(64, ge=1, le=4096)
    method: str | None = Field(None, description="adaptation method spec; default: LOOP_METHOD with a cloud, "
                                                 "STANDALONE_METHOD without")
    ood_detector: str = DEFAULT_DETECTOR
    threads: int = Field(2, ge=1, le=256)
    backend: str = "onnxruntime"
    max_batch: int = Field(64, ge=1, le=4096)
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)
    max_request_samples: int = Field(256, ge=1)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    queue_max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    upload_samples_per_s: float | None = Field(None, ge=0)
    upload_bytes_per_s: float | None = Field(None, ge=0)
    novel_samples_per_s: float = Field(1.0, ge=0)
    upload_all: bool = Field(False, description="upload every in-distribution sample (the benchmark's baseline)")
    upload_interval_s: float = Field(0.5, gt=0)
    update_poll_s: float = Field(2.0, gt=0)
    keep_versions: int = Field(5, ge=1)
    watch_batches: int = Field(8, ge=1)
    save_state_every_s: float = Field(30.0, gt=0)
    input_range_policy: Literal["reject", "clip"] = Field(
        "reject", description="float inputs outside the bundle's declared value range: refused (400) or clipped")
    allowed_origins: list[str] = Field(
        default_factory=list, description="web origins whose browser requests are served (default none)")

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origins(cls, v):
        return [o.strip() for o in v.split(",") if o.strip()] if isinstance(v, str) else v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, _, port = v.rpartition(":")
        if not host or not port.isdigit() or not (0 <= int(port) < 65536):
            raise ValueError(f"listen must be HOST:PORT, got {v!r}")
        return v

    @model_validator(mode="after")
    def _default_method(self) -> DeviceConfig:
        if self.method is None:
            self.method = LOOP_METHOD if self.cloud_url else STANDALONE_METHOD
        return self

    @field_validator("source")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("npz:"):
            raise ValueError(f"source must be npz:PATH, got {v!r}")
        return v


def load_config(flags: dict, config_file: Path | None = None, env: dict[str, str] | None = None) -> DeviceConfig:
    """Merge the layers; ``flags`` holds only options the user set (None values are ignored)."""
    env = os.environ if env is None else env
    data: dict = {}
    if config_file is not None:
        if not Path(config_file).is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        try:
            raw = tomllib.loads(Path(config_file).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file}: invalid TOML: {exc}") from exc
        data.update(raw.get("device", raw))
    fields = DeviceConfig.model_fields
    for name in fields:
        key = f"EDGEADAPT_{name.upper()}"
        if key in env:
            data[name] = env[key]
    data.update({k: v for k, v in flags.items() if v is not None})
    try:
        return DeviceConfig.model_validate(data)
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid device configuration: {msgs}") from exc
