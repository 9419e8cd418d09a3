"""Device daemon configuration: flags > environment (EDGEADAPT_*) > TOML file > defaults, validated."""

from __future__ import annotations

import math
import os
import ssl
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from edgeadapt.core.reliability import DEFAULT_RELIABILITY, ReliabilityPolicy
from edgeadapt.core.upload_encoding import DEFAULT_UPLOAD_ENCODING, UploadEncoding
from edgeadapt.device.ood import DEFAULT_DETECTOR

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    pass


#: the one default a user never has to change, standalone or with a cloud (issue 17 items 2-3, chosen on the dev
#: streams across every wild-traffic setting, docs/NOTES.md "Wild traffic" and "One default for the standalone
#: device and the device in the loop"): the first stage normalized with each batch's own statistics and a fast
#: EMA, the deep layers with a class-balanced memory's (a run of one class cannot drag them along), ROID's
#: label-prior correction, LAME when the outputs are label-skewed, and a reset to the source state if the model
#: collapses. The cloud's updates fit a device normalizing this way (dev loop: +8.4 points over the device alone on
#: continual traffic, +8.1 under label runs), so the loop's device needs no method of its own
DEFAULT_METHOD = "robust_stats+prior_correction+lame_skew+collapse_reset"
#: the loop's device method until stop 28: every batch's own statistics mixed with the EMA. ~2x faster per batch
#: and 1.4 points better in the loop on i.i.d. batches (dev), but label runs skew every batch it normalizes with
#: (dev loop under correlated labels 34.1% vs 52.1%): an option for traffic known to be i.i.d., not the default.
#: ``ema_stats`` alone (statistics folded into the static graph) is the fastest path
TRANSDUCTIVE_METHOD = "ema_stats:transductive=true"


#: engine knobs that became fields of the reliability policy (issue 17 item 5): a config naming them is told where
MOVED_TO_RELIABILITY = {"reliable_entropy_factor": "adapt_factor", "max_ood_fraction": "max_ood_fraction"}


class DeviceConfig(BaseModel, extra="forbid"):
    bundle: Path
    state_dir: Path
    cloud_url: str | None = Field(None, description="the cloud, or several replicas sharing one store "
                                  "comma-separated (a network failure moves the device to the next)")
    token: str | None = Field(None, description="this device's cloud token; prefer token_file or EDGEADAPT_TOKEN: "
                                                "a --token flag is visible to every local user in /proc/PID/cmdline")
    token_file: Path | None = Field(None, description="file holding the token (first line); keep it 0600")
    ca_file: Path | None = Field(None, description="PEM CA bundle that verifies an https cloud_url's certificate "
                                                   "(default: the system's trust store)")
    listen: str = "127.0.0.1:8470"
    source: str | None = Field(None, description="npz:PATH streams a file through the device instead of HTTP only")
    source_batch: int = Field(64, ge=1, le=4096)
    method: str | None = Field(None, description="adaptation method spec; default: DEFAULT_METHOD, with or "
                                                 "without a cloud")
    ood_detector: str = DEFAULT_DETECTOR
    threads: int = Field(2, ge=1, le=256)
    backend: str = "onnxruntime"
    max_batch: int = Field(64, ge=1, le=4096)
    max_wait_ms: float = Field(0.0, ge=0, le=10_000, description="how long a batch may wait for more requests "
                               "(Triton's max queue delay; 0: run what is queued at once, a lone request never waits)")
    max_request_samples: int = Field(256, ge=1)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    queue_max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    upload_samples_per_s: float | None = Field(None, ge=0)
    upload_bytes_per_s: float | None = Field(None, ge=0)
    novel_samples_per_s: float = Field(1.0, ge=0)
    upload_all: bool = Field(False, description="upload every in-distribution sample (the benchmark's baseline)")
    upload_interval_s: float = Field(0.5, gt=0)
    upload_encoding: str = Field(DEFAULT_UPLOAD_ENCODING, description="how uploaded samples are packed: raw, png "
                                 "(lossless), jpeg:QUALITY or webp:QUALITY (1..100); inputs that are not 1- or "
                                 "3-channel uint8 images travel raw (status says so)")
    update_poll_s: float = Field(2.0, gt=0, description="update checks and heartbeats this often")
    update_long_poll_s: float = Field(20.0, ge=0, le=600, description="an update check asks the cloud to hold it "
                                      "open this long until a version is published, so an update arrives at once "
                                      "(0: plain polling every update_poll_s; the cloud caps it at its "
                                      "long_poll_max_s)")
    update_download_timeout_s: float = Field(30.0, gt=0, description="total deadline for one update download "
                                             "(each network read also at most min(10 s, this))")
    keep_versions: int = Field(5, ge=1)
    watch_batches: int = Field(8, ge=1)
    watch_timeout_s: float = Field(600.0, gt=0, description="a watch that has not seen watch_batches batches by "
                                   "then decides on what it saw, or keeps the version unwatched when no traffic came")
    updates: bool = Field(True, description="take updates from the cloud (false: upload and heartbeat only; a "
                          "bundle without the cloud's public key needs this with a cloud)")
    degraded_after_s: float = Field(60.0, ge=0, description="how long uploads, update checks or heartbeats may "
                                    "fail on the network before the device reports itself degraded")
    save_state_every_s: float = Field(30.0, gt=0)
    max_connections: int = Field(256, ge=16, description="open HTTP connections at most (fitted to the open-file "
                                                         "limit); past it the longest-waiting idle or half-sent "
                                                         "one is closed (core/netguard.py)")
    header_timeout_s: float = Field(10.0, gt=0, le=600, description="a request head must arrive within this")
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="a request body must arrive within this")
    http: Literal["auto", "httptools", "h11"] = Field(
        "auto", description="the HTTP/1.1 implementation: httptools (C parser; auto picks it when installed) or "
        "h11 (pure Python); both run the same connection guard (core/netguard.py)")
    input_range_policy: Literal["reject", "clip"] = Field(
        "reject", description="float inputs outside the bundle's declared value range: refused (400) or clipped")
    allowed_origins: list[str] = Field(
        default_factory=list, description="web origins whose browser requests are served (default none)")
    reliability: ReliabilityPolicy = Field(
        DEFAULT_RELIABILITY, description="which samples are trusted (core/reliability.py): adapt_factor for the "
        "engine's adaptation, upload_factor / low_info_factor / warmup / lam / now_window for the upload selection, "
        "max_ood_fraction for the covariate-shift rule; one policy for the engine and the selector")
    engine: dict[str, float | int | bool] = Field(
        default_factory=dict, description="advanced engine knobs by EngineConfig field name (e.g. {\"input_shift\": "
        "0.2}); the daemon passes them to its engine, an unknown name or a wrong type is a config error")

    @field_validator("engine")
    @classmethod
    def _engine_knobs(cls, v: dict) -> dict:
        from edgeadapt.device.engine import ENGINE_KNOBS

        out = {}
        for name, value in v.items():
            if name in MOVED_TO_RELIABILITY:
                raise ValueError(f"engine.{name} is now reliability.{MOVED_TO_RELIABILITY[name]} (one policy for the "
                                 "engine and the upload selection, core/reliability.py)")
            if name not in ENGINE_KNOBS:
                raise ValueError(f"engine: unknown knob {name!r}; known: {', '.join(sorted(ENGINE_KNOBS))}")
            kind = ENGINE_KNOBS[name]
            if kind is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"engine.{name} must be true or false")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (kind is int and float(value) != int(value)):
                raise ValueError(f"engine.{name} must be a finite number >= 0{' (whole)' if kind is int else ''}")
            if name in ("stats_every", "refresh_every", "good_snapshot_every", "shift_min_samples") and value < 1:
                raise ValueError(f"engine.{name} is a count of batches or samples and must be >= 1")
            out[name] = kind(value)
        return out

    @field_validator("upload_encoding")
    @classmethod
    def _upload_encoding(cls, v: str) -> str:
        return str(UploadEncoding.parse(v))

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
            self.method = DEFAULT_METHOD
        return self

    @model_validator(mode="after")
    def _secrets_and_tls(self) -> DeviceConfig:
        if self.token_file is not None:
            if self.token:
                raise ValueError("give the token once: token (or EDGEADAPT_TOKEN) or token_file, not both")
            self.token = read_token_file(self.token_file)
        if self.ca_file is not None:
            if not Path(self.ca_file).is_file():
                raise ValueError(f"ca_file {self.ca_file} is not a file")
            if not all(u.startswith("https://") for u in (self.cloud_url or "").split(",")):
                raise ValueError("ca_file verifies an https:// cloud_url; cloud_url is not one")
        return self

    @field_validator("cloud_url")
    @classmethod
    def _cloud_urls(cls, v: str | None) -> str | None:
        """One URL, or several replicas comma-separated (device/cloud_endpoints.py)."""
        if v is None or not v.strip():
            return None
        from edgeadapt.device.cloud_endpoints import parse_cloud_urls

        return ",".join(parse_cloud_urls(v))

    def tls_verify(self) -> ssl.SSLContext | bool:
        """What the device's HTTP clients verify the cloud's certificate with: the CA file, else the system store."""
        return True if self.ca_file is None else ssl.create_default_context(cafile=str(self.ca_file))

    def net_limits(self):
        """The connection limits the HTTP API enforces (``edgeadapt.core.netguard``)."""
        from edgeadapt.core.netguard import NetLimits

        return NetLimits(max_connections=self.max_connections, header_timeout_s=self.header_timeout_s,
                         body_timeout_s=self.body_timeout_s)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("npz:"):
            raise ValueError(f"source must be npz:PATH, got {v!r}")
        return v


def read_token_file(path: Path) -> str:
    """The token in ``path`` (its first line); warns when other users may read the file."""
    try:
        text = Path(path).read_text()
        mode = Path(path).stat().st_mode
    except OSError as exc:
        raise ValueError(f"token_file {path}: {exc.strerror or exc}") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise ValueError(f"token_file {path} is empty")
    if mode & 0o077:
        import logging

        logging.getLogger(__name__).warning("token file %s is readable by other users (mode %o); chmod 600 it",
                                            path, mode & 0o777)
    return token


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
